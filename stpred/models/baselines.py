"""Reference baselines fitted in closed form: the training mean (``"mean"``) and a ridge probe (``"ridge"``).

Both go through the same :func:`stpred.tl.fit` / :func:`stpred.tl.predict` / :meth:`~stpred.tl.Predictor.save` /
:func:`stpred.tl.load` / :func:`stpred.tl.evaluate` path as the neural models (``trainable = False``: no gradient
descent; the fitted values live in buffers, so a saved baseline loads back exactly).

``"ridge"`` is the field's linear probe on patch embeddings (Jaume et al., 2024, HEST-1k, Sec. 4): each spot's
features are its own embedding and, by default, a *context* embedding — the mean embedding of the spots of the same
section within ``context_radius`` lattice units (the spot itself included) — standardised, optionally reduced by
PCA, and regressed on the normalised targets by ridge regression. Unlike HEST's fixed penalty, ``alpha`` is chosen
by inner cross-validation on the training rows only: grouped by section when there are at least two training
sections, otherwise on ``inner_folds`` spatial strips (along the lattice's first axis) of the single training
section. Standardisation and PCA are refitted inside every inner fold, so the choice of ``alpha`` never sees the
rows it is scored on. Everything is linear, so the fitted model is stored as one affine map (``weight``, ``bias``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._constants import BatchKeys
from ._base import StpredModel, TrainDefaults
from ._registry import register_model

#: Store key of the context embedding that :meth:`Ridge.prepare_slides` adds.
CONTEXT_EMBEDDING = "context_embedding"
#: Default ridge penalties searched by the inner cross-validation (features are standardised first).
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))


def _mse(pred: Tensor, target: Tensor) -> float:
    return float(((pred - target) ** 2).mean())


# ------------------------------------------------------------------------------------------------ mean
@dataclass(frozen=True)
class MeanConfig:
    """Options of :class:`MeanBaseline` (it has none besides the panel size)."""

    n_genes: int
    train: TrainDefaults = field(default_factory=TrainDefaults)


@register_model("mean")
class MeanBaseline(StpredModel):
    """Predicts every gene's mean normalised expression over the training spots, for every spot.

    The reference any model must beat: a model scoring like it has learned nothing spot-specific. Its ``pcc_gene``
    is undefined (a constant prediction), so it is excluded and counted in ``n_genes_excluded`` unless scored with
    ``constant="zero"``; compare models with it on ``mse`` or through the paired differences of
    :func:`stpred.tl.evaluate`.

    Parameters
    ----------
    n_genes
        Size of the gene panel.

    Examples
    --------
    >>> predictor = stpred.tl.fit(sdata, "mean", train=["C2"])
    >>> stpred.tl.predict(sdata, "mean")  # layers["stpred_mean"]
    """

    inputs = (BatchKeys.SLIDE,)  # read only for the number of spots in a batch
    trainable = False

    def __init__(self, n_genes: int, **options: Any) -> None:
        super().__init__()
        self.config = MeanConfig(n_genes, **options)
        self.register_buffer("mean", torch.zeros(n_genes))

    def fit_closed_form(
        self, store: Any, train_groups: Sequence[np.ndarray], val_groups: Sequence[np.ndarray]
    ) -> dict[str, float]:
        """Set ``mean`` to the mean target of the training rows; report training and validation MSE."""
        target = store.tensors[BatchKeys.TARGET]
        train = target[torch.from_numpy(np.concatenate(train_groups))].double()
        self.mean.copy_(train.mean(0).to(self.mean.dtype))
        out = {"train_mse": _mse(self.mean.double(), train)}
        if val_groups:
            val = target[torch.from_numpy(np.concatenate(val_groups))].double()
            out["val_mse"] = _mse(self.mean.double(), val)
        return out

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"pred": mean}`` repeated for every spot of the batch."""
        n = batch[BatchKeys.SLIDE].shape[0]
        return {"pred": self.mean.unsqueeze(0).expand(n, -1)}


# ------------------------------------------------------------------------------------------------ ridge
@dataclass(frozen=True)
class RidgeConfig:
    """Options of :class:`Ridge`.

    Attributes
    ----------
    n_genes, in_dim
        Panel size and embedding width (from the data).
    context
        ``"neighbours"``: append the mean embedding of the spot's neighbours (within ``context_radius``);
        ``"none"``: the spot's own embedding only.
    context_radius
        Neighbourhood radius in lattice units (1 = one spot pitch; 1.5 takes the 8 nearest spots of a square
        lattice and the 6 of a hexagonal one).
    n_components
        PCA components kept after standardisation (``None``: no PCA; capped by the number of training rows).
    alphas
        Ridge penalties searched by the inner cross-validation.
    inner_folds
        Number of inner folds (sections when there are several training sections, spatial strips otherwise).
    """

    n_genes: int
    in_dim: int
    context: Literal["neighbours", "none"] = "neighbours"
    context_radius: float = 1.5
    n_components: int | None = 256
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    inner_folds: int = 5
    train: TrainDefaults = field(default_factory=TrainDefaults)

    def __post_init__(self) -> None:
        if self.context not in ("neighbours", "none"):
            msg = f"Unknown `context` {self.context!r}; expected 'neighbours' or 'none'."
            raise ValueError(msg)
        radius = self.context_radius
        if isinstance(radius, bool) or not isinstance(radius, int | float) or not math.isfinite(radius) or radius < 0:
            msg = f"Expected `context_radius` to be a finite non-negative number, found {radius!r}."
            raise ValueError(msg)
        k = self.n_components
        if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0):
            msg = f"Expected `n_components` to be a positive int or None, found {k!r}."
            raise ValueError(msg)
        alphas = tuple(float(a) for a in np.atleast_1d(np.asarray(self.alphas, dtype=float)))
        if not alphas or not all(math.isfinite(a) and a > 0 for a in alphas):
            msg = f"Expected `alphas` to be finite positive numbers, found {self.alphas!r}."
            raise ValueError(msg)
        object.__setattr__(self, "alphas", alphas)
        folds = self.inner_folds
        if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2:
            msg = f"Expected `inner_folds` to be an int >= 2, found {folds!r}."
            raise ValueError(msg)


def _neighbour_mean(emb: Tensor, coords: Tensor, radius: float) -> Tensor:
    """Mean of ``emb`` over the rows within ``radius`` of each row (itself included), via a k-d tree."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    xy = coords.double().numpy()
    pairs = cKDTree(xy).query_pairs(r=float(radius) + 1e-9, output_type="ndarray")
    n = len(xy)
    i = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
    j = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    adj = sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    deg = np.asarray(adj.sum(axis=1)).ravel()
    mean = adj @ emb.double().numpy() / deg[:, None]
    return torch.from_numpy(mean).to(emb.dtype)


def _affine_fits(x: Tensor, y: Tensor, alphas: Sequence[float], n_components: int | None) -> list[tuple[Tensor, Tensor]]:
    """Standardise → PCA → ridge on ``(x, y)`` for every alpha at once (one SVD), as affine maps ``(W, b)``."""
    mu, sd = x.mean(0), x.std(0)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    z = (x - mu) / sd
    y_mean = y.mean(0)
    u, s, vt = torch.linalg.svd(z, full_matrices=False)
    keep = s > s.max() * 1e-10 if len(s) else s.bool()
    if n_components is not None:
        keep &= torch.arange(len(s)) < n_components
    u, s, v = u[:, keep], s[keep], vt[keep].T
    uty = u.T @ (y - y_mean)
    out = []
    for alpha in alphas:
        coef = v @ ((s / (s**2 + alpha)).unsqueeze(1) * uty)  # (d, genes) on standardised features
        weight = coef / sd.unsqueeze(1)
        out.append((weight, y_mean - mu @ weight))
    return out


def _inner_folds(train_groups: Sequence[np.ndarray], axis_values: np.ndarray, n_folds: int) -> tuple[list[np.ndarray], str]:
    """Fold label of every training row (concatenated in group order), and the rule used."""
    sizes = [len(g) for g in train_groups]
    if len(train_groups) >= 2:
        k = min(n_folds, len(train_groups))
        labels = np.concatenate([np.full(n, i % k) for i, n in enumerate(sizes)])
        return [np.flatnonzero(labels == f) for f in range(k)], "sections"
    k = min(n_folds, max(2, sizes[0] // 10))
    order = np.argsort(axis_values, kind="stable")
    labels = np.empty(len(order), dtype=np.int64)
    labels[order] = np.minimum(np.arange(len(order)) * k // len(order), k - 1)
    return [np.flatnonzero(labels == f) for f in range(k)], "spatial strips"


@register_model("ridge")
class Ridge(StpredModel):
    """Linear probe on patch embeddings: standardise → PCA → ridge, ``alpha`` by inner cross-validation.

    See the module docstring for the recipe and :class:`RidgeConfig` for the options. The training rows alone
    decide the standardisation, the PCA, the penalty and the weights.

    Parameters
    ----------
    in_dim
        Embedding width.
    n_genes
        Size of the gene panel.
    **options
        Fields of :class:`RidgeConfig`.

    Examples
    --------
    >>> stpred.pp.embed(sdata, encoder="resnet18")
    >>> predictor = stpred.tl.fit(sdata, "ridge", train=["C2"], val=False, embedding_key="X_emb_resnet18")
    >>> predictor.history[["alpha", "train_mse", "inner_cv_mse"]]
    """

    inputs = (BatchKeys.EMBEDDING, BatchKeys.COORDS, BatchKeys.SLIDE)
    data_sizes = ("n_genes", "in_dim")
    trainable = False

    def __init__(self, in_dim: int, n_genes: int, **options: Any) -> None:
        super().__init__()
        self.config = RidgeConfig(n_genes=n_genes, in_dim=in_dim, **options)
        width = in_dim * (2 if self.config.context == "neighbours" else 1)
        self.register_buffer("weight", torch.zeros(width, n_genes))
        self.register_buffer("bias", torch.zeros(n_genes))
        self.register_buffer("alpha", torch.tensor(float("nan")))

    # ------------------------------------------------------------------ features
    def prepare_slides(self, store: Any, groups: Sequence[np.ndarray]) -> None:
        """Add the context embedding of the rows in ``groups`` to ``store`` (per section; other rows stay 0)."""
        if self.config.context != "neighbours":
            return
        tensors = store.tensors
        emb = tensors[BatchKeys.EMBEDDING]
        context = tensors.get(CONTEXT_EMBEDDING)
        if context is None or context.shape != emb.shape:
            context = torch.zeros_like(emb)
        rows = np.unique(np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])) if groups else np.zeros(0, int)
        slide = tensors[BatchKeys.SLIDE][torch.from_numpy(rows)].numpy()
        for code in np.unique(slide):
            sel = torch.from_numpy(rows[slide == code])
            context[sel] = _neighbour_mean(emb[sel], tensors[BatchKeys.COORDS][sel], self.config.context_radius)
        tensors[CONTEXT_EMBEDDING] = context

    def _features(self, batch: dict[str, Tensor]) -> Tensor:
        parts = [batch[BatchKeys.EMBEDDING]]
        if self.config.context == "neighbours":
            if CONTEXT_EMBEDDING not in batch:
                msg = "Ridge with context='neighbours' needs `prepare_slides` to run first (tl.fit / tl.predict do)."
                raise KeyError(msg)
            parts.append(batch[CONTEXT_EMBEDDING])
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ fitting
    def fit_closed_form(
        self, store: Any, train_groups: Sequence[np.ndarray], val_groups: Sequence[np.ndarray]
    ) -> dict[str, float]:
        """Choose ``alpha`` by inner cross-validation on the training rows, then fit on all of them."""
        cfg = self.config
        rows = torch.from_numpy(np.concatenate(train_groups))
        batch = store.gather(rows)
        x, y = self._features(batch).double(), batch[BatchKeys.TARGET].double()
        axis = batch[BatchKeys.COORDS][:, 0].double().numpy()
        folds, rule = _inner_folds(train_groups, axis, cfg.inner_folds)
        sse = np.zeros(len(cfg.alphas))
        for held in folds:
            fit_mask = np.ones(len(rows), dtype=bool)
            fit_mask[held] = False
            fit_idx, held_idx = torch.from_numpy(np.flatnonzero(fit_mask)), torch.from_numpy(held)
            for i, (w, b) in enumerate(_affine_fits(x[fit_idx], y[fit_idx], cfg.alphas, cfg.n_components)):
                sse[i] += float(((x[held_idx] @ w + b - y[held_idx]) ** 2).sum())
        best = int(np.flatnonzero(sse <= sse.min() * (1 + 1e-12)).max())  # ties: the strongest penalty
        alpha = cfg.alphas[best]
        ((w, b),) = _affine_fits(x, y, [alpha], cfg.n_components)
        self.weight.copy_(w.to(self.weight.dtype))
        self.bias.copy_(b.to(self.bias.dtype))
        self.alpha.fill_(alpha)
        out = {
            "alpha": alpha,
            "inner_cv_mse": float(sse[best] / y.numel()),
            "n_inner_folds": float(len(folds)),
            "inner_by_sections": float(rule == "sections"),
            "train_mse": _mse(x @ w + b, y),
        }
        if val_groups:
            val = store.gather(torch.from_numpy(np.concatenate(val_groups)))
            out["val_mse"] = _mse(self._features(val).double() @ w + b, val[BatchKeys.TARGET].double())
        return out

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"pred": features @ weight + bias}``."""
        x = self._features(batch).to(self.weight.dtype)
        return {"pred": x @ self.weight + self.bias}
