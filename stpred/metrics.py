"""Every metric stpred reports, defined once.

All functions compare a prediction ``pred`` with a measured ``truth`` of the same shape ``(n_spots, n_genes)``
(rows = spots, columns = genes, usually log-normalised expression from :func:`stpred.pp.normalize`). The numpy
functions accumulate in float64 whatever the input dtype. The ``*_torch`` functions give the same numbers on torch
tensors (on any device, differentiable), for use inside a training loop.

Definitions
-----------
===================  =====================================================================  ==========================
name                 definition                                                             reported by
===================  =====================================================================  ==========================
``mse``              mean of ``(pred - truth)**2`` over all spot x gene entries             HiFusion, MMAP, TRIPLEX
``mae``              mean of ``|pred - truth|`` over all spot x gene entries                HiFusion, MMAP, TRIPLEX
``pcc_gene``         Pearson r per gene across spots, averaged over the genes whose truth   HEST-Benchmark, MMAP
                     and prediction are both non-constant (the others are excluded and      (pooled over its test
                     counted: ``n_genes_excluded``)                                         sections), TRIPLEX
``pcc_spot``         Pearson r per spot across genes, averaged over the spots whose truth   HiFusion's table ("PCC";
                     and prediction are both non-constant (``n_spots_excluded``)            ASIGN's "pcc per patch")
``pcc_flat``         Pearson r over the flattened spot x gene matrix                        HiST (on counts, see
                                                                                            :func:`hist_metrics`)
``r2_flat``          R² = 1 - SS_res / SS_tot over the flattened spot x gene matrix         HiST (on counts)
``r2_gene``          R² per gene, averaged over the genes with non-constant truth           HEST-Benchmark (quartiles)
===================  =====================================================================  ==========================

Notes on comparability:

- HiFusion's PCC is ``pcc_spot``; it adds ``1e-8`` inside the square root, so a constant spot scores 0 there,
  whereas here it is excluded and counted.
- HiST's numbers are :func:`hist_metrics`: ``r2_flat`` and ``pcc_flat`` computed on ``relu(expm1(pred))`` against
  the raw counts, per section (``"slide_avg"``) and pooled (``"spot"``). Flattened metrics largely reward getting
  each gene's mean level right and are much higher than ``pcc_gene``.
- MMAP's PCC is ``pcc_gene`` on the test sections *pooled*; pooling rewards between-section offsets. Compute
  ``pcc_gene`` per section as well (``stpred.tl.evaluate`` reports both).

Inputs containing NaN or infinite values are rejected with a :class:`ValueError`: an undefined prediction is a bug
upstream, and silently skipping it would flatter the score.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "compute_all",
    "hist_metrics",
    "mae",
    "mae_torch",
    "mse",
    "mse_torch",
    "pcc_flat",
    "pcc_gene",
    "pcc_gene_torch",
    "pcc_per_gene",
    "pcc_per_spot",
    "pcc_spot",
    "pcc_spot_torch",
    "r2_flat",
    "r2_gene",
    "r2_per_gene",
]

#: Names of the metrics returned by :func:`compute_all`, in order.
METRICS = ("mse", "mae", "pcc_gene", "pcc_spot", "pcc_flat", "r2_flat", "r2_gene")


# --------------------------------------------------------------------------------------------------- validation
def _as_float64(x: Any, *, name: str) -> np.ndarray:
    """Convert ``x`` (numpy, scipy.sparse, torch, array-like) to a float64 numpy array."""
    if hasattr(x, "toarray"):  # scipy.sparse
        x = x.toarray()
    elif hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        msg = f"Expected `{name}` to be a numeric array, found {type(x).__name__}."
        raise TypeError(msg) from None
    return arr


def _check_pair(pred: Any, truth: Any, *, matrix: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a (pred, truth) pair; ``matrix=True`` requires 2-D ``(n_spots, n_genes)``."""
    p = _as_float64(pred, name="pred")
    t = _as_float64(truth, name="truth")
    if p.shape != t.shape:
        msg = f"`pred` and `truth` must have the same shape, found {p.shape} and {t.shape}."
        raise ValueError(msg)
    if matrix and p.ndim != 2:
        msg = f"Expected 2-D arrays of shape (n_spots, n_genes), found {p.ndim}-D arrays of shape {p.shape}."
        raise ValueError(msg)
    if p.size == 0:
        msg = f"Expected non-empty arrays, found shape {p.shape}."
        raise ValueError(msg)
    for name, a in (("pred", p), ("truth", t)):
        bad = ~np.isfinite(a)
        if bad.any():
            msg = (
                f"`{name}` contains {int(bad.sum())} NaN or infinite value(s) (of {a.size}); metrics are not defined "
                "on them. Remove or impute those spots/genes before computing metrics."
            )
            raise ValueError(msg)
    return p, t


def _nonconstant(a: np.ndarray, axis: int) -> np.ndarray:
    """Boolean mask of the slices of ``a`` along ``axis`` that are not constant (exact test: max != min)."""
    return np.ptp(a, axis=axis) > 0


def _pearson_along(p: np.ndarray, t: np.ndarray, axis: int) -> np.ndarray:
    """Pearson r along ``axis`` (float64), NaN where either side is constant."""
    keep = _nonconstant(p, axis) & _nonconstant(t, axis)
    dp = p - p.mean(axis=axis, keepdims=True)
    dt = t - t.mean(axis=axis, keepdims=True)
    num = (dp * dt).sum(axis=axis)
    den = np.sqrt((dp * dp).sum(axis=axis) * (dt * dt).sum(axis=axis))
    r = np.full(num.shape, np.nan)
    r[keep] = np.clip(num[keep] / den[keep], -1.0, 1.0)
    return r


def _mean_or_nan(values: np.ndarray, *, what: str) -> float:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        warnings.warn(
            f"Every {what} was excluded (constant truth or prediction); the metric is NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
        return float("nan")
    return float(finite.mean())


# --------------------------------------------------------------------------------------------------- numpy metrics
def mse(pred: Any, truth: Any) -> float:
    """Mean squared error over all spot x gene entries.

    Parameters
    ----------
    pred, truth
        Arrays of the same shape (numpy, scipy.sparse or torch); NaN/inf are rejected.

    Returns
    -------
    ``mean((pred - truth) ** 2)`` in float64.
    """
    p, t = _check_pair(pred, truth, matrix=False)
    return float(np.mean((p - t) ** 2))


def mae(pred: Any, truth: Any) -> float:
    """Mean absolute error over all spot x gene entries.

    Parameters
    ----------
    pred, truth
        Arrays of the same shape; NaN/inf are rejected.

    Returns
    -------
    ``mean(|pred - truth|)`` in float64.
    """
    p, t = _check_pair(pred, truth, matrix=False)
    return float(np.mean(np.abs(p - t)))


def pcc_per_gene(pred: Any, truth: Any) -> np.ndarray:
    """Pearson r of each gene across spots.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.

    Returns
    -------
    ``(n_genes,)`` float64 array; NaN for the genes whose truth or prediction is constant across spots
    (excluded from :func:`pcc_gene`).
    """
    p, t = _check_pair(pred, truth, matrix=True)
    return _pearson_along(p, t, axis=0)


def pcc_gene(pred: Any, truth: Any) -> float:
    """Mean over genes of the Pearson r across spots (the field's standard PCC).

    Genes whose truth or prediction is constant across spots have no correlation and are excluded; count them with
    ``np.isnan(pcc_per_gene(pred, truth)).sum()`` or read ``n_genes_excluded`` from :func:`compute_all`.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.

    Returns
    -------
    The mean r, or NaN (with a :class:`RuntimeWarning`) when every gene is excluded.
    """
    return _mean_or_nan(pcc_per_gene(pred, truth), what="gene")


def pcc_per_spot(pred: Any, truth: Any) -> np.ndarray:
    """Pearson r of each spot across genes.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.

    Returns
    -------
    ``(n_spots,)`` float64 array; NaN for the spots whose truth or prediction is constant across genes.
    """
    p, t = _check_pair(pred, truth, matrix=True)
    return _pearson_along(p, t, axis=1)


def pcc_spot(pred: Any, truth: Any) -> float:
    """Mean over spots of the Pearson r across genes (HiFusion's "PCC").

    Spots whose truth or prediction is constant across genes are excluded (HiFusion scores them 0 instead).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.

    Returns
    -------
    The mean r, or NaN (with a :class:`RuntimeWarning`) when every spot is excluded.
    """
    return _mean_or_nan(pcc_per_spot(pred, truth), what="spot")


def pcc_flat(pred: Any, truth: Any) -> float:
    """Pearson r over all spot x gene entries (the flattened matrices).

    Parameters
    ----------
    pred, truth
        Arrays of the same shape; NaN/inf are rejected.

    Returns
    -------
    r, or NaN when either flattened array is constant.
    """
    p, t = _check_pair(pred, truth, matrix=False)
    return float(_pearson_along(p.reshape(-1, 1), t.reshape(-1, 1), axis=0)[0])


def _r2_along(p: np.ndarray, t: np.ndarray, axis: int) -> np.ndarray:
    keep = _nonconstant(t, axis)
    ss_res = ((t - p) ** 2).sum(axis=axis)
    ss_tot = ((t - t.mean(axis=axis, keepdims=True)) ** 2).sum(axis=axis)
    r2 = np.full(ss_res.shape, np.nan)
    r2[keep] = 1.0 - ss_res[keep] / ss_tot[keep]
    return r2


def r2_flat(pred: Any, truth: Any) -> float:
    """Coefficient of determination over all spot x gene entries.

    ``1 - Σ(truth - pred)² / Σ(truth - mean(truth))²`` with one mean over the whole matrix (as
    ``sklearn.metrics.r2_score(truth.ravel(), pred.ravel())``).

    Parameters
    ----------
    pred, truth
        Arrays of the same shape; NaN/inf are rejected.

    Returns
    -------
    R² (at most 1, unbounded below), or NaN when ``truth`` is constant.
    """
    p, t = _check_pair(pred, truth, matrix=False)
    return float(_r2_along(p.reshape(-1, 1), t.reshape(-1, 1), axis=0)[0])


def r2_per_gene(pred: Any, truth: Any) -> np.ndarray:
    """R² of each gene across spots.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.

    Returns
    -------
    ``(n_genes,)`` float64 array ``1 - SS_res / SS_tot``; NaN for the genes whose truth is constant.
    """
    p, t = _check_pair(pred, truth, matrix=True)
    return _r2_along(p, t, axis=0)


def r2_gene(pred: Any, truth: Any) -> float:
    """Mean over genes of the per-gene R² (genes with constant truth excluded).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.

    Returns
    -------
    The mean R², or NaN (with a :class:`RuntimeWarning`) when every gene has constant truth.
    """
    return _mean_or_nan(r2_per_gene(pred, truth), what="gene")


def compute_all(pred: Any, truth: Any) -> dict[str, float]:
    """Every metric of the table in :mod:`stpred.metrics`, in one pass.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.

    Returns
    -------
    ``{"mse", "mae", "pcc_gene", "pcc_spot", "pcc_flat", "r2_flat", "r2_gene"}`` as floats, plus
    ``"n_genes_excluded"`` (genes left out of ``pcc_gene``), ``"n_spots_excluded"`` (spots left out of
    ``pcc_spot``) and ``"n_genes_excluded_r2"`` (genes left out of ``r2_gene``), as ints.
    """
    p, t = _check_pair(pred, truth, matrix=True)
    r_gene = _pearson_along(p, t, axis=0)
    r_spot = _pearson_along(p, t, axis=1)
    r2g = _r2_along(p, t, axis=0)
    flat_p, flat_t = p.reshape(-1, 1), t.reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-excluded -> NaN, reported by the counts below
        out: dict[str, float] = {
            "mse": float(np.mean((p - t) ** 2)),
            "mae": float(np.mean(np.abs(p - t))),
            "pcc_gene": _mean_or_nan(r_gene, what="gene"),
            "pcc_spot": _mean_or_nan(r_spot, what="spot"),
            "pcc_flat": float(_pearson_along(flat_p, flat_t, axis=0)[0]),
            "r2_flat": float(_r2_along(flat_p, flat_t, axis=0)[0]),
            "r2_gene": _mean_or_nan(r2g, what="gene"),
        }
    out["n_genes_excluded"] = int(np.isnan(r_gene).sum())
    out["n_spots_excluded"] = int(np.isnan(r_spot).sum())
    out["n_genes_excluded_r2"] = int(np.isnan(r2g).sum())
    return out


def hist_metrics(
    pred_log: Any,
    raw_counts: Any,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of the HiST paper: flattened R² and Pearson r in raw-count space.

    The prediction is mapped back to counts as ``P = max(expm1(pred_log), 0)`` (HiST's ``ReLU(expm1(ŷ))``) and
    compared with the raw counts ``T`` over the flattened spot x gene entries: ``r2 = r2_flat(P, T)`` and
    ``pcc = pcc_flat(P, T)``. This only means something when ``pred_log`` predicts ``log1p(raw counts)`` with no
    library-size normalisation (HiST's target, ``stpred.pp.normalize(method="log1p")``); on other targets
    (``"log_share"``) ``expm1`` does not return counts and the numbers are not HiST's.

    Parameters
    ----------
    pred_log
        ``(n_spots, n_genes)`` predictions of ``log1p(counts)``.
    raw_counts
        ``(n_spots, n_genes)`` raw counts of the same genes (numpy or scipy.sparse).
    groups
        Optional section label of each spot. When given, the metrics are also computed per section and averaged
        without weights (HiST's ``"slide_avg"``).

    Returns
    -------
    ``{"hist_r2_flat", "hist_pcc_flat"}`` over all spots pooled (HiST's ``"spot"`` metrics); with ``groups`` also
    ``{"hist_r2_flat_slide_avg", "hist_pcc_flat_slide_avg"}``.
    """
    p, t = _check_pair(pred_log, raw_counts, matrix=True)
    with np.errstate(over="ignore"):
        counts = np.maximum(np.expm1(p), 0.0)
    if not np.isfinite(counts).all():
        msg = "`expm1(pred_log)` overflows; `pred_log` must be on the log1p scale (values below ~700)."
        raise ValueError(msg)
    out = {"hist_r2_flat": r2_flat(counts, t), "hist_pcc_flat": pcc_flat(counts, t)}
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (p.shape[0],):
            msg = f"`groups` must have one label per spot ({p.shape[0]}), found shape {g.shape}."
            raise ValueError(msg)
        per = [(r2_flat(counts[g == k], t[g == k]), pcc_flat(counts[g == k], t[g == k])) for k in np.unique(g)]
        out["hist_r2_flat_slide_avg"] = float(np.mean([r for r, _ in per]))
        out["hist_pcc_flat_slide_avg"] = float(np.mean([c for _, c in per]))
    return out


# --------------------------------------------------------------------------------------------------- torch metrics
def _check_pair_torch(pred: torch.Tensor, truth: torch.Tensor) -> None:
    if pred.shape != truth.shape or pred.ndim != 2:
        msg = f"`pred` and `truth` must be 2-D tensors of the same shape, found {tuple(pred.shape)} and {tuple(truth.shape)}."
        raise ValueError(msg)


def mse_torch(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """:func:`mse` on tensors (float64 accumulation, differentiable, on the tensors' device).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` tensors.

    Returns
    -------
    A 0-d float64 tensor.
    """
    _check_pair_torch(pred, truth)
    return ((pred.double() - truth.double()) ** 2).mean()


def mae_torch(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """:func:`mae` on tensors (float64 accumulation, differentiable).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` tensors.

    Returns
    -------
    A 0-d float64 tensor.
    """
    _check_pair_torch(pred, truth)
    return (pred.double() - truth.double()).abs().mean()


def _pearson_torch(pred: torch.Tensor, truth: torch.Tensor, dim: int) -> torch.Tensor:
    import torch

    p, t = pred.double(), truth.double()
    keep = (p.amax(dim) > p.amin(dim)) & (t.amax(dim) > t.amin(dim))
    dp = p - p.mean(dim, keepdim=True)
    dt = t - t.mean(dim, keepdim=True)
    num = (dp * dt).sum(dim)
    # the denominator of excluded slices is replaced by 1 so that gradients stay finite
    den = torch.where(keep, (dp.pow(2).sum(dim) * dt.pow(2).sum(dim)).clamp_min(1e-300).sqrt(), torch.ones_like(num))
    r = (num / den).clamp(-1.0, 1.0)
    if not keep.any():
        return torch.full((), float("nan"), dtype=torch.float64, device=p.device)
    return r[keep].mean()


def pcc_gene_torch(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """:func:`pcc_gene` on tensors (same exclusion rule, float64, differentiable).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` tensors.

    Returns
    -------
    A 0-d float64 tensor (NaN when every gene is excluded).
    """
    _check_pair_torch(pred, truth)
    return _pearson_torch(pred, truth, 0)


def pcc_spot_torch(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """:func:`pcc_spot` on tensors (same exclusion rule, float64, differentiable).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` tensors.

    Returns
    -------
    A 0-d float64 tensor (NaN when every spot is excluded).
    """
    _check_pair_torch(pred, truth)
    return _pearson_torch(pred, truth, 1)
