"""The Lightning engine that trains any :class:`~stpred.models.StpredModel` (apart from the architectures).

:func:`stpred.tl.fit` is the user entry point; :class:`TrainRunner` is the orchestration it calls (phases,
hooks, checkpoints), for custom training scripts. Everything else in this package is private.
"""

from __future__ import annotations

from ._data import TensorStore
from ._runner import TrainResult, TrainRunner

__all__ = ["TensorStore", "TrainResult", "TrainRunner"]
