"""``tl.evaluate``: every metric of :mod:`stpred.metrics`, per section, over sections and pooled, as a tidy table."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import SECTION_KEY, STPRED_TABLE, TARGET_LAYER, UNS_KEY
from .._docs import doc_params, doc_sdata_any
from .._provenance import plain, stpred_uns
from .._validate import check_one_of, check_sections
from ..io._anndata import accepts_anndata

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

#: ``group`` label of the rows that average the per-section values (the headline).
MEAN_GROUP = "mean_over_sections"
POOLED_GROUP = "pooled"
#: Extra columns of the paired-comparison rows (``metric == "pcc_gene_diff"``).
COMPARE_COLUMNS = ("comparator", "ci_low_genes", "ci_high_genes", "ci_low_sections", "ci_high_sections")
HEADLINE = (
    "pcc_gene of group 'mean_over_sections' (the unweighted mean of the per-section values) is the headline; "
    "'pooled' stacks the spots of all sections, which rewards getting per-section offsets right (MMAP's paper "
    "metric is pcc_gene pooled)"
)


def _resolve_table(data: SpatialData | AnnData, table_key: str) -> AnnData:
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    from .._validate import get_table

    return get_table(data, table_key, made_by="pp.select_genes")


def _layer(table: AnnData, key: str, *, role: str) -> np.ndarray:
    if key == "X":
        x = table.X
    elif key in table.layers:
        x = table.layers[key]
    else:
        msg = f"No layer {key!r} ({role}) in the `stpred` table; found {sorted(table.layers)}."
        if key.startswith("stpred_"):
            msg += " Run `stpred.tl.predict(sdata, model=...)` first."
        elif key == TARGET_LAYER:
            msg += " Run `stpred.pp.normalize(sdata)` first."
        raise KeyError(msg)
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float64)


def _mean_label(groupby: str) -> str:
    return MEAN_GROUP if groupby == SECTION_KEY else f"mean_over_{groupby}"


def score_arrays(
    preds: Mapping[str, np.ndarray],
    true: np.ndarray,
    *,
    labels: np.ndarray | None,
    mean_label: str = MEAN_GROUP,
    raw: np.ndarray | None = None,
    constant: Literal["exclude", "zero"] = "exclude",
    compare: Sequence[tuple[str, str]] = (),
    n_boot: int = 1000,
    seed: int = 0,
    n_spots_nan: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Tidy scores of predictions that are already restricted to the scored spots (no NaN).

    Parameters
    ----------
    preds
        Layer name -> ``(n_spots, n_genes)`` prediction of the scored spots.
    true
        Truth of the same spots.
    labels
        Group (section) of each spot, or ``None`` for pooled rows only.
    mean_label
        ``group`` of the rows averaging the per-group values.
    raw
        Raw counts of the same spots for HiST's metric (``None``: not computed).
    constant
        Passed to :func:`stpred.metrics.compute_all`.
    compare
        ``(layer, comparator)`` pairs scored with :func:`stpred.metrics.compare_pcc_gene`.
    n_boot, seed
        Bootstrap settings of the comparisons.
    n_spots_nan
        Spots left out because of NaN, per group label (and ``"pooled"``), for the ``n_spots_nan`` column.

    Returns
    -------
    Columns ``key``, ``group``, ``metric``, ``value``, ``n_spots``, ``n_spots_nan`` and, with ``compare``, the
    :data:`COMPARE_COLUMNS`.
    """
    from .. import metrics

    nan_counts = dict(n_spots_nan or {})
    groups: list[tuple[str, np.ndarray]] = []
    if labels is not None:
        for g in dict.fromkeys(labels.tolist()):
            groups.append((str(g), labels == g))
    groups.append((POOLED_GROUP, np.ones(true.shape[0], dtype=bool)))
    rows: list[dict[str, Any]] = []
    for key, pred in preds.items():
        per_group: dict[str, dict[str, float]] = {}
        for label, mask in groups:
            scores: dict[str, float] = metrics.compute_all(pred[mask], true[mask], constant=constant)
            if raw is not None:
                scores.update(metrics.hist_metrics(pred[mask], raw[mask]))
            per_group[label] = scores
            for metric, value in scores.items():
                rows.append(_row(key, label, metric, value, n_spots=int(mask.sum()), n_nan=nan_counts.get(label, 0)))
        sections = [lab for lab, _ in groups if lab != POOLED_GROUP]
        if sections:
            for metric in per_group[POOLED_GROUP]:
                value = float(np.mean([per_group[lab][metric] for lab in sections]))
                rows.append(_row(key, mean_label, metric, value, n_spots=true.shape[0], n_nan=nan_counts.get(POOLED_GROUP, 0)))
        _warn_constant(key, per_group[POOLED_GROUP], constant)
    for key, other in compare:
        result = metrics.compare_pcc_gene(preds[key], preds[other], true, groups=labels, n_boot=n_boot, seed=seed)
        for r in result:
            label = r["group"]
            if labels is None and label not in (POOLED_GROUP,):
                continue
            if label == "mean_over_sections":
                label = mean_label
            row = _row(
                key, label, "pcc_gene_diff", r["difference"], n_spots=r["n_spots"], n_nan=nan_counts.get(label, 0)
            )
            row.update({"comparator": other, **{c: r[c] for c in COMPARE_COLUMNS[1:]}})
            rows.append(row)
    frame = pd.DataFrame(rows)
    if compare:
        for c in COMPARE_COLUMNS:
            if c not in frame:
                frame[c] = np.nan
    return frame


def _row(key: str, group: str, metric: str, value: float, *, n_spots: int, n_nan: int) -> dict[str, Any]:
    return {
        "key": key,
        "group": group,
        "metric": metric,
        "value": float(value),
        "n_spots": int(n_spots),
        "n_spots_nan": int(n_nan),
    }


def _warn_constant(key: str, pooled: Mapping[str, float], constant: str) -> None:
    n_const, n_excl = int(pooled["n_genes_constant"]), int(pooled["n_genes_excluded"])
    if constant == "exclude" and n_const > 0 and np.isfinite(pooled["pcc_gene"]):
        warnings.warn(
            f"Layer {key!r} has a (near-)constant prediction for {n_const} gene(s); pcc_gene averages over the "
            f"others ({n_excl} gene(s) excluded, see `n_genes_excluded`). Pass `constant='zero'` to score them as 0.",
            RuntimeWarning,
            stacklevel=4,
        )


def protocol(
    table: AnnData,
    key: str,
    *,
    scored: Sequence[str],
    truth: str,
    constant: str,
    nan: str,
    compare: Sequence[str] = (),
    n_boot: int | None = None,
    seed: int | None = None,
    train_sections: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The protocol behind a results table: genes, transform, split, metric definitions.

    ``train_sections`` defaults to the training sections recorded by :func:`stpred.tl.predict` for ``key``.
    """
    from .. import metrics

    uns = stpred_uns(table)
    selection = dict(uns.get("gene_selection", {}))
    chosen_on = selection.get("sections")
    if train_sections is None:
        train_sections = dict(dict(uns.get("predictions", {})).get(key, {})).get("train_sections")
    train = [str(s) for s in train_sections] if train_sections is not None else None
    genes = {
        "n_genes": int(table.n_vars),
        "flavor": selection.get("flavor"),
        "chosen_on_sections": [str(s) for s in chosen_on] if chosen_on is not None else "unknown",
        "chosen_with_scored_sections": bool(chosen_on is None or set(map(str, chosen_on)) & set(scored)),
    }
    out: dict[str, Any] = {
        "layer": key,
        "compared_with": list(compare),
        "truth": truth,
        "genes": genes,
        "transform": dict(uns.get("normalize", {})).get("method", "unknown"),
        "split": {
            "train_sections": train if train is not None else "unknown",
            "scored_sections": list(scored),
            "scored_training_sections": sorted(set(train) & set(scored)) if train is not None else "unknown",
        },
        "constant": constant,
        "nan": nan,
        "headline": HEADLINE,
        "metrics": dict(metrics.DEFINITIONS),
    }
    if compare:
        out["bootstrap"] = {"n_boot": n_boot, "seed": seed, "ci": 0.95, "method": "percentile"}
    return out


def _predicted_sections(pred: np.ndarray, sec: np.ndarray) -> list[str]:
    has = np.isfinite(pred).any(axis=1)
    return [s for s in dict.fromkeys(sec.tolist()) if has[sec == s].any()]


def _warn_if_seen_in_training(table: AnnData, key: str, scored: np.ndarray) -> None:
    """Warn when sections scored for layer ``key`` trained or validated the model that wrote it (from provenance)."""
    uns = dict(table.uns.get(UNS_KEY, {}))
    entry = dict(dict(uns.get("predictions", {})).get(key, {}))
    if not entry:
        return  # not written by tl.predict: nothing recorded about its training
    model = entry.get("model")
    fitted = dict(dict(uns.get("models", {})).get(model, {}))
    train = entry.get("train_sections", fitted.get("train_sections"))
    validation = dict(entry.get("validation", fitted.get("validation")) or {})
    scored = set(map(str, scored))
    seen_train = sorted(scored & set(map(str, np.atleast_1d(train if train is not None else []))))
    val_sections = validation.get("sections") if validation.get("rule") != "spatial blocks" else None
    seen_val = sorted(scored & set(map(str, np.atleast_1d(val_sections if val_sections is not None else []))))
    if not seen_train and not seen_val:
        return
    parts = []
    if seen_train:
        parts.append(f"trained on {seen_train}")
    if seen_val:
        parts.append(f"chose its best epoch on {seen_val}")
    msg = (
        f"Layer {key!r} was predicted by model {model!r}, which {' and '.join(parts)}; scores of those sections are "
        "optimistic. Pass `sections=[...]` with held-out sections only for an honest estimate."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)


@accepts_anndata(table_ok=True)
@doc_params(sdata=doc_sdata_any)
def evaluate(
    sdata: SpatialData | AnnData,
    key: str,
    *,
    truth: str = TARGET_LAYER,
    groupby: str | None = SECTION_KEY,
    sections: Sequence[str] | None = None,
    compare: str | Sequence[str] | None = None,
    constant: Literal["exclude", "zero"] = "exclude",
    nan: Literal["raise", "drop"] = "raise",
    n_boot: int = 1000,
    seed: int = 0,
    hist_metric: bool | Literal["auto"] = "auto",
    table_key: str = STPRED_TABLE,
) -> pd.DataFrame:
    """Score a prediction layer against the measured values, per section, over sections and pooled.

    The **headline** is each metric's unweighted mean over the sections (``group == "mean_over_sections"``).
    ``"pooled"`` rows stack the spots of all chosen sections; pooled ``pcc_gene`` rewards predicting per-section
    offsets (it is MMAP's paper metric) and is reported beside the headline, labelled. With ``compare``, the
    comparator layers are scored on exactly the same spots and the paired per-gene PCC difference (``key`` minus
    comparator) is added with 95 % bootstrap intervals over genes and over sections.

    A :class:`UserWarning` is issued when a scored section trained (or selected the best epoch of) the model
    that wrote ``key``, as recorded in ``uns["stpred"]`` by :func:`stpred.tl.fit` and :func:`stpred.tl.predict`.

    Parameters
    ----------
    {sdata}
        An AnnData (the ``stpred`` table itself) is accepted too.
    key
        Prediction layer, e.g. ``"stpred_hifusion"``.
    truth
        Layer with the measured values on the same scale (default the training target).
    groupby
        ``obs`` column to score separately (``None``: pooled only).
    sections
        Restrict to these sections (``None``: every section where ``key`` has predictions; sections that were not
        predicted are all-NaN rows from :func:`stpred.tl.predict` and are skipped).
    compare
        Other prediction layers (e.g. a baseline) to score beside ``key`` on the same spots, with paired differences.
    constant
        ``"exclude"``: genes (spots) with a (near-)constant prediction are left out of ``pcc_gene`` (``pcc_spot``) and
        counted in ``n_genes_excluded``, with a :class:`RuntimeWarning` when the prediction varies on other genes;
        ``"zero"``: they score r = 0. See :data:`stpred.metrics.CONSTANT_RTOL` for the near-constant rule.
    nan
        What to do with spots of the chosen sections whose prediction has a NaN or infinite value (in any of the
        layers): ``"raise"`` a :class:`ValueError` naming how many spots of which sections, or ``"drop"`` them, score
        the rest and report their number in the ``n_spots_nan`` column.
    n_boot
        Bootstrap resamples of the paired comparisons.
    seed
        Seed of the bootstrap.
    hist_metric
        Also report the HiST paper's metric (``hist_r2_flat``, ``hist_pcc_flat``: flattened R² and Pearson of
        ``expm1(prediction)`` against raw counts ``X``). ``"auto"``: when the targets are ``log1p``-normalised.
    table_key
        Name of the ``stpred`` table.

    Returns
    -------
    Tidy DataFrame with columns ``key``, ``group`` (a ``groupby`` value, ``"mean_over_sections"`` or
    ``"pooled"``), ``metric``, ``value``, ``n_spots``, ``n_spots_nan``; metrics ``mse``, ``mae``, ``pcc_gene``,
    ``pcc_spot``, ``pcc_flat``, ``r2_gene``, ``r2_flat``, ``frac_genes_pcc_gt_0.3``, ``n_genes_excluded`` (genes
    left out of ``pcc_gene``: read it beside every ``pcc_gene``), ``n_genes_constant``, ``n_spots_excluded``,
    ``n_genes_excluded_r2``. With ``compare`` also rows with metric ``pcc_gene_diff`` and the columns
    ``comparator``, ``ci_low_genes``, ``ci_high_genes``, ``ci_low_sections``, ``ci_high_sections``. The ``group``
    column is also available under the name of ``groupby`` (``section`` by default). ``frame.attrs["protocol"]``
    holds the protocol (genes and where they were chosen, transform, split, metric definitions), also written to
    ``uns["stpred"]["evaluations"][key]``.

    Examples
    --------
    >>> scores = stpred.tl.evaluate(sdata, "stpred_hifusion", sections=["S2"], compare=["baseline_mean"])
    >>> scores.pivot_table(index="metric", columns=["key", "section"], values="value")
    """
    from .. import metrics

    table = _resolve_table(sdata, table_key)
    check_one_of(nan, ("raise", "drop"), name="nan")
    check_one_of(constant, ("exclude", "zero"), name="constant")
    others = [compare] if isinstance(compare, str) else list(compare or [])
    if key in others or len(set(others)) != len(others):
        msg = f"`compare` must name other layers than {key!r}, each once; found {others}."
        raise ValueError(msg)
    metrics._check_boot(n_boot, 0.95)
    layers = {k: _layer(table, k, role="prediction" if k == key else "comparator") for k in [key, *others]}
    true = _layer(table, truth, role="truth")
    for k, values in layers.items():
        if values.shape != true.shape:
            msg = f"Layers {k!r} {values.shape} and {truth!r} {true.shape} differ in shape."
            raise ValueError(msg)
    sec = table.obs[SECTION_KEY].astype(str).to_numpy()
    predicted = _predicted_sections(layers[key], sec)
    if sections is None:
        chosen = predicted
        if not chosen:
            msg = f"Layer {key!r} has no predicted spots."
            raise ValueError(msg)
    else:
        chosen = check_sections(sections, list(dict.fromkeys(sec.tolist())))
    for k, values in layers.items():
        missing = [s for s in chosen if s not in _predicted_sections(values, sec)]
        if missing:
            msg = (
                f"Layer {k!r} has no predictions for section(s) {missing}; run `stpred.tl.predict(..., "
                f"sections={missing})` or leave them out with `sections=`."
            )
            raise ValueError(msg)
    in_chosen = np.isin(sec, chosen)
    bad = in_chosen & np.logical_or.reduce([~np.isfinite(v).all(axis=1) for v in layers.values()])
    n_nan = {s: int(bad[sec == s].sum()) for s in chosen}
    if bad.any() and nan == "raise":
        where = ", ".join(f"{s}: {n}" for s, n in n_nan.items() if n)
        msg = (
            f"{int(bad.sum())} spot(s) of the chosen sections have NaN or infinite predictions in "
            f"{[k for k, v in layers.items() if (~np.isfinite(v[in_chosen])).any()]} ({where}). Scoring only the "
            "others would flatter the result: fix the prediction, or pass `nan='drop'` to score the rest and report "
            "the count in `n_spots_nan`."
        )
        raise ValueError(msg)
    keep = in_chosen & ~bad
    if not keep.any():
        msg = f"Layer {key!r} has no spot with a complete prediction in sections {chosen}."
        raise ValueError(msg)
    _warn_if_seen_in_training(table, key, table.obs[SECTION_KEY].astype(str).to_numpy()[keep])
    if hist_metric == "auto":
        method = dict(stpred_uns(table).get("normalize", {})).get("method")
        hist_metric = method == "log1p" and truth == TARGET_LAYER
    raw = _layer(table, "X", role="raw counts")[keep] if hist_metric else None

    labels = None
    nan_by_group = {POOLED_GROUP: int(bad.sum())}
    if groupby is not None:
        if groupby not in table.obs:
            msg = f"No column {groupby!r} in `obs`; found {list(table.obs.columns)}."
            raise KeyError(msg)
        all_labels = table.obs[groupby].astype(str).to_numpy()
        labels = all_labels[keep]
        nan_by_group.update({g: int(bad[all_labels == g].sum()) for g in dict.fromkeys(all_labels[in_chosen])})
        nan_by_group[_mean_label(groupby)] = int(bad.sum())
    frame = score_arrays(
        {k: v[keep] for k, v in layers.items()},
        true[keep],
        labels=labels,
        mean_label=_mean_label(groupby) if groupby else MEAN_GROUP,
        raw=raw,
        constant=constant,
        compare=[(key, o) for o in others],
        n_boot=n_boot,
        seed=seed,
        n_spots_nan=nan_by_group,
    )
    if groupby is not None:
        frame[groupby] = frame["group"]
    info = protocol(
        table, key, scored=chosen, truth=truth, constant=constant, nan=nan, compare=others, n_boot=n_boot, seed=seed
    )
    info["n_spots_nan"] = int(bad.sum())
    frame.attrs["protocol"] = info
    evaluations = dict(stpred_uns(table).get("evaluations", {}))
    evaluations[key] = plain(info)
    table.uns[UNS_KEY]["evaluations"] = evaluations
    return frame
