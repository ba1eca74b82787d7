"""The training orchestration behind :func:`stpred.tl.fit`: head-bias initialisation, phases, hooks, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import BatchKeys
from ..models._base import StpredModel, TrainDefaults

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

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

    With ``resumable=True`` (the default) ``checkpoint_dir`` becomes a run folder that an interrupted run continues
    from (:meth:`run` with ``resume=True``): ``run.json`` (the run's settings, a fingerprint of its data, the
    phases done), and per phase ``phase<p>/last.ckpt`` (full state of the last finished epoch: weights,
    optimiser, schedule, early stopping, history, RNG; removed when the phase is done), ``phase<p>/best.ckpt``
    (weights of the best validation epoch) and ``phase<p>/final.pt`` (the weights after the phase, its history
    and the RNG state the next phase starts from). A resumed run skips the phases done (restoring their weights),
    re-runs ``init_head_bias`` and ``prepare_slides`` (deterministic given the weights and the RNG state) and
    continues the interrupted phase from its ``last.ckpt``; on the CPU the result equals an uninterrupted run
    bit for bit.

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
        Folder of this run (created). A folder that already holds a run is refused unless ``run(resume=True)``.
    seed
        Seed of the batch order.
    progress
        Show progress bars.
    trainer_kwargs
        Extra :class:`lightning.pytorch.Trainer` arguments (``accelerator``, ``devices``, ``strategy``,
        ``precision``, ``callbacks``, ...).
    resumable
        Write the run state and a full checkpoint every epoch (``False``: only the best-epoch weights, for a
        folder that is thrown away).
    fingerprint_extra
        More items a resumed run must share with the interrupted one (e.g. ``{"genes": [...]}``).

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
        resumable: bool = True,
        fingerprint_extra: dict[str, Any] | None = None,
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
        self.resumable = bool(resumable)
        self.fingerprint_extra = dict(fingerprint_extra or {})
        self._fingerprint: dict[str, Any] | None = None
        check_groups(model, self.train_groups)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with this one (settings, and hashes of the rows and store tensors)."""
        from ._state import fingerprint

        if self._fingerprint is None:
            self._fingerprint = fingerprint(
                model=self.model,
                plan=self.plan,
                seed=self.seed,
                store=self.store,
                train_groups=self.train_groups,
                val_groups=self.val_groups,
                extra=self.fingerprint_extra,
            )
        return self._fingerprint

    def _start_state(self, *, resume: bool) -> dict[str, Any]:
        """The run state to continue (``resume``) or a new one; refuses a folder that holds another run."""
        import time

        from ._state import STATE_FILE, mismatches, read_state, write_state

        folder = self.checkpoint_dir
        if resume:
            if not self.resumable:
                msg = "`resume=True` needs a resumable run (`resumable=True`)."
                raise ValueError(msg)
            state = read_state(folder)
            diff = mismatches(state, self.fingerprint())
            if diff:
                msg = (
                    f"The run in {str(folder)!r} was started with other settings or data, so it cannot be resumed: "
                    + "; ".join(diff[:6])
                    + ". Pass the same arguments and data as the interrupted fit, or start a new run."
                )
                raise ValueError(msg)
            return state
        taken = (folder / STATE_FILE).exists() or any(folder.glob("phase*")) if folder.is_dir() else False
        if taken:
            msg = (
                f"{str(folder)!r} already holds a training run; resume it (`run(resume=True)`, or `tl.fit(resume=...)`) "
                "or train into a new folder."
            )
            raise FileExistsError(msg)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "format": 1,
            "status": "running",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(self.fingerprint() if self.resumable else {}),
            "completed": {},
        }
        if self.resumable:
            write_state(folder, state)
        return state

    def run(self, *, resume: bool = False) -> TrainResult:
        """Run every phase; the model ends on the CPU, in eval mode, with its best weights of the last phase.

        Parameters
        ----------
        resume
            Continue the interrupted run in ``checkpoint_dir`` (its settings and data must match this runner's).
        """
        import torch

        from ._state import FINAL, LAST, atomic_torch_save, phase_dir, rng_state, set_rng_state, write_state
        from ._trainer import train_model

        model = self.model
        state = self._start_state(resume=resume)
        completed: dict[str, Any] = state["completed"]
        rows = np.concatenate(self.train_groups)
        model.init_head_bias(self.store.tensors[BatchKeys.TARGET][rows].float().mean(0))
        histories: list[pd.DataFrame] = []
        best: dict[int, dict[str, Any]] = {}
        for phase in tuple(model.phases):
            folder = phase_dir(self.checkpoint_dir, phase)
            done = completed.get(str(phase))
            if done is not None:  # restore a phase finished before the interruption
                final = torch.load(folder / FINAL, map_location="cpu", weights_only=True)
                model.set_phase(phase)
                restore = getattr(model, "prepare_state_dict", None)
                if restore is not None:
                    restore(final["state_dict"])
                model.load_state_dict(final["state_dict"], strict=True)
                model.eval()
                set_rng_state(final["rng"])
                histories.append(pd.DataFrame(final["history"]))
                (folder / LAST).unlink(missing_ok=True)  # left behind by a kill right after the phase ended
                best[phase] = {"epoch": int(done["best_epoch"]), "checkpoint": _absolute(folder, done["best_checkpoint"])}
                continue
            model.set_phase(phase)
            model.prepare_slides(self.store, [*self.train_groups, *self.val_groups])
            if model.trainable:
                last = folder / LAST
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
                    save_last=self.resumable,
                    resume_from=last if resume and last.is_file() else None,
                )
            else:
                scalars = model.fit_closed_form(self.store, self.train_groups, self.val_groups)
                hist = pd.DataFrame([{"phase": phase, "epoch": 0, **{k: float(v) for k, v in scalars.items()}}])
                best_path, best_epoch = None, 0
                model.eval()
            histories.append(hist)
            best[phase] = {"epoch": int(best_epoch), "checkpoint": None if best_path is None else str(best_path)}
            if self.resumable:
                records = [{k: _scalar(v) for k, v in r.items()} for r in hist.to_dict("records")]
                atomic_torch_save(
                    {"state_dict": model.state_dict(), "history": records, "rng": rng_state()}, folder / FINAL
                )
                completed[str(phase)] = {
                    "best_epoch": int(best_epoch),
                    "best_checkpoint": None if best_path is None else best_path.name,
                }
                write_state(self.checkpoint_dir, state)
                (folder / LAST).unlink(missing_ok=True)
        if self.resumable:
            state["status"] = "finished"
            write_state(self.checkpoint_dir, state)
        history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
        return TrainResult(history=history, best=best)


def _absolute(folder: Path, name: str | None) -> str | None:
    return None if name is None else str((folder / name).absolute())


def _scalar(value: Any) -> Any:
    """A history cell as a plain Python scalar (stored in ``final.pt``, which loads with ``weights_only``)."""
    return value.item() if hasattr(value, "item") else value


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
