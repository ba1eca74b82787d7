"""K-means in torch: k-means++ seeding and Lloyd iterations, vectorised, on the input's device.

Used by MMAP to build per-slide prototype banks. It follows scikit-learn's ``KMeans(init="k-means++")``
(greedy k-means++ with ``2 + ⌊ln k⌋`` local trials, tolerance relative to the mean feature variance, empty clusters
re-seeded with the points farthest from their centres) but runs where the features already live and is seeded with
a :class:`torch.Generator`, so the same seed gives the same clusters on the same device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KMeansResult", "kmeans"]


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes
    ----------
    centroids
        ``(k, D)`` cluster centres (unit norm for ``metric="cosine"``).
    labels
        ``(N,)`` long index of each point's centre.
    inertia
        Sum over points of the squared Euclidean distance to their centre (``"euclidean"``) or of
        ``1 - cos`` (``"cosine"``).
    n_iter
        Lloyd iterations of the best run.
    """

    centroids: Tensor
    labels: Tensor
    inertia: float
    n_iter: int


def _sq_dist(x: Tensor, x_sq: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances ``(N, k)`` between rows of ``x`` and of ``c``."""
    d = torch.addmm(x_sq[:, None] + (c * c).sum(1)[None, :], x, c.T, alpha=-2.0)
    return d.clamp_min_(0.0)


def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding: each new centre is the best of ``2 + ⌊ln k⌋`` D²-sampled candidates."""
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    centers = x.new_empty(k, x.shape[1])
    first = int(torch.randint(n, (1,), generator=gen, device=x.device))
    centers[0] = x[first]
    closest = _sq_dist(x, x_sq, x[first : first + 1])[:, 0]
    for c in range(1, k):
        weights = closest if bool(closest.sum() > 0) else torch.ones_like(closest)
        cand = torch.multinomial(weights, n_trials, replacement=True, generator=gen)
        new_closest = torch.minimum(closest[:, None], _sq_dist(x, x_sq, x[cand]))
        best = int(new_closest.sum(0).argmin())
        centers[c] = x[cand[best]]
        closest = new_closest[:, best]
    return centers


def _lloyd(
    x: Tensor, x_sq: Tensor, centers: Tensor, *, max_iter: int, tol: float, spherical: bool
) -> tuple[Tensor, Tensor, Tensor, int]:
    k = centers.shape[0]
    labels = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (kept for the result)
        d = _sq_dist(x, x_sq, centers)
        min_d, new_labels = d.min(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = counts == 0
        n_empty = int(empty.sum())
        if n_empty:  # re-seed empty clusters with the points farthest from their centres
            far = torch.topk(min_d, n_empty).indices
            new[empty] = x[far]
        if spherical:
            new = F.normalize(new, dim=1)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    d = _sq_dist(x, x_sq, centers)
    min_d, labels = d.min(1)
    return centers, labels, min_d.sum(), n_iter


def kmeans(
    x: Tensor,
    k: int,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    seed: int = 0,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups.

    Parameters
    ----------
    x
        ``(N, D)`` features on any device; computed in float32 (float64 inputs stay float64).
    k
        Number of clusters, ``1 ≤ k ≤ N``.
    n_init
        Independent k-means++ starts; the run with the lowest inertia is kept (scikit-learn ≥ 1.4 uses 1 for
        k-means++ by default).
    max_iter
        Most Lloyd iterations per run.
    tol
        Stop when the summed squared centre shift falls below ``tol`` × the mean per-feature variance of ``x``
        (scikit-learn's rule), or when no label changes.
    metric
        ``"euclidean"`` (standard K-means) or ``"cosine"`` (spherical K-means on L2-normalised rows).
    seed
        Seed of the :class:`torch.Generator` (on ``x``'s device) driving the seeding.

    Returns
    -------
    :class:`KMeansResult` with centroids in ``x``'s dtype, labels and inertia.

    Examples
    --------
    >>> x = torch.cat([torch.randn(50, 2), torch.randn(50, 2) + 10])
    >>> res = kmeans(x, 2, seed=0)
    >>> sorted(torch.bincount(res.labels).tolist())
    [50, 50]
    """
    if not isinstance(x, Tensor) or x.ndim != 2:
        msg = f"Expected a 2-D tensor of features (N, D), found {type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}."
        raise ValueError(msg)
    n = x.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n:
        msg = f"Expected `k` between 1 and the number of points {n}, found {k!r}."
        raise ValueError(msg)
    if not isinstance(n_init, int) or n_init < 1:
        msg = f"Expected `n_init` to be a positive integer, found {n_init!r}."
        raise ValueError(msg)
    if metric not in ("euclidean", "cosine"):
        msg = f"Unknown metric {metric!r}; expected one of ['euclidean', 'cosine']."
        raise ValueError(msg)
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    work = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(work).all()):
        msg = "Expected finite features; found NaN or infinite values."
        raise ValueError(msg)
    spherical = metric == "cosine"
    if spherical:
        work = F.normalize(work, dim=1)
    x_sq = (work * work).sum(1)
    tol_abs = tol * float(work.var(0, unbiased=False).mean()) if n > 1 else 0.0
    gen = torch.Generator(device=work.device).manual_seed(int(seed))

    best: tuple[Tensor, Tensor, Tensor, int] | None = None
    for _ in range(n_init):
        init = _kmeans_pp(work, x_sq, k, gen)
        run = _lloyd(work, x_sq, init, max_iter=max_iter, tol=tol_abs, spherical=spherical)
        if best is None or bool(run[2] < best[2]):
            best = run
    centers, labels, inertia, n_iter = best
    value = float(inertia) / 2.0 if spherical else float(inertia)  # on the unit sphere ‖a-b‖² = 2(1 - cos)
    return KMeansResult(centroids=centers.to(out_dtype), labels=labels, inertia=value, n_iter=n_iter)
