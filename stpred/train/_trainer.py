"""Build the Lightning ``Trainer``, run training, and run batched inference."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch

from ._callbacks import HistoryCallback
from ._data import IndexDataModule, TensorStore
from ._module import StpredModule

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import pandas as pd

    from ..models._base import StpredModel, TrainDefaults

logger = logging.getLogger(__name__)


def resolve_accelerator(accelerator: str) -> str:
    """``"auto"`` → ``"gpu"`` when CUDA is available, else ``"cpu"``."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        msg = f"accelerator={accelerator!r} was requested but no CUDA device is available; use accelerator='cpu'."
        raise ValueError(msg)
    return accelerator


def resolve_precision(precision: str | int | None, accelerator: str) -> str | int:
    """Default precision: bf16 mixed on CUDA devices that support it, full fp32 elsewhere."""
    if precision is not None:
        return precision
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _quiet_lightning() -> None:
    """Keep Lightning's per-fit banners (available accelerators, product tips) out of notebooks and logs."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_trainer(
    *,
    max_epochs: int,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any = "auto",
    precision: str | int | None = None,
    callbacks: Sequence[L.Callback] = (),
    default_root_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """A ``Trainer`` with stpred's defaults (no logger files, deterministic on CPU, bf16 on CUDA)."""
    accelerator = resolve_accelerator(accelerator)
    precision = resolve_precision(precision, accelerator)
    _quiet_lightning()
    kwargs: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "precision": precision,
        "deterministic": accelerator == "cpu",
        "logger": False,
        "callbacks": list(callbacks),
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "default_root_dir": None if default_root_dir is None else str(default_root_dir),
    }
    kwargs.update(trainer_kwargs)
    return L.Trainer(**kwargs)


def train_model(
    model: StpredModel,
    store: TensorStore,
    train_groups: Sequence[np.ndarray],
    val_groups: Sequence[np.ndarray] = (),
    *,
    plan: TrainDefaults,
    checkpoint_dir: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    phase: int = 1,
    resident: bool | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    save_last: bool = False,
    resume_from: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, Path | None, int]:
    """Train ``model`` in place for one phase and restore the weights of its best validation epoch.

    ``plan`` gives the optimiser, schedule, epochs, batch size, early stopping and per-section batching;
    ``trainer_kwargs`` go to :class:`lightning.pytorch.Trainer` (``accelerator``, ``devices``, ``strategy``,
    ``precision``, ...).

    The best epoch is the one with the lowest validation MSE of the final prediction (``val_mse``): the
    quantity that is evaluated. A model's full loss (``val_loss``, also logged) may add auxiliary terms, such as
    HiFusion's per-level heads and alignment, whose scale says little about the prediction.

    Returns
    -------
    history
        One row per epoch (``train_loss``, ``val_loss``, ... and ``lr``).
    best_checkpoint
        Path of the best-epoch checkpoint (``None`` without a validation split: the last epoch is kept).
    best_epoch
        Index of the epoch whose weights the model now holds.
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from ._callbacks import LastCheckpoint
    from ._state import LAST, phase_dir

    data = IndexDataModule(
        train_groups,
        val_groups,
        batching=model.batching,
        batch_size=plan.batch_size,
        seed=seed,
        batch_per_section=plan.batch_per_section,
    )
    module = StpredModule(model, store, plan, resident=resident)
    extra = dict(trainer_kwargs or {})
    history = HistoryCallback()
    history.phase = phase
    callbacks: list[L.Callback] = [history, *extra.pop("callbacks", [])]
    checkpoint = None
    folder = phase_dir(Path(checkpoint_dir).absolute(), phase)
    if data.has_val:
        checkpoint = ModelCheckpoint(
            dirpath=str(folder),
            filename="best",
            monitor="val_mse",
            mode="min",
            save_top_k=1,
            save_weights_only=True,
            enable_version_counter=False,
        )
        callbacks.append(checkpoint)
        if plan.early_stopping_patience is not None:
            callbacks.append(EarlyStopping(monitor="val_mse", mode="min", patience=plan.early_stopping_patience))
    if save_last:
        callbacks.append(LastCheckpoint(folder / LAST))  # after the best checkpoint, so it saves the updated best
    trainer = make_trainer(
        max_epochs=plan.max_epochs,
        callbacks=callbacks,
        default_root_dir=checkpoint_dir,
        progress=progress,
        enable_checkpointing=checkpoint is not None or save_last,
        **extra,
    )
    with warnings.catch_warnings():
        # the store gather lives in the module's `on_after_batch_transfer` on purpose (it needs the device)
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        # without a validation split the validation loader is an empty list, on purpose
        warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")
        # frozen sub-modules (MMAP's backbone) are kept in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
        # a resumed phase writes into its own folder again, on purpose
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
        trainer.fit(module, datamodule=data, ckpt_path=None if resume_from is None else str(resume_from))
    frame = history.frame()
    best_path = None
    best_epoch = int(frame["epoch"].max()) if len(frame) else 0
    if checkpoint is not None and checkpoint.best_model_path:
        best_path = Path(checkpoint.best_model_path)
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        if "val_mse" in frame:
            best_epoch = int(frame.loc[frame["val_mse"].idxmin(), "epoch"])
    model.to("cpu", memory_format=torch.contiguous_format)
    store.to("cpu")
    model.eval()
    return frame, best_path, best_epoch


@torch.inference_mode()
def run_inference(
    model: StpredModel,
    store: TensorStore,
    groups: Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    precision: str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Predictions for the rows in ``groups`` (concatenated in that order), as float32 numpy.

    Spots are processed in batches of ``batch_size`` (``"spots"`` batching) or one group at a time (``"slide"``
    batching, from ``model.batching``), with bf16 autocast and channels_last on CUDA.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    precision = resolve_precision(precision, "gpu" if device.type == "cuda" else "cpu")
    autocast = device.type == "cuda" and str(precision).startswith("bf16")
    model = model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if model.batching == "slide":
        batches = [np.asarray(g) for g in groups]
    else:
        flat = np.concatenate([np.asarray(g) for g in groups]) if len(groups) else np.zeros(0, np.int64)
        batches = [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
    outputs = []
    for idx in tqdm(batches, desc="predict", disable=not progress, leave=False):
        batch = store.gather(torch.as_tensor(idx, dtype=torch.long), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = model(batch)["pred"]
        outputs.append(pred.float().cpu())
    model.to("cpu", memory_format=torch.contiguous_format)
    if not outputs:
        return np.zeros((0, 0), np.float32)
    return torch.cat(outputs).numpy()
