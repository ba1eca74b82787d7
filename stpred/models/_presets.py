"""Named configurations of the built-in models (``tl.fit(..., preset="cpu")``).

A preset is a set of model options and optimisation settings; the arguments of :func:`stpred.tl.fit` override
it. ``"cpu"`` sizes each model so that a HER2 sample-specific fold (train one ~180-spot section, test four)
finishes in minutes on two CPU cores; ``"paper"`` is the configuration of the model's paper (the model's own
defaults, meant for a GPU). The crops a preset expects are in ``patches`` (pass them to
:func:`stpred.pp.extract_patches`; ``field_um`` is the side of the spot crop in µm, i.e. ``mpp = field_um /
size``). Measured scores of each preset are in ``docs/models.md`` and ``benchmarks/results/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One named configuration.

    Attributes
    ----------
    model
        Model options (fields of the model's config).
    train
        ``tl.fit`` optimisation arguments: ``max_epochs``, ``batch_size``, ``lr`` and any ``plan_kwargs`` field.
    patches
        The crops the configuration reads (``size``, ``context_size``, ``field_um``), for
        :func:`stpred.pp.extract_patches`; empty for models that read no crops.
    description
        One line.
    """

    model: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    patches: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


_CPU_FIELD_UM = 150.0  # HiFusion's 224 px at HER2's native ~0.67 µm/px

PRESETS: dict[str, dict[str, Preset]] = {
    "hifusion": {
        "paper": Preset(
            patches={"size": 224, "context_size": 448, "field_um": _CPU_FIELD_UM},
            description="the reference configuration (width 64, 224/448 px crops, grids 1/2/7, 50 epochs)",
        ),
        "cpu": Preset(
            model={"width": 16, "spot_size": 112, "context_size": 224, "grids": (1, 2, 4)},
            train={"max_epochs": 30},
            patches={"size": 112, "context_size": 224, "field_um": _CPU_FIELD_UM},
            description="width 16, 112/224 px crops of the same field, grids 1/2/4, 30 epochs",
        ),
    },
    "hist": {
        "paper": Preset(description="the paper's configuration (width 512, 100 epochs) on patch embeddings"),
        "cpu": Preset(
            train={"max_epochs": 400},
            patches={"size": 224, "field_um": _CPU_FIELD_UM},
            description="the paper's model, 400 epochs (one step per epoch on one training section)",
        ),
    },
    "mmap": {
        "paper": Preset(
            patches={"size": 224, "field_um": _CPU_FIELD_UM},
            description="the paper's configuration (ViT-S/16 with LoRA, 224 px crops)",
        ),
        "cpu": Preset(
            model={"backbone": "vit_tiny", "backbone_kwargs": {"img_size": 112}},
            train={"max_epochs": 20, "lr": 1e-3},
            patches={"size": 112, "field_um": _CPU_FIELD_UM},
            description="ViT-Tiny backbone on 112 px crops of the same field, 20 epochs per phase, lr 1e-3",
        ),
    },
    "mean": {"cpu": Preset(description="closed form"), "paper": Preset(description="closed form")},
    "ridge": {"cpu": Preset(description="closed form"), "paper": Preset(description="closed form")},
}


def get_preset(model: str, name: str) -> Preset:
    """The preset ``name`` of the registered model ``model`` (a class may declare its own in ``presets``).

    Parameters
    ----------
    model
        Registered model name.
    name
        Preset name, e.g. ``"cpu"`` or ``"paper"``.
    """
    from ._registry import get_model

    cls = get_model(model)
    available = {**PRESETS.get(cls.name, {}), **dict(getattr(cls, "presets", {}) or {})}
    if not isinstance(name, str) or name not in available:
        msg = f"Unknown preset {name!r} for model {cls.name!r}; available: {sorted(available) or 'none'}."
        raise ValueError(msg)
    return available[name]
