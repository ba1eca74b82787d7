"""Scores: per-model bars and paired differences from ``tl.evaluate`` / ``tl.cross_validate``; best and worst genes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import SECTION_KEY, STPRED_TABLE, TARGET_LAYER
from .._docs import doc_params, doc_sdata
from .._validate import check_one_of, check_positive, check_sections, get_table
from ._utils import check_axes, doc_show_save, finish, new_axes

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_REQUIRED = ("key", "metric", "value")
_AXIS_LABELS = {
    "pcc_gene": "PCC per gene (mean)",
    "pcc_spot": "PCC per spot (mean)",
    "pcc_flat": "PCC (flattened)",
    "r2_gene": "R² per gene (mean)",
    "r2_flat": "R² (flattened)",
    "mse": "MSE",
    "mae": "MAE",
    "frac_genes_pcc_gt_0.3": "share of genes with r > 0.3",
}
#: ``group`` values that are not sections.
_SUMMARY_GROUPS = ("pooled", "mean_over_sections")
_DIFF_METRIC = "pcc_gene_diff"


def _metrics_frame(result: Any) -> pd.DataFrame:
    frame = getattr(result, "metrics", result)
    if not isinstance(frame, pd.DataFrame):
        msg = (
            "Expected a tidy metrics DataFrame (from `stpred.tl.evaluate`) or an object with a `.metrics` DataFrame "
            f"(a `CVResult`), found {type(result).__name__}."
        )
        raise TypeError(msg)
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing or not ({"section", "group"} & set(frame.columns)):
        msg = (
            f"The metrics frame lacks column(s) {missing or ['section']}; found {list(frame.columns)}. "
            "Expected the output of `stpred.tl.evaluate` (columns key, section, metric, value, n_spots)."
        )
        raise KeyError(msg)
    return frame


def scores_data(
    result: Any,
    *,
    metric: str = "pcc_gene",
    by: str = "model",
    hue: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Data behind :func:`scores`.

    Parameters
    ----------
    result, metric, by, hue
        As in :func:`scores`.

    Returns
    -------
    summary
        One row per ``by`` (and ``hue``) group with columns ``mean``, ``sd`` (over sections, ``ddof=1``; 0 for one
        section), ``n`` (number of defined section values; NaN values, e.g. the PCC of a constant prediction, are
        skipped) and ``pooled`` (the ``"pooled"`` value, averaged over folds when
        there are several; NaN when absent), in order of first appearance. ``"mean_over_sections"`` rows of the
        input are not sections and are left out (``mean`` recomputes them).
    points
        The per-section rows that make up each bar (columns of the input; the group column is ``by``).
    """
    frame = _metrics_frame(result).copy()
    section = "section" if "section" in frame.columns else "group"
    if by == "model" and "model" not in frame.columns:
        by = "key"
    for name, col in (("by", by), ("hue", hue)):
        if col is not None and col not in frame.columns:
            msg = f"No column {col!r} (`{name}`) in the metrics frame; found {list(frame.columns)}."
            raise KeyError(msg)
    available = list(dict.fromkeys(frame["metric"].astype(str)))
    if metric not in available:
        msg = f"Unknown metric {metric!r}; the frame has {available}."
        raise ValueError(msg)
    if metric == _DIFF_METRIC:
        msg = f"Draw {_DIFF_METRIC!r} with `stpred.pl.scores(result, kind='difference')`."
        raise ValueError(msg)
    frame = frame[(frame["metric"] == metric) & (frame[section].astype(str) != "mean_over_sections")]
    keys = [by] if hue is None or hue == by else [by, hue]
    for k in keys:
        frame[k] = frame[k].astype(str)
    is_pooled = frame[section].astype(str) == "pooled"
    points = frame[~is_pooled]
    if points.empty:  # only pooled values (e.g. `evaluate(groupby=None)`): one bar per group, no spread
        points = frame[is_pooled]
    grouped = points.groupby(keys, sort=False)["value"]
    summary = pd.DataFrame({"mean": grouped.mean(), "sd": grouped.std(ddof=1).fillna(0.0), "n": grouped.count()})
    pooled = frame[is_pooled].groupby(keys, sort=False)["value"].mean()
    summary["pooled"] = pooled.reindex(summary.index)
    return summary.reset_index(), points.reset_index(drop=True)


def difference_data(result: Any, *, key: str | None = None) -> pd.DataFrame:
    """Data behind ``scores(kind="difference")``: the paired per-gene PCC differences with their intervals.

    Parameters
    ----------
    result
        A tidy frame from :func:`stpred.tl.evaluate` called with ``compare=``, or a :class:`stpred.tl.CVResult`
        (its ``overall`` frame: every test spot of every fold).
    key
        Keep only this model layer (``None``: all).

    Returns
    -------
    One row per model, comparator and group with columns ``key``, ``comparator``, ``group``, ``value`` (mean paired
    difference, model minus comparator), ``ci_low_genes``, ``ci_high_genes``, ``ci_low_sections``,
    ``ci_high_sections``, ``n_spots``; sections first (in order of appearance), then ``"mean_over_sections"`` (the
    headline), then ``"pooled"``.
    """
    frame = getattr(result, "overall", None)
    frame = _metrics_frame(result if frame is None else frame)
    group = "group" if "group" in frame.columns else "section"
    diff = frame[frame["metric"] == _DIFF_METRIC]
    if diff.empty or "comparator" not in diff.columns:
        msg = (
            f"The metrics frame has no {_DIFF_METRIC!r} rows; run `stpred.tl.evaluate(sdata, key, "
            "compare=[...])` or `stpred.tl.cross_validate(..., baseline=True)`."
        )
        raise ValueError(msg)
    if key is not None:
        if key not in set(diff["key"]):
            msg = f"No comparison for key {key!r}; found {sorted(set(diff['key']))}."
            raise KeyError(msg)
        diff = diff[diff["key"] == key]
    columns = ["key", "comparator", group, "value", "ci_low_genes", "ci_high_genes", "ci_low_sections"]
    columns += ["ci_high_sections", "n_spots"]
    out = diff[columns].rename(columns={group: "group"}).copy()
    out["group"] = out["group"].astype(str)
    sections = [g for g in dict.fromkeys(out["group"]) if g not in _SUMMARY_GROUPS]
    rank = {g: i for i, g in enumerate([*sections, "mean_over_sections", "pooled"])}
    pairs = {p: i for i, p in enumerate(dict.fromkeys(zip(out["key"], out["comparator"], strict=True)))}
    out["_pair"] = [pairs[p] for p in zip(out["key"], out["comparator"], strict=True)]
    out["_rank"] = out["group"].map(rank)
    out = out.sort_values(["_pair", "_rank"], kind="stable").drop(columns=["_pair", "_rank"])
    return out.reset_index(drop=True)


def _draw_difference(data: pd.DataFrame, ax: Axes | None) -> tuple[Figure, Axes]:
    groups = list(dict.fromkeys(data["group"]))
    pairs = list(dict.fromkeys(zip(data["key"], data["comparator"], strict=True)))
    fig, ax = new_axes(ax, figsize=(max(3.5, 0.8 * len(groups) + 2.0), 3.6))
    import matplotlib as mpl

    palette = mpl.colormaps["tab10"].colors
    width = 0.7 / len(pairs)
    sections_ci_drawn = False
    for i, (key, comparator) in enumerate(pairs):
        sub = data[(data["key"] == key) & (data["comparator"] == comparator)]
        x = np.array([groups.index(g) for g in sub["group"]]) - 0.35 + width * (i + 0.5)
        v = sub["value"].to_numpy(dtype=float)
        lo, hi = sub["ci_low_genes"].to_numpy(dtype=float), sub["ci_high_genes"].to_numpy(dtype=float)
        color = palette[i % len(palette)]
        ax.errorbar(
            x,
            v,
            yerr=np.vstack([v - lo, hi - v]),
            fmt="o",
            color=color,
            capsize=3,
            lw=1.2,
            label=f"{key} − {comparator}",
            zorder=3,
        )
        s_lo, s_hi = sub["ci_low_sections"].to_numpy(dtype=float), sub["ci_high_sections"].to_numpy(dtype=float)
        finite = np.isfinite(s_lo) & np.isfinite(s_hi)
        if finite.any():
            ax.errorbar(
                x[finite] + 0.12 * width,
                v[finite],
                yerr=np.vstack([v[finite] - s_lo[finite], s_hi[finite] - v[finite]]),
                fmt="none",
                ecolor=color,
                elinewidth=0.8,
                capsize=2,
                linestyle=":",
                zorder=2,
                label=None if sections_ci_drawn else "95 % CI over sections",
            )
            sections_ci_drawn = True
    ax.axhline(0, color="grey", lw=0.8, zorder=0)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.replace("mean_over_sections", "mean over\nsections") for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("Δ PCC per gene (model − comparator)")
    ax.set_title("paired per-gene PCC difference, 95 % bootstrap CI over genes", fontsize="medium")
    ax.legend(fontsize="small", frameon=False, loc="best")
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


@doc_params(show_save=doc_show_save)
def scores(
    result: Any,
    *,
    metric: str = "pcc_gene",
    by: str = "model",
    hue: str | None = None,
    kind: Literal["bars", "difference"] = "bars",
    key: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Bar chart of one metric per model (or any group) with its spread over sections, or the paired comparison.

    ``kind="bars"``: each bar is the mean over the per-section values (the headline), the error bar their standard
    deviation, the dots the sections themselves, and the diamond the value on all test spots pooled (the papers'
    usual number, which rewards per-section offsets; averaged over folds for a cross-validation).

    ``kind="difference"``: the paired per-gene PCC difference of each model and comparator (from
    ``tl.evaluate(..., compare=[...])`` or a cross-validation with its training-mean baseline) per section, over
    sections (the headline) and pooled, with 95 % bootstrap intervals over genes (solid) and over sections
    (dotted, for the mean over sections); a difference whose interval excludes 0 is a real gain or loss.

    Parameters
    ----------
    result
        Tidy metrics from :func:`stpred.tl.evaluate` (or several concatenated, possibly with extra ``model`` and
        ``fold`` columns), or an object with a ``.metrics`` DataFrame such as :class:`stpred.tl.CVResult`.
    metric
        Metric to show (a value of the ``metric`` column).
    by
        Column that defines the bars. ``"model"`` falls back to ``"key"`` (the prediction layer) when the frame
        has no ``model`` column.
    hue
        Optional second column: grouped bars of different colours within each ``by`` group (e.g. ``by="section",
        hue="key"``).
    kind
        ``"bars"`` or ``"difference"`` (``metric``, ``by`` and ``hue`` are not used then).
    key
        With ``kind="difference"``: only this model layer (``None``: every compared layer).
    ax
        Axes to draw on; ``None`` creates a figure.
    {show_save}

    Returns
    -------
    The axes, or ``None`` when the figure was shown.

    Examples
    --------
    >>> scores = stpred.tl.evaluate(sdata, "stpred_hist", compare=["baseline_mean"])
    >>> stpred.pl.scores(scores)
    >>> stpred.pl.scores(scores, kind="difference")
    """
    check_one_of(kind, ("bars", "difference"), name="kind")
    if kind == "difference":
        fig, ax = _draw_difference(difference_data(result, key=key), ax)
        return finish(fig, ax, show=show, save=save)
    if key is not None:
        msg = "`key=` selects a model of `kind='difference'`; for bars, filter the frame instead."
        raise TypeError(msg)
    summary, points = scores_data(result, metric=metric, by=by, hue=hue)
    by = summary.columns[0]
    hue_col = summary.columns[1] if hue is not None and hue != by else None
    groups = list(dict.fromkeys(summary[by]))
    hues = list(dict.fromkeys(summary[hue_col])) if hue_col else [None]
    per_group = 0.9 if hue_col is None else 0.45 * len(hues)
    fig_width = max(3.0, per_group * len(groups) + 1.5)
    fig, ax = new_axes(ax, figsize=(fig_width, 3.6))
    import matplotlib as mpl

    palette = mpl.colormaps["tab10"].colors
    width = 0.8 / len(hues)
    rng = np.random.default_rng(0)
    pooled_drawn = False
    for h, hue_value in enumerate(hues):
        sub = summary if hue_col is None else summary[summary[hue_col] == hue_value]
        for _, row in sub.iterrows():
            g = groups.index(row[by])
            x = g - 0.4 + width * (h + 0.5)
            color = palette[(h if hue_col else g) % len(palette)]
            label = str(hue_value) if hue_col and g == groups.index(sub[by].iloc[0]) else None
            if not np.isfinite(row["mean"]):  # e.g. pcc of a constant prediction: every gene excluded
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize="small", color="grey")
                continue
            ax.bar(x, row["mean"], width=width * 0.9, color=color, alpha=0.85, label=label, zorder=1)
            if row["n"] > 1:
                ax.errorbar(x, row["mean"], yerr=row["sd"], color="black", capsize=3, lw=1, zorder=3)
            sel = points[by] == row[by]
            if hue_col:
                sel &= points[hue_col] == hue_value
            vals = points.loc[sel, "value"].to_numpy(dtype=float)
            if row["n"] > 1:
                jitter = rng.uniform(-0.25, 0.25, len(vals)) * width
                ax.scatter(x + jitter, vals, s=12, color="black", alpha=0.6, zorder=4, linewidths=0)
            if np.isfinite(row["pooled"]):
                ax.scatter(
                    x,
                    row["pooled"],
                    marker="D",
                    s=30,
                    facecolor="white",
                    edgecolor="black",
                    zorder=5,
                    label=None if pooled_drawn else "pooled",
                )
                pooled_drawn = True
    ax.set_xticks(range(len(groups)))
    ax.set_xlim(-0.6, len(groups) - 0.4)
    # rotate the labels when the longest one (~0.085 in per character) is wider than its slot
    slot = ax.get_position().width * ax.figure.get_figwidth() / len(groups)
    rotate = max(len(str(g)) for g in groups) * 0.085 > 0.9 * slot
    ax.set_xticklabels(groups, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.axhline(0, color="grey", lw=0.8, zorder=0)
    ax.set_ylabel(_AXIS_LABELS.get(metric, metric))
    ax.set_xlabel(by)
    spread = (summary["n"] > 1).any()
    ax.set_title(f"{metric}: mean ± sd over sections" if spread else f"{metric} per {by}", fontsize="medium")
    if hue_col or pooled_drawn:
        ax.legend(fontsize="small", frameon=False, loc="best")
    ax.spines[["top", "right"]].set_visible(False)
    return finish(fig, ax, show=show, save=save)


# --------------------------------------------------------------------------------------------------- per gene
def gene_scores_data(
    sdata: SpatialData,
    key: str,
    *,
    truth: str = TARGET_LAYER,
    metric: Literal["pcc", "r2"] = "pcc",
    sections: str | Sequence[str] | None = None,
    table_key: str = STPRED_TABLE,
) -> pd.Series:
    """Data behind :func:`gene_scores`: the score of every gene, best first.

    Parameters
    ----------
    sdata, key, truth, metric, sections, table_key
        As in :func:`gene_scores`.

    Returns
    -------
    Scores indexed by gene, sorted from best to worst; genes that cannot be scored (constant truth or prediction)
    are left out and counted in ``series.attrs["n_excluded"]``; ``series.attrs["n_spots"]`` holds the number of
    spots used.
    """
    from .. import metrics
    from ._spatial import check_layers

    check_one_of(metric, ("pcc", "r2"), name="metric")
    table = get_table(sdata, table_key)
    check_layers(table, [key, truth], table_key=table_key)
    pred = np.asarray(table.layers[key], dtype=np.float64)
    true = np.asarray(table.layers[truth], dtype=np.float64)
    keep = np.isfinite(pred).all(axis=1) & np.isfinite(true).all(axis=1)
    if sections is not None:
        labels = table.obs[SECTION_KEY].astype(str)
        chosen = check_sections(sections, list(dict.fromkeys(labels)))
        keep &= labels.isin(chosen).to_numpy()
    if keep.sum() < 3:
        msg = f"Layer {key!r} has values for {int(keep.sum())} spot(s) in the chosen sections; need at least 3."
        raise ValueError(msg)
    fn = metrics.pcc_per_gene if metric == "pcc" else metrics.r2_per_gene
    per = pd.Series(fn(pred[keep], true[keep]), index=pd.Index(map(str, table.var_names), name="gene"), name=metric)
    out = per.dropna().sort_values(ascending=False, kind="stable")
    out.attrs = {"n_excluded": int(per.isna().sum()), "n_spots": int(keep.sum()), "key": key, "metric": metric}
    return out


@doc_params(sdata=doc_sdata, show_save=doc_show_save)
def gene_scores(
    sdata: SpatialData,
    key: str,
    *,
    n: int = 20,
    truth: str = TARGET_LAYER,
    metric: Literal["pcc", "r2"] = "pcc",
    sections: str | Sequence[str] | None = None,
    table_key: str = STPRED_TABLE,
    axes: Sequence[Axes] | np.ndarray | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure | None:
    """The best and the worst predicted genes, as two panels of horizontal bars.

    Each gene is scored across the spots of the chosen sections pooled (spots without a prediction are left out):
    Pearson r (``metric="pcc"``, as :func:`stpred.metrics.pcc_per_gene`) or R² (``"r2"``). Both panels share the
    x axis.

    Parameters
    ----------
    {sdata}
    key
        Prediction layer, e.g. ``"stpred_hifusion"``.
    n
        Genes per panel.
    truth
        Measured layer.
    metric
        ``"pcc"`` or ``"r2"``.
    sections
        Sections to pool (``None``: all with predictions).
    table_key
        Table with the layers.
    axes
        Two axes to draw on (best, worst); ``None`` creates a figure.
    {show_save}

    Returns
    -------
    The figure, or ``None`` when it was shown.
    """
    import matplotlib.pyplot as plt

    if not isinstance(n, int | np.integer) or isinstance(n, bool):
        msg = f"Expected `n` to be an integer, found {type(n).__name__}."
        raise TypeError(msg)
    check_positive(n, name="n")
    data = gene_scores_data(sdata, key, truth=truth, metric=metric, sections=sections, table_key=table_key)
    k = min(n, len(data))
    best = data.iloc[:k]
    worst = data.iloc[::-1].iloc[:k]
    if axes is None:
        fig, pair = plt.subplots(1, 2, figsize=(8.0, 0.24 * k + 1.4), layout="constrained", sharex=True)
    else:
        pair = check_axes(axes, 2)
        fig = pair[0].figure
    label = "Pearson r across spots" if metric == "pcc" else "R² across spots"
    lo = min(0.0, float(data.min()))
    hi = max(0.0, float(data.max()))
    pad = 0.05 * (hi - lo or 1.0)
    for ax, part, title, color in (
        (pair[0], best, f"best {k}", "#2b8cbe"),
        (pair[1], worst, f"worst {k}", "#de2d26"),
    ):
        y = np.arange(len(part))
        bars = ax.barh(y, part.to_numpy(), color=color, height=0.75)
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=2)
        ax.set_yticks(y)
        ax.set_yticklabels(part.index, fontsize="small" if k > 25 else "medium")
        ax.set_ylim(len(part) - 0.5, -0.5)  # first entry on top
        ax.set_xlim(lo - 2.5 * pad if lo < 0 else lo - pad, hi + 2.5 * pad)  # room for the value labels
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.set_title(title, fontsize="medium")
        ax.spines[["top", "right"]].set_visible(False)
    note = f" ({data.attrs['n_excluded']} constant gene(s) left out)" if data.attrs["n_excluded"] else ""
    fig.suptitle(f"{key} vs {truth}: {len(data)} genes, {data.attrs['n_spots']} spots{note}", fontsize="medium")
    return finish(fig, fig, show=show, save=save)
