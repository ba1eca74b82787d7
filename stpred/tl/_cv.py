"""``tl.cross_validate``: the slide-wise and sample-specific protocols with leakage guards."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import PATIENT_KEY, SECTION_KEY, STPRED_TABLE, TARGET_LAYER, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._provenance import plain, record, stpred_uns
from .._validate import check_one_of, get_table
from ._evaluate import MEAN_GROUP, POOLED_GROUP

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
        Tidy per-fold metrics (columns ``fold``, ``key``, ``section``, ``metric``, ``value``, ``n_spots``,
        ``n_spots_nan``) as :func:`stpred.tl.evaluate` writes them: per test section, ``"mean_over_sections"`` (the
        headline) and ``"pooled"`` (the fold's test spots stacked; pooled ``pcc_gene`` rewards per-section offsets).
        Includes the baselines (``key == "baseline_mean"``, ``"baseline_ridge"``) when requested, and then the paired
        per-gene PCC difference model minus baseline (``metric == "pcc_gene_diff"``, columns ``comparator``,
        ``ci_low_genes``, ``ci_high_genes``, ``ci_low_sections``, ``ci_high_sections``: 95 % bootstrap intervals).
        ``metrics.attrs["protocol"]`` states the protocol.
    overall
        Metrics of the out-of-fold predictions over every test spot (per section, over sections and pooled), same
        columns; the bootstrap over sections here resamples the test sections of all folds.
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
        """Mean and standard deviation over folds of each fold's headline metrics, with the pooled value beside.

        ``mean``, ``std``, ``count``: over folds of each fold's ``"mean_over_sections"`` value (the headline);
        ``pooled``: the mean over folds of each fold's ``"pooled"`` value (test spots of a fold stacked; the
        papers' usual number, which rewards per-section offsets).
        """
        frame = self.metrics
        if key is not None:
            frame = frame[frame["key"] == key]
        head = frame[frame["section"] == MEAN_GROUP]
        out = head.groupby(["key", "metric"], sort=False)["value"].agg(["mean", "std", "count"])
        pooled = frame[frame["section"] == POOLED_GROUP].groupby(["key", "metric"], sort=False)["value"].mean()
        out["pooled"] = pooled.reindex(out.index)
        return out.reset_index()

    def comparison(self) -> pd.DataFrame:
        """Paired per-gene PCC differences (model minus baseline) with bootstrap intervals, over all test spots."""
        return self.overall[self.overall["metric"] == "pcc_gene_diff"].reset_index(drop=True)

    def __repr__(self) -> str:
        summary = self.summary()
        lines = [
            f"CVResult(model={self.model!r}, protocol={self.protocol['name']!r}, folds={len(self.folds)}); "
            "mean over sections (pooled in brackets)"
        ]
        for k in summary["key"].unique():
            sub = summary[(summary["key"] == k) & summary["metric"].isin(["mse", "pcc_gene", "n_genes_excluded"])]
            parts = ", ".join(f"{r.metric}={r['mean']:.4f} ({r['pooled']:.4f})" for _, r in sub.iterrows())
            lines.append(f"  {k}: {parts}")
        diffs = self.comparison()
        for _, r in diffs[diffs["section"] == MEAN_GROUP].iterrows():
            lines.append(
                f"  {r['key']} - {r['comparator']}: pcc_gene_diff={r['value']:.4f} "
                f"[genes {r['ci_low_genes']:.4f}, {r['ci_high_genes']:.4f}]"
            )
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
    baselines: Sequence[str] | None = None,
    constant: Literal["exclude", "zero"] = "exclude",
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
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
        Also score baselines fitted on the training sections of every fold, on the same spots, with the paired
        per-gene PCC difference of the model to each and its bootstrap intervals (``False``: none).
    baselines
        Which: ``"mean"`` (each gene's mean training target; key ``"baseline_mean"``) and ``"ridge"`` (the ridge
        probe on the patch embeddings, :class:`stpred.models.Ridge`; key ``"baseline_ridge"``). ``None``: both
        when the table has an embedding (``embedding_key`` in the fit arguments, or a single ``obsm["X_emb*"]``),
        otherwise the mean only.
    constant
        How ``pcc_gene`` treats genes with a (near-)constant prediction: ``"exclude"`` (counted in
        ``n_genes_excluded``) or ``"zero"`` (see :func:`stpred.tl.evaluate`).
    n_boot
        Bootstrap resamples of the paired differences.
    bootstrap_seed
        Seed of the bootstrap (``seed`` is passed to :func:`stpred.tl.fit`).
    table_key
        Name of the ``stpred`` table.
    progress
        Show progress bars.
    **fit_kwargs
        Passed to :func:`stpred.tl.fit` (``max_epochs``, ``batch_size``, ``embedding_key``, model options, ...).

    Returns
    -------
    A :class:`CVResult` with per-fold and overall metrics and the protocol description (including whether the
    gene panel was chosen with the test sections included, the transform, the folds and the metric definitions).

    Examples
    --------
    >>> sdata = stpred.datasets.her2st()
    >>> stpred.pp.select_genes(sdata, sections=["C2"])
    >>> stpred.pp.normalize(sdata)
    >>> stpred.pp.extract_patches(sdata)
    >>> result = stpred.tl.cross_validate(sdata, "hifusion", protocol="sample-specific", max_epochs=20)
    >>> result.summary()
    """
    from .. import metrics as _metrics
    from ._evaluate import protocol as _protocol
    from ._fit import fit_unregistered
    from ._inputs import target_matrix
    from ._splits import sample_specific_folds, slide_wise_folds

    table = get_table(sdata, table_key, made_by="pp.select_genes")
    check_one_of(protocol, _PROTOCOLS, name="protocol")
    check_one_of(constant, ("exclude", "zero"), name="constant")
    _metrics._check_boot(n_boot, 0.95)
    for forbidden in ("train", "val"):
        if forbidden in fit_kwargs:
            msg = f"`{forbidden}=` is set by the protocol in `cross_validate`; remove it."
            raise TypeError(msg)
    target = target_matrix(table)
    bases, embedding = _baselines(table, baseline, baselines, fit_kwargs.get("embedding_key"))
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

    sections_col = table.obs[SECTION_KEY].astype(str).to_numpy()
    method = dict(stpred_uns(table).get("normalize", {})).get("method")
    raw = None
    if method == "log1p":  # HiST's metric, as `evaluate(hist_metric="auto")`
        raw = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, dtype=np.float64)
    score = partial(
        _score,
        target=target,
        sections=sections_col,
        raw=raw,
        key=key,
        constant=constant,
        n_boot=n_boot,
        seed=bootstrap_seed,
    )
    selection = dict(stpred_uns(table).get("gene_selection", {}))
    gene_sections = selection.get("sections")
    oof = np.full(table.shape, np.nan, dtype=np.float32)
    base = {b: np.full(table.shape, np.nan, dtype=np.float32) for b in bases}
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
        if "baseline_mean" in base:
            base["baseline_mean"][rows] = target[train_rows].mean(axis=0)
        if "baseline_ridge" in base:
            ridge = fit_unregistered(
                sdata,
                "ridge",
                train=fold["train"],
                val=False,
                seed=fit_kwargs.get("seed", 0),
                embedding_key=embedding,
                group_key=group_key,
                table_key=table_key,
                progress=progress,
            )
            base["baseline_ridge"][rows] = ridge.predict(sdata, test, table_key=table_key, progress=progress)
        fold_frames.append(score(rows, oof=oof, base=base).assign(fold=fold["fold"]))

    metrics_frame = pd.concat(fold_frames, ignore_index=True)
    tested = np.flatnonzero(np.isin(sections_col, [s for f in folds for s in f["test"]]))
    overall_frame = score(tested, oof=oof, base=base)
    table.layers[key] = oof
    description = {
        "name": protocol,
        "description": _PROTOCOLS[protocol],
        "n_folds": len(folds),
        "group_key": group_key,
        "gene_panel_includes_test_sections": bool(panel_with_test),
        "gene_selection_sections": gene_sections if gene_sections is not None else "all",
    }
    scored = list(dict.fromkeys(sections_col[tested].tolist()))
    info = _protocol(
        table,
        key,
        scored=scored,
        truth=TARGET_LAYER,
        constant=constant,
        nan="raise",
        compare=list(base),
        n_boot=n_boot,
        seed=bootstrap_seed,
        train_sections=[],
    )
    info["split"] = {  # no fold scores its own training sections, by construction
        "rule": _PROTOCOLS[protocol],
        "folds": {str(f["fold"]): {"train": f["train"], "test": f["test"]} for f in folds},
        "scored_sections": scored,
    }
    description.update({k: info[k] for k in ("genes", "transform", "split", "constant", "headline", "metrics")})
    if base:
        description["bootstrap"] = info["bootstrap"]
    metrics_frame.attrs["protocol"] = description
    overall_frame.attrs["protocol"] = description
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


def _baselines(
    table: Any, baseline: bool, baselines: Sequence[str] | None, embedding_key: str | None
) -> tuple[list[str], str | None]:
    """Keys of the baselines to score (``baseline_mean``, ``baseline_ridge``) and the embedding the ridge reads."""
    from ._inputs import _embedding_key

    if not baseline:
        return [], None
    try:
        embedding = _embedding_key(table, embedding_key)
    except KeyError:
        embedding = None
    if baselines is None:
        chosen = ["mean", "ridge"] if embedding is not None else ["mean"]
    else:
        chosen = [baselines] if isinstance(baselines, str) else list(baselines)
        unknown = sorted(set(chosen) - {"mean", "ridge"})
        if unknown or len(set(chosen)) != len(chosen):
            msg = f"Expected `baselines` to be distinct names among ['mean', 'ridge'], found {chosen!r}."
            raise ValueError(msg)
        if "ridge" in chosen and embedding is None:
            msg = (
                "The ridge baseline reads patch embeddings: pass `embedding_key=` naming an entry of `obsm` (found "
                f"{sorted(table.obsm)}), run `stpred.pp.embed(sdata, encoder=...)` first, or use baselines=['mean']."
            )
            raise KeyError(msg)
    return [f"baseline_{b}" for b in chosen], embedding


def _score(
    rows: np.ndarray,
    *,
    oof: np.ndarray,
    base: dict[str, np.ndarray],
    target: np.ndarray,
    sections: np.ndarray,
    raw: np.ndarray | None,
    key: str,
    constant: Literal["exclude", "zero"],
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """Score the out-of-fold predictions (and the baseline) of ``rows``, per section, over sections and pooled."""
    from ._evaluate import score_arrays

    pred = oof[rows].astype(np.float64)
    bad = ~np.isfinite(pred).all(axis=1)
    if bad.any():
        where = sorted(set(sections[rows][bad].tolist()))
        msg = f"The model predicted NaN or infinite values for {int(bad.sum())} test spot(s) (sections {where})."
        raise ValueError(msg)
    preds = {key: pred, **{b: values[rows].astype(np.float64) for b, values in base.items()}}
    frame = score_arrays(
        preds,
        target[rows].astype(np.float64),
        labels=sections[rows],
        raw=raw[rows] if raw is not None else None,
        constant=constant,
        compare=[(key, b) for b in base],
        n_boot=n_boot,
        seed=seed,
    )
    frame[SECTION_KEY] = frame["group"]
    return frame
