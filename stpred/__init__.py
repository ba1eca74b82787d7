"""stpred: predict spatial gene expression from H&E histology.

The submodules follow scanpy's layout: :mod:`stpred.io`, :mod:`stpred.datasets`, :mod:`stpred.pp`,
:mod:`stpred.tl`, :mod:`stpred.pl`, :mod:`stpred.models`, :mod:`stpred.metrics`. They are imported on first
attribute access so that ``import stpred`` stays fast (torch, spatialdata and lightning take seconds to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("datasets", "io", "metrics", "models", "pl", "pp", "tl", "train")
__all__ = [*_SUBMODULES, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, io, metrics, models, pl, pp, tl, train


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    msg = f"module 'stpred' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
