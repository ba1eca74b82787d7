"""One LightningModule that drives every stpred model through the loss the model defines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from .._constants import BatchKeys
from ._data import INDEX_KEY, TensorStore

if TYPE_CHECKING:
    from ..models._base import StpredModel, TrainDefaults


class StpredModule(L.LightningModule):
    """Train any :class:`~stpred.models.StpredModel` through the loss the model defines.

    Batches arrive as ``{"index": LongTensor}``; the rows are gathered from ``store`` (kept on the training device
    when it fits) right after the transfer, then the model's ``augment`` hook runs on the device. On CUDA the
    model is switched to channels_last.

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
        model: StpredModel,
        store: TensorStore,
        optim: TrainDefaults,
        *,
        resident: bool | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.store = store
        self.optim = optim
        self.resident = resident
        self._n_train_batches = 1
        self._scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._scheduler_state: dict[str, Any] | None = None

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
            self.model.to(memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        """Remember the epoch length, for the training-progress value handed to ``augment``."""
        n = self.trainer.num_training_batches
        self._n_train_batches = int(n) if n not in (None, float("inf")) and n > 0 else 1

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Gather the batch rows from the store (one indexed op per tensor)."""
        if INDEX_KEY in batch:
            return self.store.gather(batch[INDEX_KEY], device=self.device)
        return batch

    # ----------------------------------------------------------------- training
    def _progress(self, batch_idx: int) -> float:
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        return min(1.0, (self.current_epoch + batch_idx / self._n_train_batches) / max_epochs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step on ``batch`` (after the model's ``augment`` hook)."""
        batch = self.model.augment(batch, self._progress(batch_idx))
        out = self.model(batch)
        losses = self.model.loss(out, batch)
        n = int(batch[BatchKeys.TARGET].shape[0])
        self.log("train_loss", losses.loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        parts = {f"train_{k}": v for k, v in losses.logged().items()}
        self.log_dict(parts, on_step=False, on_epoch=True, batch_size=n)
        return losses.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation loss of ``batch`` (the model's own loss, so that best-epoch choice matches training)."""
        out = self.model(batch)
        losses = self.model.loss(out, batch)
        n = int(batch[BatchKeys.TARGET].shape[0])
        self.log("val_loss", losses.loss, prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val_mse", losses.mse, on_epoch=True, batch_size=n, sync_dist=True)

    # ----------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        """Adam/AdamW on the trainable parameters; the optional cosine schedule is stepped by this module.

        The schedule steps in :meth:`on_train_epoch_end`, before the end-of-epoch checkpoints are written, so
        that a checkpoint holds the learning rate the next epoch uses (Lightning steps its own schedulers after
        the checkpoints, which a resumed run would miss).
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            msg = "The model has no trainable parameters."
            raise ValueError(msg)
        cls = torch.optim.AdamW if self.optim.optimizer == "adamw" else torch.optim.Adam
        opt = cls(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        self._scheduler = None
        if self.optim.scheduler == "cosine":
            t_max = max(1, int(self.trainer.max_epochs or 1))
            self._scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=self.optim.min_lr)
            if self._scheduler_state is not None:
                self._scheduler.load_state_dict(self._scheduler_state)
                self._scheduler_state = None
        return opt

    def on_train_epoch_end(self) -> None:
        """Step the learning-rate schedule (once per epoch)."""
        if self._scheduler is not None:
            self._scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the schedule's state with the checkpoint."""
        if self._scheduler is not None:
            checkpoint["stpred_lr_scheduler"] = self._scheduler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the schedule's state (now, or when the optimiser is built)."""
        state = checkpoint.get("stpred_lr_scheduler")
        if state is None:
            return
        if self._scheduler is not None:
            self._scheduler.load_state_dict(state)
        else:
            self._scheduler_state = state
