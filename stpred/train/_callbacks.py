"""Callbacks: per-epoch loss history."""

from __future__ import annotations

import lightning as L
import pandas as pd


class HistoryCallback(L.Callback):
    """Collect the epoch-level metrics Lightning logged (``train_loss``, ``val_loss``, ...) as rows."""

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

    def frame(self) -> pd.DataFrame:
        """The history as a DataFrame (one row per epoch and phase)."""
        return pd.DataFrame(self.rows)
