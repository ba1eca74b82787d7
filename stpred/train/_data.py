"""Index-batch data modules: batches are index tensors, gathered from a :class:`TensorStore` in one op.

Gathering a whole batch with one advanced-indexing call (instead of a Python ``__getitem__`` per spot) is what
makes the loader cheap; when the store fits on the GPU the gather runs there and no pixels cross the bus per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

#: Key of the index batches the loaders yield (replaced by the gathered batch on the device).
INDEX_KEY = "index"


class TensorStore:
    """Per-spot tensors (uint8 crops, embeddings, targets, ...) aligned on one row index.

    Parameters
    ----------
    tensors
        Mapping of batch key to array/tensor whose first axis has one entry per spot.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        n = None
        for key, value in tensors.items():
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                msg = f"Store entry {key!r} has {t.shape[0]} rows; expected {n} like the others."
                raise ValueError(msg)
            self.tensors[key] = t
        self.n = int(n or 0)

    def __len__(self) -> int:
        return self.n

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return next(iter(self.tensors.values())).device

    def nbytes(self) -> int:
        """Total size in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str) -> TensorStore:
        """Move every tensor to ``device`` (in place) and return ``self``."""
        self.tensors = {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}
        return self

    def pin_memory(self) -> TensorStore:
        """Pin CPU tensors so host-to-device copies can overlap compute."""
        if self.device.type == "cpu" and torch.cuda.is_available():
            self.tensors = {k: v.pin_memory() for k, v in self.tensors.items()}
        return self

    def gather(self, index: torch.Tensor, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Rows ``index`` of every tensor, moved to ``device``."""
        index = index.to(self.device)
        out = {k: v.index_select(0, index) for k, v in self.tensors.items()}
        if device is not None:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out


class _EpochShuffledBatches(Dataset, Sampler):
    """Random index batches re-drawn every epoch from a seeded generator (deterministic given the seed)."""

    def __init__(
        self,
        groups: Sequence[np.ndarray],
        *,
        batch_size: int | None,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
    ) -> None:
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups if len(g)]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._batches = self._make(0)

    def _make(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        for g in self.groups:
            idx = rng.permutation(g) if self.shuffle else g
            if self.batch_size is None:
                batches.append(idx)
                continue
            stop = len(idx) - (len(idx) % self.batch_size if self.drop_last else 0)
            chunks = [idx[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]
            if self.shuffle and len(chunks) > 1 and len(chunks[-1]) == 1:
                # a one-spot training batch breaks BatchNorm (and gives a one-sample gradient): fold it into the
                # previous batch of the same group
                chunks[-2:] = [np.concatenate(chunks[-2:])]
            batches.extend(chunks)
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Redraw the batches for ``epoch`` (Lightning calls this on the sampler at every epoch start)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches = self._make(epoch)

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {INDEX_KEY: torch.as_tensor(self._batches[i], dtype=torch.long)}

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self._batches)))


def _collate_single(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return items[0]


class IndexDataModule(L.LightningDataModule):
    """Train/validation batches of spot indices for one :class:`TensorStore`.

    Parameters
    ----------
    train_groups, val_groups
        Index arrays, one per section: ``"slide"`` batching takes one whole group per step; ``"spots"`` batching
        draws mini-batches within each group (``batch_per_section=True``) or from all groups pooled.
    batching
        ``"spots"``: mini-batches of ``batch_size`` spots; ``"slide"``: one whole group per step.
    batch_size
        Spots per batch for ``"spots"`` batching.
    seed
        Seed of the batch order (re-drawn every epoch, deterministically).
    batch_per_section
        Draw every training spot batch from a single group (HiFusion's reference batching); ``False`` mixes
        groups. Validation batches are never shuffled.
    """

    def __init__(
        self,
        train_groups: Sequence[np.ndarray],
        val_groups: Sequence[np.ndarray] = (),
        *,
        batching: Literal["spots", "slide"] = "spots",
        batch_size: int = 32,
        seed: int = 0,
        batch_per_section: bool = False,
    ) -> None:
        super().__init__()
        if batching == "slide":
            bs = None
            train = list(train_groups)
            val = list(val_groups)
        else:
            bs = batch_size
            train = list(train_groups) if batch_per_section else [np.concatenate(list(train_groups))]
            val = [np.concatenate(list(val_groups))] if len(val_groups) else []
        self._train = _EpochShuffledBatches(train, batch_size=bs, shuffle=True, seed=seed)
        self._val = _EpochShuffledBatches(val, batch_size=bs, shuffle=False, seed=seed) if val else None
        self.seed = int(seed)
        self.n_train = int(sum(len(g) for g in train_groups))
        self.n_val = int(sum(len(g) for g in val_groups))

    @property
    def has_val(self) -> bool:
        """Whether a validation split exists."""
        return self._val is not None and len(self._val) > 0

    def _generator(self) -> torch.Generator:
        # a private generator: creating a loader iterator then draws nothing from the global RNG, whose state
        # (augmentation, dropout) a resumed run restores at an epoch boundary
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled index batches; the order changes every epoch."""
        return DataLoader(
            self._train, batch_size=1, sampler=self._train, collate_fn=_collate_single, generator=self._generator()
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation index batches (fixed order)."""
        if not self.has_val:
            return []
        return DataLoader(
            self._val, batch_size=1, shuffle=False, collate_fn=_collate_single, generator=self._generator()
        )


