"""The training orchestration behind :func:`stpred.tl.fit`: head-bias initialisation, phases, hooks, checkpoints."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._constants import BatchKeys
from ..models._base import StpredModel, TrainDefaults
from ._data import TensorStore

#: ``trainer_kwargs`` keys that the runner sets itself, with the argument to use instead.
RESERVED_TRAINER_KWARGS = {
    "max_epochs": "pass `max_epochs=` to `stpred.tl.fit`",
    "enable_progress_bar": "pass `progress=` to `stpred.tl.fit`",
    "enable_checkpointing": "the best validation epoch is always checkpointed when there is a validation split",
    "logger": "the per-epoch history is recorded in `Predictor.history`",
    "default_root_dir": "pass `checkpoint_dir=` to the runner",
}


@dataclass
class TrainResult:
    """What :meth:`TrainRunner.run` returns.

    Attributes
    ----------
    history
        One row per epoch and phase (``phase``, ``epoch``, ``train_loss``, ``train_mse``, ``val_mse``, ``lr``, ...).
    best
        Per phase: ``{"epoch": int, "checkpoint": str | None}`` (the epoch whose weights the model holds).
    """

    history: pd.DataFrame
    best: dict[int, dict[str, Any]] = field(default_factory=dict)


class TrainRunner:
    """Fit one :class:`~stpred.models.StpredModel` on the rows of a :class:`TensorStore`.

    The runner owns the order of the model's hooks: ``init_head_bias`` (mean training target), then for each
    phase in ``model.phases``: ``set_phase``, ``prepare_slides`` (training and validation sections), and either
    Lightning training with best-epoch checkpointing (``model.trainable``) or ``fit_closed_form``.

    Parameters
    ----------
    model
        The model, trained in place.
    store
        Per-row tensors for every key in ``model.inputs`` plus ``"target"``.
    train_groups, val_groups
        Row indices of the training and validation spots, one array per section (empty arrays are dropped).
    plan
        Optimisation settings (the model's ``config.train`` with the caller's overrides).
    checkpoint_dir
        Directory for the per-phase best checkpoints.
    seed
        Seed of the batch order.
    progress
        Show progress bars.
    trainer_kwargs
        Extra :class:`lightning.pytorch.Trainer` arguments (``accelerator``, ``devices``, ``strategy``,
        ``precision``, ``callbacks``, ...).

    Examples
    --------
    >>> result = TrainRunner(model, store, train_groups, val_groups, plan=model.config.train,
    ...                      checkpoint_dir="ckpt").run()
    >>> result.history[["phase", "epoch", "val_mse"]]
    """

    def __init__(
        self,
        model: StpredModel,
        store: TensorStore,
        train_groups: Sequence[np.ndarray],
        val_groups: Sequence[np.ndarray] = (),
        *,
        plan: TrainDefaults,
        checkpoint_dir: str | os.PathLike,
        seed: int = 0,
        progress: bool = True,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, StpredModel):
            msg = f"Expected an `stpred.models.StpredModel`, found {type(model).__name__}."
            raise TypeError(msg)
        self.model = model
        self.store = store
        self.train_groups = [np.asarray(g, dtype=np.int64) for g in train_groups if len(g)]
        self.val_groups = [np.asarray(g, dtype=np.int64) for g in val_groups if len(g)]
        self.plan = plan
        self.checkpoint_dir = Path(checkpoint_dir)
        self.seed = seed
        self.progress = progress
        self.trainer_kwargs = check_trainer_kwargs(trainer_kwargs)
        check_groups(model, self.train_groups)

    def run(self) -> TrainResult:
        """Run every phase; the model ends on the CPU, in eval mode, with its best weights of the last phase."""
        from ._trainer import train_model

        model = self.model
        rows = np.concatenate(self.train_groups)
        model.init_head_bias(self.store.tensors[BatchKeys.TARGET][rows].float().mean(0))
        histories: list[pd.DataFrame] = []
        best: dict[int, dict[str, Any]] = {}
        for phase in tuple(model.phases):
            model.set_phase(phase)
            model.prepare_slides(self.store, [*self.train_groups, *self.val_groups])
            if model.trainable:
                hist, best_path, best_epoch = train_model(
                    model,
                    self.store,
                    self.train_groups,
                    self.val_groups,
                    plan=self.plan,
                    checkpoint_dir=self.checkpoint_dir,
                    seed=self.seed,
                    progress=self.progress,
                    phase=phase,
                    trainer_kwargs=self.trainer_kwargs,
                )
            else:
                scalars = model.fit_closed_form(self.store, self.train_groups, self.val_groups)
                hist = pd.DataFrame([{"phase": phase, "epoch": 0, **{k: float(v) for k, v in scalars.items()}}])
                best_path, best_epoch = None, 0
                model.eval()
            histories.append(hist)
            best[phase] = {"epoch": int(best_epoch), "checkpoint": None if best_path is None else str(best_path)}
        history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
        return TrainResult(history=history, best=best)


def check_trainer_kwargs(trainer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``trainer_kwargs``; refuses keys the runner sets itself, naming the argument to use."""
    if trainer_kwargs is None:
        return {}
    if not isinstance(trainer_kwargs, dict):
        msg = f"Expected `trainer_kwargs` to be a dict, found {type(trainer_kwargs).__name__}."
        raise TypeError(msg)
    for key, fix in RESERVED_TRAINER_KWARGS.items():
        if key in trainer_kwargs:
            msg = f"`trainer_kwargs` may not set {key!r}: {fix}."
            raise ValueError(msg)
    return dict(trainer_kwargs)


def check_groups(model: StpredModel, train_groups: Sequence[np.ndarray]) -> None:
    """Refuse an empty training split, and sections too small for whole-slide batching."""
    if not train_groups:
        msg = (
            f"No training spots for {model.name!r}: every training section went to validation. "
            "Pass `val=` explicitly."
        )
        raise ValueError(msg)
    if model.batching == "slide" and any(len(g) < 2 for g in train_groups):
        msg = f"{model.name!r} trains on whole slides and needs at least two spots per training section."
        raise ValueError(msg)
