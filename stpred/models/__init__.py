"""Model architectures: plain :class:`torch.nn.Module` s, one file each, plus shared encoders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import attach

_NAMES = {
    "HiFusion": "hifusion",
    "HiST": "hist",
    "MMAP": "mmap",
    "MeanBaseline": "baselines",
    "Ridge": "baselines",
    "register_model": "_registry",
    "get_model": "_registry",
    "list_models": "_registry",
    "unregister_model": "_registry",
    "StpredModel": "_base",
    "LossOutput": "_base",
    "RandomWeightsWarning": "_base",
    "TrainDefaults": "_base",
    "get_preset": "_presets",
    "Preset": "_presets",
}
__getattr__, __dir__, __all__ = attach(__name__, _NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from ._base import LossOutput, RandomWeightsWarning, StpredModel, TrainDefaults
    from ._presets import Preset, get_preset
    from ._registry import get_model, list_models, register_model, unregister_model
    from .baselines import MeanBaseline, Ridge
    from .hifusion import HiFusion
    from .hist import HiST
    from .mmap import MMAP
