"""Load encoder weights from a local file, strictly (shared by every encoder).

Weights never download: the user points at a file (a torchvision or timm checkpoint, or one saved by stpred) and
:func:`load_weights` checks that it fits the module key by key and shape by shape before copying anything.
"""

from __future__ import annotations

import fnmatch
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)

#: Wrapper keys under which training scripts commonly nest the state dict.
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
#: Prefixes added by ``nn.DataParallel`` / DDP and by ``torch.compile``.
_PREFIXES = ("module.", "_orig_mod.")
#: How many offending keys an error message lists.
_SHOW = 5


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Return the state dict inside ``obj`` (a plain mapping or one nested under a wrapper key)."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 3:
        wrapper = next((k for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
        seen += 1
    if not isinstance(obj, Mapping):
        msg = (
            f"{path} holds a {type(obj).__name__}, not a state dict. Save weights with "
            "`torch.save(model.state_dict(), path)`."
        )
        raise ValueError(msg)
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        msg = (
            f"{path} is not a state dict: {len(bad)} entries are not `str -> Tensor` (first: {bad[:_SHOW]}). "
            "Save weights with `torch.save(model.state_dict(), path)`."
        )
        raise ValueError(msg)
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


def _ignored(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_weights(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    translate: Callable[[dict], dict] | None = None,
    ignore: Sequence[str] = (),
) -> None:
    """Copy the weights stored at ``path`` into ``module``, refusing any file that does not fit exactly.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)`` (no code runs while
    loading). Then, in order:

    1. a state dict nested under ``"state_dict"``, ``"model"``, ``"model_state_dict"`` or ``"module"`` is unwrapped;
    2. the prefixes ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) are stripped;
    3. ``translate`` (if given) maps the foreign names to the module's names;
    4. when ``module`` has no parameter or buffer under ``fc.``, the checkpoint's ``fc.*`` entries (a
       classification head, e.g. torchvision's ImageNet ``fc``) are dropped;
    5. keys matching ``ignore`` are dropped from the checkpoint and not required from the module;
    6. the check is strict: every module key must be present (except BatchNorm ``num_batches_tracked``, which
       older checkpoints lack), no checkpoint key may be left over, and every shape must match.

    Parameters
    ----------
    module
        The module to fill in place (e.g. a :class:`~stpred.models.encoders.resnet.ResNet`).
    path
        Local file written by ``torch.save``.
    translate
        Function mapping the loaded state dict (after steps 1–2) to one in ``module``'s naming.
    ignore
        Glob patterns (:func:`fnmatch.fnmatchcase`, e.g. ``"head.*"``) of keys to skip on both sides.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file cannot be read as a state dict, or its keys or shapes do not fit ``module``; the message lists
        the first offending keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"No weights file at {str(path)!r}. Pass the path of a local state dict saved with `torch.save`."
        raise FileNotFoundError(msg)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        msg = f"{path} could not be read as a torch state dict ({type(err).__name__}: {str(err)[:200]})."
        raise ValueError(msg) from err
    state = _strip_prefixes(_unwrap(obj, path))
    if translate is not None:
        state = dict(translate(state))

    target = module.state_dict()
    if not any(k.startswith("fc.") for k in target):
        dropped = [k for k in state if k.startswith("fc.")]
        if dropped:
            logger.debug("Dropping the classification head %s from %s (the module has no `fc`).", dropped, path)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if ignore:
        state = {k: v for k, v in state.items() if not _ignored(k, ignore)}
        target = {k: v for k, v in target.items() if not _ignored(k, ignore)}

    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs module {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:_SHOW]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:_SHOW]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[:_SHOW]})")
        msg = (
            f"{path} does not fit {type(module).__name__}: " + "; ".join(parts) + ". Check that the file holds "
            "weights for this architecture and width; pass `translate=` to rename foreign keys or `ignore=` to skip "
            "some."
        )
        raise ValueError(msg)
    module.load_state_dict(state, strict=False)
    logger.info("Loaded %d tensors from %s into %s.", len(state), path, type(module).__name__)
