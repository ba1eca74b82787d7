"""Callbacks: per-epoch loss history, and the full-state checkpoint a run resumes from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from lightning.pytorch.callbacks import Checkpoint

from ._state import rng_state, set_rng_state


class HistoryCallback(L.Callback):
    """Collect the epoch-level metrics Lightning logged (``train_loss``, ``val_loss``, ...) as rows.

    The rows are part of the checkpoint state, so a resumed phase keeps the history of its earlier epochs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []
        self.phase = 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record every logged epoch metric (validation runs before this hook)."""
        if trainer.sanity_checking:
            return
        row: dict[str, float] = {"epoch": int(trainer.current_epoch), "phase": self.phase}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train_", "val_")) and not key.endswith("_step"):
                row[key.removesuffix("_epoch")] = float(value.detach().cpu())
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None:
            row["lr"] = float(opt.param_groups[0]["lr"])
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        """The rows so far (saved in every checkpoint)."""
        return {"rows": [dict(r) for r in self.rows], "phase": self.phase}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from the rows of a checkpoint."""
        self.rows = [dict(r) for r in state_dict["rows"]]
        self.phase = int(state_dict["phase"])

    def frame(self) -> pd.DataFrame:
        """The history as a DataFrame (one row per epoch and phase)."""
        return pd.DataFrame(self.rows)


class LastCheckpoint(Checkpoint):
    """Write the full training state to ``path`` at the end of every epoch, atomically, for resuming.

    The checkpoint holds the weights, the optimiser and scheduler states, the loop progress, every callback's
    state (best checkpoint, early stopping, history), the global RNG states and whether training was about to
    stop. As a :class:`~lightning.pytorch.callbacks.Checkpoint` it runs after the other callbacks and after the
    module's own ``on_train_epoch_end`` (where the learning-rate schedule steps), so the state it saves is the
    state the next epoch starts from.

    Parameters
    ----------
    path
        File to write (``last.ckpt``), replaced every epoch through a temporary file and a rename.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self._should_stop = False
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """RNG states at the end of the epoch, and whether the trainer was about to stop."""
        return {"rng": rng_state(), "should_stop": self._should_stop}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the saved state; it is applied when training restarts."""
        self._pending = dict(state_dict)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply a loaded state: the RNG states, and a stop that early stopping had decided.

        This runs after the checkpoint is restored and before anything draws from the global RNG (the data
        loaders draw their seeds from private generators), also when the loaded run needs no further epoch.
        """
        if self._pending is not None:
            set_rng_state(self._pending["rng"])
            if self._pending.get("should_stop"):
                trainer.should_stop = True
            self._pending = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the full state (the temporary file is renamed over ``path`` by the process that wrote it)."""
        if trainer.sanity_checking:
            return
        self._should_stop = bool(trainer.should_stop)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
