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
                     and prediction are both non-constant (``constant="exclude"``: the      (pooled over its test
                     others are left out and counted, ``n_genes_excluded``) or with a       sections), TRIPLEX
                     near-constant prediction scored 0 (``constant="zero"``)
``pcc_spot``         Pearson r per spot across genes, same rule over spots                  HiFusion's table ("PCC";
                     (``n_spots_excluded``)                                                 ASIGN's "pcc per patch")
``pcc_flat``         Pearson r over the flattened spot x gene matrix                        HiST (on counts, see
                                                                                            :func:`hist_metrics`)
``r2_flat``          R² = 1 - SS_res / SS_tot over the flattened spot x gene matrix         HiST (on counts)
``r2_gene``          R² per gene, averaged over the genes with non-constant truth           HEST-Benchmark (quartiles)
===================  =====================================================================  ==========================

:func:`compute_all` also reports ``frac_genes_pcc_gt_0.3``: the share of the genes with non-constant truth whose
r > 0.3 (a gene with a near-constant prediction does not count as above 0.3, whatever ``constant`` is).

**Constant and near-constant predictions.** A prediction that does not vary has no correlation. A slice (a gene
across spots, or a spot across genes) of the prediction counts as constant when its standard deviation is at most
``CONSTANT_RTOL * (|mean(pred)| + std(truth))`` with ``CONSTANT_RTOL = 1e-5``: a spread a hundred thousand times
smaller than the level of the prediction plus the spread of the truth is floating-point noise (float32 carries
about 7 digits), and a Pearson r computed on it is a random number. The rule is scale-aware (multiply prediction
and truth by any factor and the same genes are flagged). Truth counts as constant when its standard deviation is at
most ``CONSTANT_RTOL * |mean(truth)|``. ``constant="exclude"`` (default, the field's usual choice) leaves such
genes out of the mean and counts them (``n_genes_excluded``); ``constant="zero"`` scores a gene with a constant
prediction (and varying truth) as r = 0. Always read ``n_genes_excluded`` beside ``pcc_gene``: a model constant on
240 of 250 genes and good on 10 has a high ``pcc_gene`` under ``"exclude"``.

**Paired comparisons.** :func:`compare_pcc_gene` sets two predictions of the same spots side by side: the per-gene
difference in r (first minus second, near-constant predictions scored 0 so that a constant baseline can be
compared), averaged over genes per section, over sections, and on the pooled spots, each with a percentile
bootstrap interval (:func:`paired_bootstrap`) over genes and, for the mean over sections, over sections.

Notes on comparability:

- HiFusion's PCC is ``pcc_spot``; it adds ``1e-8`` inside the square root, so a constant spot scores 0 there,
  whereas here it is excluded and counted.
- HiST's numbers are :func:`hist_metrics`: ``r2_flat`` and ``pcc_flat`` computed on ``relu(expm1(pred))`` against
  the raw counts, per section (``"slide_avg"``) and pooled (``"spot"``). Flattened metrics largely reward getting
  each gene's mean level right and are much higher than ``pcc_gene``.
- MMAP's PCC is ``pcc_gene`` on the test sections *pooled*; pooling rewards between-section offsets. The headline
  is the mean of the per-section values; ``stpred.tl.evaluate`` reports both, labelled.

Inputs containing NaN or infinite values are rejected with a :class:`ValueError`: an undefined prediction is a bug
upstream, and silently skipping it would flatter the score.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "calibration",
    "compare_pcc_gene",
    "compute_all",
    "hist_metrics",
    "mae",
    "mae_torch",
    "mse",
    "mse_torch",
    "paired_bootstrap",
    "pcc_flat",
    "pcc_gene",
    "pcc_gene_torch",
    "pcc_per_gene",
    "pcc_per_gene_by_group",
    "pcc_per_spot",
    "pcc_spot",
    "pcc_spot_torch",
    "r2_flat",
    "r2_gene",
    "r2_per_gene",
]

#: Names of the metrics returned by :func:`compute_all`, in order.
METRICS = ("mse", "mae", "pcc_gene", "pcc_spot", "pcc_flat", "r2_flat", "r2_gene")

#: Relative tolerance below which a prediction (or truth) counts as constant; see the module docstring.
CONSTANT_RTOL = 1e-5
#: Threshold of ``frac_genes_pcc_gt_0.3``.
PCC_THRESHOLD = 0.3
#: Name of the share of genes with r above :data:`PCC_THRESHOLD`.
FRAC_NAME = "frac_genes_pcc_gt_0.3"

Constant = Literal["exclude", "zero"]

#: One line per reported quantity; copied into the protocol of every results table.
DEFINITIONS = {
    "mse": "mean of (pred - truth)^2 over all spot x gene entries",
    "mae": "mean of |pred - truth| over all spot x gene entries",
    "pcc_gene": "Pearson r of each gene across spots, averaged over genes (see constant rule)",
    "pcc_spot": "Pearson r of each spot across genes, averaged over spots (same constant rule)",
    "pcc_flat": "Pearson r over the flattened spot x gene matrix",
    "r2_flat": "1 - SS_res/SS_tot over the flattened spot x gene matrix (one overall mean)",
    "r2_gene": "R^2 of each gene across spots, averaged over genes with non-constant truth",
    FRAC_NAME: "share of the genes with non-constant truth whose r > 0.3 (constant predictions count as r = 0)",
    "n_genes_excluded": "genes left out of pcc_gene (constant truth, or constant prediction with constant='exclude')",
    "n_genes_constant": "genes with varying truth whose prediction is (near-)constant: excluded or scored 0",
    "n_spots_excluded": "spots left out of pcc_spot",
    "n_genes_excluded_r2": "genes left out of r2_gene (constant truth)",
    "hist_r2_flat": "HiST's R^2: r2_flat of max(expm1(pred), 0) against raw counts",
    "hist_pcc_flat": "HiST's PCC: pcc_flat of max(expm1(pred), 0) against raw counts",
    "pcc_gene_diff": (
        "paired per-gene difference in r, model minus comparator (constant predictions scored 0), averaged over "
        "genes; 95 % percentile bootstrap intervals over genes and over sections"
    ),
    "constant rule": (
        "a prediction counts as constant when its sd <= 1e-5 * (|mean(pred)| + sd(truth)); truth when its sd <= "
        "1e-5 * |mean(truth)|"
    ),
    "mean_over_sections": "unweighted mean of the per-section values: the headline",
    "pooled": "the metric over the spots of all sections stacked; pcc_gene pooled rewards per-section offsets",
}


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


def _check_constant(constant: str) -> None:
    if constant not in ("exclude", "zero"):
        msg = f"`constant` must be 'exclude' or 'zero', found {constant!r}."
        raise ValueError(msg)


def _truth_flat(t: np.ndarray, axis: int) -> np.ndarray:
    return (np.ptp(t, axis=axis) == 0) | (t.std(axis=axis) <= CONSTANT_RTOL * np.abs(t.mean(axis=axis)))


def _flat_masks(p: np.ndarray, t: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pred_flat, truth_flat)``: slices along ``axis`` that count as constant (see :data:`CONSTANT_RTOL`)."""
    sd_p, sd_t = p.std(axis=axis), t.std(axis=axis)
    truth_flat = _truth_flat(t, axis)
    pred_flat = (np.ptp(p, axis=axis) == 0) | (sd_p <= CONSTANT_RTOL * (np.abs(p.mean(axis=axis)) + sd_t))
    return pred_flat, truth_flat


def _pearson_along(p: np.ndarray, t: np.ndarray, axis: int, constant: Constant = "exclude") -> np.ndarray:
    """Pearson r along ``axis`` (float64).

    NaN where the truth is constant, and where the prediction is constant with ``constant="exclude"`` (0 with
    ``"zero"``).
    """
    pred_flat, truth_flat = _flat_masks(p, t, axis)
    keep = ~pred_flat & ~truth_flat
    dp = p - p.mean(axis=axis, keepdims=True)
    dt = t - t.mean(axis=axis, keepdims=True)
    num = (dp * dt).sum(axis=axis)
    den = np.sqrt((dp * dp).sum(axis=axis) * (dt * dt).sum(axis=axis))
    r = np.full(num.shape, np.nan)
    r[keep] = np.clip(num[keep] / den[keep], -1.0, 1.0)
    if constant == "zero":
        r[pred_flat & ~truth_flat] = 0.0
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


def pcc_per_gene(pred: Any, truth: Any, *, constant: Constant = "exclude") -> np.ndarray:
    """Pearson r of each gene across spots.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.
    constant
        ``"exclude"``: leave out genes whose prediction is (near-)constant (NaN); ``"zero"``: score them r = 0.
        Genes with constant truth are NaN either way (see :data:`CONSTANT_RTOL`).

    Returns
    -------
    ``(n_genes,)`` float64 array; NaN for the genes left out of :func:`pcc_gene`.
    """
    _check_constant(constant)
    p, t = _check_pair(pred, truth, matrix=True)
    return _pearson_along(p, t, axis=0, constant=constant)


def pcc_gene(pred: Any, truth: Any, *, constant: Constant = "exclude") -> float:
    """Mean over genes of the Pearson r across spots (the field's standard PCC).

    Genes whose truth is constant across spots have no correlation and are left out. Genes whose prediction is
    (near-)constant are left out too (``constant="exclude"``) or scored 0 (``"zero"``); count them with
    ``np.isnan(pcc_per_gene(pred, truth)).sum()`` or read ``n_genes_excluded`` from :func:`compute_all`, and
    always report that count beside the mean.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.
    constant
        ``"exclude"``: leave out genes whose prediction is (near-)constant (NaN); ``"zero"``: score them r = 0.
        Genes with constant truth are NaN either way (see :data:`CONSTANT_RTOL`).

    Returns
    -------
    The mean r, or NaN (with a :class:`RuntimeWarning`) when every gene is excluded.

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.random.default_rng(0).normal(size=(50, 4))
    >>> pred = truth.copy()
    >>> pred[:, 1:] = 1.0  # constant on 3 of 4 genes
    >>> pcc_gene(pred, truth), pcc_gene(pred, truth, constant="zero")
    (1.0, 0.25)
    """
    return _mean_or_nan(pcc_per_gene(pred, truth, constant=constant), what="gene")


def pcc_per_spot(pred: Any, truth: Any, *, constant: Constant = "exclude") -> np.ndarray:
    """Pearson r of each spot across genes.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.
    constant
        ``"exclude"``: leave out spots whose prediction is (near-)constant (NaN); ``"zero"``: score them r = 0.
        Spots with constant truth are NaN either way (see :data:`CONSTANT_RTOL`).

    Returns
    -------
    ``(n_spots,)`` float64 array; NaN for the spots left out of :func:`pcc_spot`.
    """
    _check_constant(constant)
    p, t = _check_pair(pred, truth, matrix=True)
    return _pearson_along(p, t, axis=1, constant=constant)


def pcc_spot(pred: Any, truth: Any, *, constant: Constant = "exclude") -> float:
    """Mean over spots of the Pearson r across genes (HiFusion's "PCC").

    Spots whose truth is constant across genes are left out; spots with a (near-)constant prediction are left out
    (``constant="exclude"``) or scored 0 (``"zero"``, HiFusion's choice).

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.
    constant
        ``"exclude"``: leave out spots whose prediction is (near-)constant (NaN); ``"zero"``: score them r = 0.
        Spots with constant truth are NaN either way (see :data:`CONSTANT_RTOL`).

    Returns
    -------
    The mean r, or NaN (with a :class:`RuntimeWarning`) when every spot is excluded.
    """
    return _mean_or_nan(pcc_per_spot(pred, truth, constant=constant), what="spot")


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
    keep = ~_truth_flat(t, axis)
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


def compute_all(pred: Any, truth: Any, *, constant: Constant = "exclude") -> dict[str, float]:
    """Every metric of the table in :mod:`stpred.metrics`, in one pass.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.
    constant
        How ``pcc_gene`` and ``pcc_spot`` treat a (near-)constant prediction: ``"exclude"`` or ``"zero"`` (see
        :func:`pcc_gene`).

    Returns
    -------
    ``{"mse", "mae", "pcc_gene", "pcc_spot", "pcc_flat", "r2_flat", "r2_gene", "frac_genes_pcc_gt_0.3"}`` as
    floats, plus as ints ``"n_genes_excluded"`` (genes left out of ``pcc_gene``), ``"n_genes_constant"`` (genes
    with varying truth whose prediction is near-constant: excluded or scored 0), ``"n_spots_excluded"`` (spots left
    out of ``pcc_spot``) and ``"n_genes_excluded_r2"`` (genes left out of ``r2_gene``).

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.random.default_rng(0).normal(size=(50, 4))
    >>> compute_all(truth + 0.1, truth)["pcc_gene"]
    1.0
    """
    _check_constant(constant)
    p, t = _check_pair(pred, truth, matrix=True)
    r_gene = _pearson_along(p, t, axis=0, constant=constant)
    r_spot = _pearson_along(p, t, axis=1, constant=constant)
    pred_flat, truth_flat = _flat_masks(p, t, axis=0)
    r2g = _r2_along(p, t, axis=0)
    flat_p, flat_t = p.reshape(-1, 1), t.reshape(-1, 1)
    n_scorable = int((~truth_flat).sum())
    r_zero = np.where(pred_flat & ~truth_flat, 0.0, r_gene)
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
            FRAC_NAME: float((r_zero > PCC_THRESHOLD).sum() / n_scorable) if n_scorable else float("nan"),
        }
    out["n_genes_excluded"] = int(np.isnan(r_gene).sum())
    out["n_genes_constant"] = int((pred_flat & ~truth_flat).sum())
    out["n_spots_excluded"] = int(np.isnan(r_spot).sum())
    out["n_genes_excluded_r2"] = int(np.isnan(r2g).sum())
    return out


# --------------------------------------------------------------------------------------------------- comparisons
def pcc_per_gene_by_group(
    pred: Any,
    truth: Any,
    groups: Sequence[Any] | np.ndarray,
    *,
    constant: Constant = "zero",
) -> tuple[list[str], np.ndarray]:
    """Pearson r of each gene across the spots of each group (section) separately.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` arrays; NaN/inf are rejected.
    groups
        Group label of each spot.
    constant
        As in :func:`pcc_per_gene`; ``"zero"`` by default, the rule of paired comparisons.

    Returns
    -------
    ``(labels, r)``: the group labels in order of first appearance and an ``(n_groups, n_genes)`` array.

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.random.default_rng(0).normal(size=(40, 3))
    >>> labels, r = pcc_per_gene_by_group(truth, truth, ["a"] * 20 + ["b"] * 20)
    >>> labels, r.shape
    (['a', 'b'], (2, 3))
    """
    _check_constant(constant)
    p, t = _check_pair(pred, truth, matrix=True)
    g = np.asarray(groups).astype(str)
    if g.shape != (p.shape[0],):
        msg = f"`groups` must have one label per spot ({p.shape[0]}), found shape {g.shape}."
        raise ValueError(msg)
    labels = list(dict.fromkeys(g.tolist()))
    r = np.stack([_pearson_along(p[g == k], t[g == k], axis=0, constant=constant) for k in labels])
    return labels, r


def _check_boot(n_boot: int, ci: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        msg = f"`n_boot` must be a positive int, found {n_boot!r}."
        raise ValueError(msg)
    if not 0.0 < float(ci) < 1.0:
        msg = f"`ci` must lie strictly between 0 and 1 (e.g. 0.95), found {ci!r}."
        raise ValueError(msg)


def _quantiles(stats: np.ndarray, ci: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return float(lo), float(hi)


def paired_bootstrap(
    diff: Any,
    *,
    over: Literal["genes", "sections"] = "genes",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, float]:
    """Percentile bootstrap interval of a mean paired difference, resampling genes or sections.

    The statistic is the mean over sections of the mean over genes of ``diff`` (NaN entries, e.g. genes with
    constant truth in a section, are skipped). ``over="genes"`` draws ``n_genes`` genes with replacement (the same
    draw in every section) ``n_boot`` times; ``over="sections"`` draws sections with replacement and averages their
    per-section means. All draws are made at once from multinomial counts, so the cost is two small matrix
    products, not a Python loop.

    Parameters
    ----------
    diff
        ``(n_sections, n_genes)`` per-gene differences (e.g. r of a model minus r of a baseline per section), or
        ``(n_genes,)`` for one section.
    over
        Unit of resampling: ``"genes"`` or ``"sections"`` (needs two or more sections with a defined mean;
        otherwise the interval is NaN).
    n_boot
        Number of bootstrap resamples.
    seed
        Seed of the :func:`numpy.random.default_rng` generator (same seed, same interval).
    ci
        Coverage of the interval.

    Returns
    -------
    ``{"estimate", "ci_low", "ci_high", "n_genes", "n_sections", "n_boot"}``; ``estimate`` is the statistic on the
    data, ``n_genes`` the genes with at least one defined difference, ``n_sections`` the sections with a defined
    mean.

    Examples
    --------
    >>> import numpy as np
    >>> d = np.random.default_rng(0).normal(0.1, 0.05, size=(4, 200))
    >>> out = paired_bootstrap(d, over="genes", n_boot=500, seed=0)
    >>> out["ci_low"] < 0.1 < out["ci_high"]
    True
    """
    _check_boot(n_boot, ci)
    if over not in ("genes", "sections"):
        msg = f"`over` must be 'genes' or 'sections', found {over!r}."
        raise ValueError(msg)
    d = _as_float64(diff, name="diff")
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.size == 0:
        msg = f"Expected `diff` of shape (n_sections, n_genes) or (n_genes,), found shape {d.shape}."
        raise ValueError(msg)
    if np.isinf(d).any():
        msg = "`diff` contains infinite values; differences of correlations lie in [-2, 2]."
        raise ValueError(msg)
    valid = ~np.isnan(d)
    genes = valid.any(axis=0)
    d, valid = d[:, genes], valid[:, genes]
    section_means = np.array([row[ok].mean() if ok.any() else np.nan for row, ok in zip(d, valid, strict=True)])
    sections = np.isfinite(section_means)
    out = {
        "estimate": float(section_means[sections].mean()) if sections.any() else float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "n_genes": int(genes.sum()),
        "n_sections": int(sections.sum()),
        "n_boot": int(n_boot),
    }
    rng = np.random.default_rng(seed)
    if over == "genes" and out["n_genes"] > 0:
        n = d.shape[1]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (n_boot, n_genes)
        num = counts @ np.where(valid, d, 0.0).T  # (n_boot, n_sections)
        den = counts @ valid.T.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            per = np.where(den > 0, num / den, np.nan)
        defined = np.isfinite(per)
        stats = np.where(defined.any(axis=1), np.nansum(per, axis=1) / np.maximum(defined.sum(axis=1), 1), np.nan)
        out["ci_low"], out["ci_high"] = _quantiles(stats, ci)
    elif over == "sections" and out["n_sections"] >= 2:
        m = section_means[sections]
        k = m.size
        counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)
        out["ci_low"], out["ci_high"] = _quantiles(counts @ m / k, ci)
    return out


def compare_pcc_gene(
    pred: Any,
    other: Any,
    truth: Any,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> list[dict[str, Any]]:
    """Paired per-gene PCC difference of two predictions of the same spots, with bootstrap intervals.

    For every gene, ``r(pred) - r(other)`` against the same truth; a (near-)constant prediction scores r = 0 (so a
    constant baseline such as the training mean can be compared), genes with constant truth are left out.

    Parameters
    ----------
    pred, other
        ``(n_spots, n_genes)`` predictions (``pred`` is the model, ``other`` the comparator); NaN/inf are rejected.
    truth
        ``(n_spots, n_genes)`` measured values.
    groups
        Section of each spot (``None``: one group).
    n_boot, seed, ci
        As in :func:`paired_bootstrap`.

    Returns
    -------
    One dict per row, with keys ``group`` (each section, ``"mean_over_sections"`` and ``"pooled"``),
    ``difference`` (mean paired difference), ``pcc_gene``, ``pcc_gene_other`` (each side's mean r under the
    comparison rule), ``ci_low_genes``, ``ci_high_genes`` (resampling genes), ``ci_low_sections``,
    ``ci_high_sections`` (resampling sections; only for ``"mean_over_sections"``, NaN elsewhere and with fewer
    than two sections), ``n_genes``, ``n_sections``, ``n_spots``. ``"mean_over_sections"`` is the headline;
    ``"pooled"`` correlates over the spots of all sections stacked, which rewards getting per-section offsets
    right.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.normal(size=(60, 30))
    >>> good, bad = truth + rng.normal(size=truth.shape), truth + 3 * rng.normal(size=truth.shape)
    >>> rows = compare_pcc_gene(good, bad, truth, groups=["a"] * 30 + ["b"] * 30, n_boot=200)
    >>> rows[2]["group"], rows[2]["difference"] > 0
    ('mean_over_sections', True)
    """
    _check_boot(n_boot, ci)
    p, t = _check_pair(pred, truth, matrix=True)
    o, _ = _check_pair(other, truth, matrix=True)
    g = np.zeros(p.shape[0], dtype=str) if groups is None else np.asarray(groups).astype(str)
    labels, r_p = pcc_per_gene_by_group(p, t, g, constant="zero")
    _, r_o = pcc_per_gene_by_group(o, t, g, constant="zero")
    diff = r_p - r_o
    nan = float("nan")

    def _row(group: str, dd: np.ndarray, rp: np.ndarray, ro: np.ndarray, n_spots: int, sections: bool) -> dict:
        by_gene = paired_bootstrap(dd, over="genes", n_boot=n_boot, seed=seed, ci=ci)
        by_section = paired_bootstrap(dd, over="sections", n_boot=n_boot, seed=seed, ci=ci) if sections else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_p = float(np.nanmean(np.nanmean(rp, axis=1))) if np.isfinite(rp).any() else nan
            mean_o = float(np.nanmean(np.nanmean(ro, axis=1))) if np.isfinite(ro).any() else nan
        return {
            "group": group,
            "difference": by_gene["estimate"],
            "pcc_gene": mean_p,
            "pcc_gene_other": mean_o,
            "ci_low_genes": by_gene["ci_low"],
            "ci_high_genes": by_gene["ci_high"],
            "ci_low_sections": by_section.get("ci_low", nan),
            "ci_high_sections": by_section.get("ci_high", nan),
            "n_genes": by_gene["n_genes"],
            "n_sections": by_gene["n_sections"],
            "n_spots": n_spots,
        }

    rows = [
        _row(k, diff[i : i + 1], r_p[i : i + 1], r_o[i : i + 1], int((g == k).sum()), sections=False)
        for i, k in enumerate(labels)
    ]
    rows.append(_row("mean_over_sections", diff, r_p, r_o, p.shape[0], sections=True))
    pooled_p = _pearson_along(p, t, axis=0, constant="zero")[None, :]
    pooled_o = _pearson_along(o, t, axis=0, constant="zero")[None, :]
    rows.append(_row("pooled", pooled_p - pooled_o, pooled_p, pooled_o, p.shape[0], sections=False))
    return rows


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


# --------------------------------------------------------------------------------------------------- uncertainty
def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks (1-based, ties averaged) of each column of ``a``."""
    ranks = np.empty_like(a, dtype=np.float64)
    for j in range(a.shape[1]):
        _, inverse, counts = np.unique(a[:, j], return_inverse=True, return_counts=True)
        last = np.cumsum(counts)
        ranks[:, j] = (last - (counts - 1) / 2.0)[inverse]
    return ranks


def calibration(pred: Any, truth: Any, std: Any, *, z: float = 1.96) -> dict[str, Any]:
    """How well a predicted standard deviation ``std`` tracks the error of ``pred``.

    Two views. **Ranking**: per gene, the Spearman correlation across spots between ``std`` and the absolute error
    ``|pred - truth|`` (does the model know *where* it is wrong?); genes whose ``std`` or error is constant are
    left out and counted. **Coverage**: the share of spot x gene entries with ``|pred - truth| <= z · std``; for a
    Gaussian predictive distribution with this std, ``z = 1.96`` should cover 95 %. Lower coverage means
    over-confidence. A deep ensemble's or MC-dropout's spread measures the model's (epistemic) uncertainty only,
    not the measurement noise of the truth, so coverage well below nominal is expected for count data.

    Parameters
    ----------
    pred, truth
        ``(n_spots, n_genes)`` prediction (the mean) and measured expression.
    std
        ``(n_spots, n_genes)`` predicted standard deviation (non-negative).
    z
        Half-width of the interval in standard deviations (positive).

    Returns
    -------
    ``spearman_std_abs_error`` (median over genes), ``spearman_std_abs_error_mean``,
    ``spearman_per_gene`` (array, NaN where excluded), ``n_genes_excluded``, ``coverage`` (share of entries
    inside ``pred ± z·std``), ``nominal`` (the Gaussian coverage of ``z``), ``z``, ``mean_std``, ``mae``.

    Examples
    --------
    >>> table = sdata.tables["stpred"]
    >>> rows = table.obs["section"] == "S2"
    >>> stpred.metrics.calibration(
    ...     table.layers["stpred_hifusion"][rows], table.layers["target"][rows], table.layers["stpred_hifusion_std"][rows]
    ... )["coverage"]
    """
    import math

    p, t = _check_pair(pred, truth, matrix=True)
    sd, _ = _check_pair(std, truth, matrix=True)
    if (sd < 0).any():
        msg = f"`std` has {int((sd < 0).sum())} negative value(s); a standard deviation is non-negative."
        raise ValueError(msg)
    if isinstance(z, bool) or not isinstance(z, int | float) or not math.isfinite(z) or z <= 0:
        msg = f"Expected `z` to be a finite positive number, found {z!r}."
        raise ValueError(msg)
    err = np.abs(p - t)
    rho = _pearson_along(_average_ranks(sd), _average_ranks(err), axis=0)
    kept = rho[~np.isnan(rho)]
    if kept.size == 0:
        warnings.warn(
            "Every gene was excluded (constant std or error); the Spearman summary is NaN.", RuntimeWarning, stacklevel=2
        )
    return {
        "spearman_std_abs_error": float(np.median(kept)) if kept.size else float("nan"),
        "spearman_std_abs_error_mean": float(kept.mean()) if kept.size else float("nan"),
        "spearman_per_gene": rho,
        "n_genes_excluded": int(np.isnan(rho).sum()),
        "coverage": float((err <= z * sd).mean()),
        "nominal": float(math.erf(z / math.sqrt(2.0))),
        "z": float(z),
        "mean_std": float(sd.mean()),
        "mae": float(err.mean()),
    }


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
    dp = p - p.mean(dim, keepdim=True)
    dt = t - t.mean(dim, keepdim=True)
    with torch.no_grad():  # the same near-constant rule as the numpy functions (population sd)
        sd_p, sd_t = dp.pow(2).mean(dim).sqrt(), dt.pow(2).mean(dim).sqrt()
        truth_flat = (t.amax(dim) == t.amin(dim)) | (sd_t <= CONSTANT_RTOL * t.mean(dim).abs())
        pred_flat = (p.amax(dim) == p.amin(dim)) | (sd_p <= CONSTANT_RTOL * (p.mean(dim).abs() + sd_t))
        keep = ~pred_flat & ~truth_flat
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
