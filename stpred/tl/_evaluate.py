"""``tl.evaluate``: every metric of :mod:`stpred.metrics`, per section and pooled, as a tidy table."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import SECTION_KEY, STPRED_TABLE, TARGET_LAYER, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._validate import check_sections

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


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


@doc_params(sdata=doc_sdata)
def evaluate(
    sdata: SpatialData | AnnData,
    key: str,
    *,
    truth: str = TARGET_LAYER,
    groupby: str | None = SECTION_KEY,
    sections: Sequence[str] | None = None,
    hist_metric: bool | Literal["auto"] = "auto",
    table_key: str = STPRED_TABLE,
) -> pd.DataFrame:
    """Score a prediction layer against the measured values, per section and pooled.

    Rows whose prediction is NaN (spots that were not predicted) are left out. A :class:`UserWarning` is issued
    when a scored section trained (or selected the best epoch of) the model that wrote ``key``, as recorded in
    ``uns["stpred"]`` by :func:`stpred.tl.fit` and :func:`stpred.tl.predict`.

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
        Restrict to these sections (``None``: every section with predictions).
    hist_metric
        Also report the HiST paper's metric (``hist_r2_flat``, ``hist_pcc_flat``: flattened R² and Pearson of
        ``expm1(prediction)`` against raw counts ``X``). ``"auto"``: when the targets are ``log1p``-normalised.
    table_key
        Name of the ``stpred`` table.

    Returns
    -------
    Tidy DataFrame with columns ``key``, ``group`` (``"pooled"`` or a ``groupby`` value), ``metric``, ``value``,
    ``n_spots``; metrics ``mse``, ``mae``, ``pcc_gene``, ``pcc_spot``, ``pcc_flat``, ``r2_gene``, ``r2_flat``,
    ``n_genes_excluded`` (genes left out of ``pcc_gene`` because truth or prediction is constant). The ``group``
    column is also available under the name of ``groupby`` (``section`` by default).

    Examples
    --------
    >>> scores = stpred.tl.evaluate(sdata, "stpred_hifusion", sections=["S2"])
    >>> scores.pivot(index="metric", columns="section", values="value")
    """
    from .. import metrics
    from ._inputs import section_names

    table = _resolve_table(sdata, table_key)
    pred = _layer(table, key, role="prediction")
    true = _layer(table, truth, role="truth")
    if pred.shape != true.shape:
        msg = f"Layers {key!r} {pred.shape} and {truth!r} {true.shape} differ in shape."
        raise ValueError(msg)
    keep = ~np.isnan(pred).any(axis=1)
    if sections is not None:
        chosen = check_sections(sections, section_names(table))
        keep &= table.obs[SECTION_KEY].astype(str).isin(chosen).to_numpy()
    if not keep.any():
        msg = f"Layer {key!r} has no predicted spots in the chosen sections."
        raise ValueError(msg)
    _warn_if_seen_in_training(table, key, table.obs[SECTION_KEY].astype(str).to_numpy()[keep])
    if hist_metric == "auto":
        method = dict(table.uns.get("stpred", {}).get("normalize", {})).get("method")
        hist_metric = method == "log1p" and truth == TARGET_LAYER
    raw = _layer(table, "X", role="raw counts") if hist_metric else None

    groups: list[tuple[str, np.ndarray]] = []
    if groupby is not None:
        if groupby not in table.obs:
            msg = f"No column {groupby!r} in `obs`; found {list(table.obs.columns)}."
            raise KeyError(msg)
        labels = table.obs[groupby].astype(str).to_numpy()
        for g in dict.fromkeys(labels[keep]):
            groups.append((g, keep & (labels == g)))
    groups.append(("pooled", keep))
    rows = []
    for label, mask in groups:
        scores = metrics.compute_all(pred[mask], true[mask])
        if raw is not None:
            scores.update(metrics.hist_metrics(pred[mask], raw[mask]))
        for metric, value in scores.items():
            rows.append({"key": key, "group": label, "metric": metric, "value": float(value), "n_spots": int(mask.sum())})
    frame = pd.DataFrame(rows)
    if groupby is not None:
        frame[groupby] = frame["group"]
    return frame
