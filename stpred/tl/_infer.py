"""Repeated inference on one prepared store: MC-dropout samples and image features, for uncertainty and OOD.

:meth:`~stpred.tl.Predictor.predict` builds its inputs and runs one pass; the extras of :func:`stpred.tl.predict`
need several passes (MC-dropout samples) or another output (features) over the same inputs, so the inputs are
built once here and the engine's :func:`~stpred.train._trainer.run_inference` runs on a thin view of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .._constants import STPRED_TABLE
from .._validate import get_table

if TYPE_CHECKING:
    from collections.abc import Mapping

    from spatialdata import SpatialData

    from ..models import StpredModel
    from ..train import TensorStore
    from ._predictor import Predictor


@dataclass
class Prepared:
    """A predictor's inputs for some sections: the store, the row groups, and how to return table order."""

    store: TensorStore
    groups: list[np.ndarray]
    unsort: np.ndarray
    order: np.ndarray
    batch_size: int


def prepare(
    predictor: Predictor,
    sdata: SpatialData,
    sections: list[str],
    *,
    table_key: str = STPRED_TABLE,
    batch_size: int | None = None,
    patches: Any = None,
    embedding_key: str | None = None,
) -> Prepared:
    """Build the store of ``predictor``'s inputs for ``sections`` and run the model's per-slide preparation.

    ``patches`` and ``embedding_key`` override the registered patch bank and the embedding used in training.
    """
    from .._sections import rows_of
    from ..train import TensorStore
    from ._inputs import model_arrays

    table = get_table(sdata, table_key, made_by="pp.select_genes")
    order = predictor.check_compatible(table)
    arrays = model_arrays(
        sdata,
        table,
        predictor.model,
        embedding_key=embedding_key or predictor.info.get("embedding_key"),
        patches=patches,
        with_target=False,
        table_key=table_key,
    )
    store = TensorStore(arrays)
    groups = list(rows_of(table, sections).values())
    predictor.model.prepare_slides(store, groups)
    rows = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    train_bs = int(predictor.info.get("batch_size") or 32)
    return Prepared(store, groups, np.argsort(rows, kind="stable"), order, batch_size or max(64, train_bs))


class _FeatureView(nn.Module):
    """The model with ``features(batch)`` as its prediction (so the engine's inference loop runs it)."""

    def __init__(self, model: StpredModel) -> None:
        super().__init__()
        self.inner = model
        self.batching = model.batching

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"pred": self.inner.features(batch).float()}


class _MCDropoutView(nn.Module):
    """The model with its dropout modules (and only those) in training mode during each forward pass."""

    def __init__(self, model: StpredModel, dropouts: list[nn.Module]) -> None:
        super().__init__()
        self.inner = model
        self.batching = model.batching
        self._dropouts = dropouts

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        for module in self._dropouts:
            module.training = True
        try:
            return self.inner(batch)
        finally:
            for module in self._dropouts:
                module.training = False


def check_mc_dropout(predictor: Predictor) -> list[nn.Module]:
    """The predictor's dropout modules, or a ValueError naming the ensemble alternative."""
    dropouts = predictor.model.dropout_modules()
    if not dropouts:
        msg = (
            f"The {predictor.name!r} model has no dropout with a positive rate, so `uncertainty='mc_dropout'` "
            "cannot sample it. Use a deep ensemble instead: `stpred.tl.fit(..., n_models=5)` and "
            "`uncertainty='ensemble'`, or pass several predictors as `model=[p1, p2, ...]`."
        )
        raise ValueError(msg)
    return dropouts


def run(
    predictor: Predictor,
    prepared: Prepared,
    *,
    kind: str = "pred",
    dropouts: list[nn.Module] | None = None,
    device: str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """One inference pass in table order: ``"pred"`` (genes in table order, MC-dropout when ``dropouts``) or ``"features"``."""
    from ..train._trainer import run_inference

    if kind == "features":
        view: nn.Module = _FeatureView(predictor.model)
    elif dropouts:
        view = _MCDropoutView(predictor.model, dropouts)
    else:
        view = predictor.model
    out = run_inference(
        view, prepared.store, prepared.groups, batch_size=prepared.batch_size, device=device, progress=progress
    )
    out = out[prepared.unsort]
    return out if kind == "features" else out[:, prepared.order]


def mc_dropout_moments(
    predictor: Predictor,
    prepared: Prepared,
    *,
    n_samples: int,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over ``n_samples`` MC-dropout passes (float32, table order)."""
    dropouts = check_mc_dropout(predictor)
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        acc = _Moments()
        for _ in range(n_samples):
            acc.add(run(predictor, prepared, dropouts=dropouts, device=device, progress=progress))
    finally:
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return acc.result()


class _Moments:
    """Running mean and (population) standard deviation of equally shaped arrays (Welford, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.copy(), np.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.mean is not None
        assert self.m2 is not None
        return self.mean.astype(np.float32), np.sqrt(self.m2 / self.n).astype(np.float32)
