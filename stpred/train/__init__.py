"""The Lightning engine that trains any stpred model (kept apart from the architectures in :mod:`stpred.models`)."""

from __future__ import annotations

from ._callbacks import HistoryCallback
from ._data import IndexDataModule, TensorStore
from ._module import StpredModule
from ._trainer import make_trainer, resolve_precision, run_inference, train_model

__all__ = [
    "HistoryCallback",
    "IndexDataModule",
    "StpredModule",
    "TensorStore",
    "make_trainer",
    "resolve_precision",
    "run_inference",
    "train_model",
]
