"""``tl.cross_validate``: the slide-wise and sample-specific protocols with leakage guards."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import PATIENT_KEY, SECTION_KEY, STPRED_TABLE, TARGET_LAYER, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._provenance import plain, record, stpred_uns
from .._validate import check_one_of, get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_PROTOCOLS = {
    "slide-wise": (
        "k folds grouped by patient (patients in natural order, fold i tests patients i, i+k, ...); no patient is "
        "on both sides; validation from held-out training patients"
    ),
    "sample-specific": (
        "per patient with two or more sections: train on the first section (natural order), test on the others; "
        "validation from spatial blocks of the training section"
    ),
}


@dataclass
class CVResult:
    """Outcome of :func:`stpred.tl.cross_validate`.

    Attributes
    ----------
    model
        Model name.
    protocol
        Protocol name, description, number of folds, and whether the gene panel was chosen with test sections.
    folds
        One dict per fold: ``fold``, ``train``, ``test`` sections, ``test_patients``, validation rule.
    metrics
        Tidy per-fold metrics (columns ``fold``, ``key``, ``section``, ``metric``, ``value``, ``n_spots``);
        ``section == "pooled"`` rows pool the fold's test sections. Includes the training-mean baseline
        (``key == "baseline_mean"``) when requested.
    overall
        Metrics of the out-of-fold predictions over every test spot (per section and pooled), same columns.
    key
        Layer holding the out-of-fold predictions.
    histories
        Per-fold training histories.

    Examples
    --------
    >>> result = stpred.tl.cross_validate(sdata, "hist", protocol="slide-wise", embedding_key="X_emb_resnet18")
    >>> result.metrics.query("section == 'pooled' and metric == 'pcc_gene'")
    """

    model: str
    protocol: dict[str, Any]
    folds: list[dict[str, Any]]
    metrics: pd.DataFrame
    overall: pd.DataFrame
    key: str
    histories: list[pd.DataFrame] = field(default_factory=list)

    def summary(self, *, key: str | None = None) -> pd.DataFrame:
        """Mean and standard deviation over folds of each fold's pooled metrics (the papers' "final number")."""
        frame = self.metrics[self.metrics["section"] == "pooled"]
        if key is not None:
            frame = frame[frame["key"] == key]
        return frame.groupby(["key", "metric"])["value"].agg(["mean", "std", "count"]).reset_index()

    def __repr__(self) -> str:
        pooled = self.summary()
        lines = [f"CVResult(model={self.model!r}, protocol={self.protocol['name']!r}, folds={len(self.folds)})"]
        for k in pooled["key"].unique():
            sub = pooled[(pooled["key"] == k) & pooled["metric"].isin(["mse", "pcc_gene", "pcc_spot"])]
            parts = ", ".join(f"{r.metric}={r['mean']:.4f}" for _, r in sub.iterrows())
            lines.append(f"  {k}: {parts}")
        return "\n".join(lines)


@doc_params(sdata=doc_sdata)
def cross_validate(
    sdata: SpatialData,
    model: str,
    *,
    protocol: Literal["slide-wise", "sample-specific"] = "slide-wise",
    n_folds: int = 4,
    group_key: str = PATIENT_KEY,
    key_added: str | None = None,
    overwrite: bool = False,
    baseline: bool = True,
    table_key: str = STPRED_TABLE,
    progress: bool = True,
    **fit_kwargs: Any,
) -> CVResult:
    """Cross-validate a model under one of the field's protocols.

    Each fold trains a fresh model on its training sections (validation taken from those sections only, see
    :func:`stpred.tl.fit`), predicts its test sections, and scores them. Out-of-fold predictions are written to
    ``layers["stpred_<model>_cv"]``.

    Parameters
    ----------
    {sdata}
    model
        Registered model name.
    protocol
        ``"slide-wise"``: ``n_folds`` folds grouped by patient (no patient on both sides).
        ``"sample-specific"``: per patient, train on the first section and test on the others.
    n_folds
        Number of folds for ``"slide-wise"``.
    group_key
        ``obs`` column with the patient of each section.
    key_added
        Layer for the out-of-fold predictions (default ``"stpred_<model>_cv"``).
    overwrite
        Replace an existing layer of that name.
    baseline
        Also score the training-mean baseline of every fold (predicts each gene's mean training target).
    table_key
        Name of the ``stpred`` table.
    progress
        Show progress bars.
    **fit_kwargs
        Passed to :func:`stpred.tl.fit` (``max_epochs``, ``batch_size``, ``embedding_key``, model options, ...).

    Returns
    -------
    A :class:`CVResult` with per-fold and overall metrics and the protocol description (including whether the
    gene panel was chosen with the test sections included).

    Examples
    --------
    >>> sdata = stpred.datasets.her2st()
    >>> stpred.pp.select_genes(sdata, sections=["C2"])
    >>> stpred.pp.normalize(sdata)
    >>> stpred.pp.extract_patches(sdata)
    >>> result = stpred.tl.cross_validate(sdata, "hifusion", protocol="sample-specific", max_epochs=20)
    >>> result.summary()
    """
    from ._evaluate import evaluate
    from ._fit import fit_unregistered
    from ._inputs import target_matrix
    from ._splits import sample_specific_folds, slide_wise_folds

    table = get_table(sdata, table_key, made_by="pp.select_genes")
    check_one_of(protocol, _PROTOCOLS, name="protocol")
    for forbidden in ("train", "val"):
        if forbidden in fit_kwargs:
            msg = f"`{forbidden}=` is set by the protocol in `cross_validate`; remove it."
            raise TypeError(msg)
    target = target_matrix(table)
    if protocol == "slide-wise":
        folds = slide_wise_folds(table, n_folds=n_folds, group_key=group_key)
    else:
        folds = sample_specific_folds(table, group_key=group_key)
    from ..models import get_model

    name = get_model(model).name
    key = key_added or f"stpred_{name}_cv"
    if key in table.layers and not overwrite:
        msg = f"Layer {key!r} already exists; pass `overwrite=True` to replace it or choose another `key_added`."
        raise ValueError(msg)

    selection = dict(stpred_uns(table).get("gene_selection", {}))
    gene_sections = selection.get("sections")
    sections_col = table.obs[SECTION_KEY].astype(str).to_numpy()
    oof = np.full(table.shape, np.nan, dtype=np.float32)
    base = np.full(table.shape, np.nan, dtype=np.float32)
    fold_frames, histories = [], []
    panel_with_test = False
    for fold in folds:
        test = fold["test"]
        panel_with_test |= gene_sections is None or bool(set(gene_sections) & set(test))
        logger.info("fold %d: train %s, test %s", fold["fold"], fold["train"], test)
        predictor = fit_unregistered(
            sdata,
            name,
            train=fold["train"],
            group_key=group_key,
            table_key=table_key,
            progress=progress,
            **fit_kwargs,
        )
        fold["validation"] = predictor.info["validation"]
        fold["best"] = predictor.info["best"]
        histories.append(predictor.history.assign(fold=fold["fold"]))
        rows = np.flatnonzero(np.isin(sections_col, test))
        oof[rows] = predictor.predict(sdata, test, table_key=table_key, progress=progress)
        train_rows = np.flatnonzero(np.isin(sections_col, fold["train"]))
        base[rows] = target[train_rows].mean(axis=0)
        layers = {key: oof, "baseline_mean": base} if baseline else {key: oof}
        for layer_key, values in layers.items():
            fold_layer = np.full(table.shape, np.nan, dtype=np.float32)
            fold_layer[rows] = values[rows]
            frame = _score(table, fold_layer, layer_key)
            fold_frames.append(frame.assign(fold=fold["fold"]))

    table.layers[key] = oof
    metrics_frame = pd.concat(fold_frames, ignore_index=True)
    overall = [evaluate(table, key, truth=TARGET_LAYER)]
    if baseline:
        table.layers["_stpred_baseline_tmp"] = base
        try:
            overall.append(evaluate(table, "_stpred_baseline_tmp").assign(key="baseline_mean"))
        finally:
            del table.layers["_stpred_baseline_tmp"]
    overall_frame = pd.concat(overall, ignore_index=True)
    description = {
        "name": protocol,
        "description": _PROTOCOLS[protocol],
        "n_folds": len(folds),
        "group_key": group_key,
        "gene_panel_includes_test_sections": bool(panel_with_test),
        "gene_selection_sections": gene_sections if gene_sections is not None else "all",
    }
    result = CVResult(
        model=name,
        protocol=description,
        folds=folds,
        metrics=metrics_frame,
        overall=overall_frame,
        key=key,
        histories=histories,
    )
    cv = dict(stpred_uns(table).get("cross_validation", {}))
    cv[key] = plain({"model": name, "protocol": description, "folds": folds, "fit_kwargs": fit_kwargs})
    table.uns[UNS_KEY]["cross_validation"] = cv
    record(table, "tl.cross_validate", model=name, protocol=protocol, key_added=key, n_folds=len(folds))
    if panel_with_test:
        logger.info(
            "The gene panel was chosen with test sections included (transductive, as in the papers); select genes on "
            "training sections only for a strictly inductive estimate."
        )
    return result


def _score(table: Any, layer: np.ndarray, key: str) -> pd.DataFrame:
    from ._evaluate import evaluate

    tmp = "_stpred_cv_tmp"
    table.layers[tmp] = layer
    try:
        frame = evaluate(table, tmp, hist_metric="auto")
    finally:
        del table.layers[tmp]
    return frame.assign(key=key)
