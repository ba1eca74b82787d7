"""One LightningModule that drives every stpred model through the loss the model defines."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from ..models._base import TrainDefaults
from ._data import TensorStore


class StpredModule(L.LightningModule):
    """Train any stpred model (see :mod:`stpred.models._base` for what a model declares).

    Batches arrive as ``{"index": LongTensor}``; the rows are gathered from ``store`` (kept on the training device
    when it fits) right after the transfer, then the model's optional ``augment`` runs on the device.

    Parameters
    ----------
    model
        A registered stpred model.
    store
        Per-spot tensors for the batch keys in ``model.inputs`` plus ``"target"``.
    optim
        Optimiser and schedule settings.
    resident
        Move the store to the training device at fit start (``None``: when it takes under a quarter of free memory).
    """

    def __init__(
        self,
        model: nn.Module,
        store: TensorStore,
        optim: TrainDefaults,
        *,
        resident: bool | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.store = store
        self.optim = optim
        self.resident = resident
        self.channels_last = channels_last
        self._n_train_batches = 1

    # ----------------------------------------------------------------- inference
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted normalised expression for ``batch``."""
        return self.model(batch)["pred"]

    # ----------------------------------------------------------------- data placement
    def on_fit_start(self) -> None:
        """Place the store on the device and switch image models to channels_last on CUDA."""
        if self.device.type == "cuda":
            resident = self.resident
            if resident is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                resident = self.store.nbytes() < free / 4
            if resident:
                self.store.to(self.device)
            else:
                self.store.pin_memory()
            if self.channels_last:
                self.model.to(memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        """Remember the epoch length, for the training-progress value handed to ``augment``."""
        n = self.trainer.num_training_batches
        self._n_train_batches = int(n) if n not in (None, float("inf")) and n > 0 else 1

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Gather the batch rows from the store (one indexed op per tensor)."""
        if "index" in batch:
            return self.store.gather(batch["index"], device=self.device)
        return batch

    # ----------------------------------------------------------------- training
    def _progress(self, batch_idx: int) -> float:
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        return min(1.0, (self.current_epoch + batch_idx / self._n_train_batches) / max_epochs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step on ``batch`` (augmented by the model's ``augment`` hook, if any)."""
        augment = getattr(self.model, "augment", None)
        if augment is not None:
            batch = augment(batch, self._progress(batch_idx))
        out = self.model(batch)
        losses = dict(self.model.loss(out, batch))
        n = int(batch["target"].shape[0])
        if "mse" not in losses:  # always log the prediction MSE, comparable with `val_mse` across models
            losses["mse"] = nn.functional.mse_loss(out["pred"].detach().float(), batch["target"].float())
        self.log("train_loss", losses["loss"], prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        parts = {f"train_{k}": v for k, v in losses.items() if k != "loss"}
        if parts:
            self.log_dict(parts, on_step=False, on_epoch=True, batch_size=n)
        return losses["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation loss of ``batch`` (the model's own loss, so that best-epoch choice matches training)."""
        out = self.model(batch)
        losses = self.model.loss(out, batch)
        n = int(batch["target"].shape[0])
        mse = nn.functional.mse_loss(out["pred"].float(), batch["target"].float())
        self.log("val_loss", losses["loss"], prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val_mse", mse, on_epoch=True, batch_size=n, sync_dist=True)

    # ----------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        """Adam/AdamW on the trainable parameters, with an optional per-epoch cosine schedule."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            msg = "The model has no trainable parameters."
            raise ValueError(msg)
        cls = torch.optim.AdamW if self.optim.optimizer == "adamw" else torch.optim.Adam
        opt = cls(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        if self.optim.scheduler == "none":
            return opt
        t_max = max(1, int(self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=self.optim.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

