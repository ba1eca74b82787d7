"""``tl.benchmark``: several models (and the baselines) under one named, leakage-guarded protocol and several seeds."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import PATIENT_KEY, SECTION_KEY, STPRED_TABLE, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._provenance import plain, record, stpred_uns
from .._validate import check_one_of, get_table
from ._cv import _PROTOCOLS as _CV_PROTOCOLS
from ._evaluate import MEAN_GROUP, POOLED_GROUP

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

PROTOCOLS = {
    **_CV_PROTOCOLS,
    "leave-one-patient-out": (
        "one fold per patient: test on all of its sections, train on every other patient's sections; validation "
        "from held-out training patients"
    ),
}
#: Models that are references: every other model is compared with each of them that is benchmarked.
BASELINES = ("mean", "ridge")
#: Headline metrics summarised over seeds.
SUMMARY_METRICS = ("pcc_gene", "n_genes_excluded", "frac_genes_pcc_gt_0.3", "mse", "pcc_gene_diff")
_FOLD_TABLE = "_stpred_benchmark_fold"


@dataclass
class BenchmarkResult:
    """Outcome of :func:`stpred.tl.benchmark`.

    Attributes
    ----------
    scores
        The tidy table: one row per ``protocol``, ``seed``, ``fold``, ``model``, ``section`` (a test section,
        ``"mean_over_sections"`` — the headline — or ``"pooled"``, labelled), ``metric`` and ``value``, with
        ``n_spots``, ``train_sections``, ``test_sections``, ``genes_chosen_on`` and, for ``metric ==
        "pcc_gene_diff"`` (model minus ``comparator``), the 95 % bootstrap intervals over genes and over sections.
    protocol
        What was done: protocol, folds, gene selection per fold, transform, validation, metric definitions.
    """

    scores: pd.DataFrame
    protocol: dict[str, Any]

    def summary(self) -> pd.DataFrame:
        """Mean ± sd over seeds of the headline metrics, with the pooled value beside (labelled).

        For each seed, ``value`` is the unweighted mean over every test section of all folds (per-section metric,
        the headline) and ``pooled`` the mean over folds of each fold's pooled value; ``mean`` and ``sd`` are then
        taken over seeds (``sd`` is NaN with one seed). ``pcc_gene_diff`` rows have a ``comparator``.
        """
        return summarize(self.scores)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write scores, summary and protocol to ``path`` as strict JSON (NaN and infinities become ``null``)."""
        return write_json(path, self.scores, self.protocol)

    def __repr__(self) -> str:
        lines = [f"BenchmarkResult(protocol={self.protocol['name']!r}, seeds={self.protocol['seeds']})"]
        summ = self.summary()
        for _, r in summ[summ["metric"].isin(["pcc_gene", "mse"])].iterrows():
            lines.append(f"  {r['model']}: {r['metric']}={r['mean']:.4f} ± {r['sd']:.4f} (pooled {r['pooled']:.4f})")
        return "\n".join(lines)


@doc_params(sdata=doc_sdata)
def benchmark(
    sdata: SpatialData,
    models: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("mean", "ridge"),
    *,
    protocol: Literal["sample-specific", "slide-wise", "leave-one-patient-out"] = "sample-specific",
    seeds: Sequence[int] = (0, 1, 2),
    n_folds: int = 4,
    embedding_key: str | None = None,
    reselect_genes: bool | None = None,
    raw_table_key: str = "table",
    group_key: str = PATIENT_KEY,
    constant: Literal["exclude", "zero"] = "exclude",
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
    path: str | os.PathLike | None = None,
    key_added: str = "benchmark",
    table_key: str = STPRED_TABLE,
    progress: bool = False,
    **fit_kwargs: Any,
) -> BenchmarkResult:
    """Benchmark models and baselines under a named protocol that cannot leak test data.

    Every fold trains each model once per seed on the fold's training sections and scores its test sections. The
    test sections reach nothing but the final scoring: the gene panel is chosen on the training sections of the
    fold (re-selected per fold with the recipe of :func:`stpred.pp.select_genes` when the existing panel saw a
    test section), the targets are per-spot transforms (:func:`stpred.pp.normalize`; no statistic across spots),
    every model-side statistic (head bias, standardisation, ridge penalty) and the validation split that picks
    the best epoch come from the training sections, and the training store holds no test target. The function
    refuses a split that would leak: a section on both sides, a patient on both sides (slide-wise and
    leave-one-patient-out), or a kept panel chosen with test sections (``reselect_genes=False``).

    Parameters
    ----------
    {sdata}
    models
        Registered model names, or a mapping name → options for :func:`stpred.tl.fit` of that model (model
        options and ``max_epochs``, ``batch_size``, ``lr``, ``plan_kwargs``, ...). The baselines ``"mean"`` and
        ``"ridge"``, when listed, run first and every other model is compared with each of them (paired per-gene
        PCC difference with bootstrap intervals). Closed-form models fit on all training rows (``val=False``).
    protocol
        ``"sample-specific"``: per patient with two or more sections, train on the first, test on the others.
        ``"slide-wise"``: ``n_folds`` folds grouped by patient. ``"leave-one-patient-out"``: one fold per patient.
    seeds
        Training seeds; each model runs once per seed and fold. Results are reported as mean ± sd over seeds.
    n_folds
        Folds of ``"slide-wise"``.
    embedding_key
        ``obsm`` key of the patch embeddings, for the models that read them (``"ridge"``, ``"hist"``).
    reselect_genes
        ``None``: keep the panel when it was chosen on sections that are training sections of every fold, else
        re-select it on each fold's training sections. ``True``: always re-select. ``False``: keep the panel and
        refuse when it was chosen with a test section. Re-selection reads the raw counts of ``raw_table_key``
        and repeats the recorded recipe (``flavor``, ``n_top``, ``exclude``).
    raw_table_key
        The raw-count table that :func:`stpred.pp.select_genes` read.
    group_key
        ``obs`` column with the patient of each section.
    constant
        How ``pcc_gene`` treats (near-)constant predictions: ``"exclude"`` (counted in ``n_genes_excluded``) or
        ``"zero"``.
    n_boot, bootstrap_seed
        Bootstrap resamples and seed of the paired comparisons.
    path
        Also write the result to this JSON file (strict JSON: NaN → ``null``), rewritten after every fitted model,
        so an interrupted run leaves the finished part.
    key_added
        Entry of ``uns["stpred"]["benchmark"]`` that receives the scores and the protocol.
    table_key
        Name of the ``stpred`` table.
    progress
        Show progress bars.
    **fit_kwargs
        Passed to every :func:`stpred.tl.fit` call (per-model options in ``models`` take precedence).

    Returns
    -------
    A :class:`BenchmarkResult`: the tidy ``scores`` table and the ``protocol``; ``result.summary()`` gives mean ±
    sd over seeds. Also written to ``uns["stpred"]["benchmark"][key_added]`` (and to ``path``).

    Examples
    --------
    >>> sdata = stpred.datasets.her2st(sections=["C1", "C2", "C3", "C4", "C5", "C6"])
    >>> stpred.pp.select_genes(sdata, sections=["C2"])
    >>> stpred.pp.normalize(sdata)
    >>> stpred.pp.embed(sdata, encoder="resnet18")
    >>> result = stpred.tl.benchmark(sdata, ["mean", "ridge", "hist"], embedding_key="X_emb_resnet18")
    >>> result.summary()
    """
    from ..models import get_model

    table = get_table(sdata, table_key, made_by="pp.select_genes")
    check_one_of(protocol, PROTOCOLS, name="protocol")
    check_one_of(constant, ("exclude", "zero"), name="constant")
    from .. import metrics as _metrics

    _metrics._check_boot(n_boot, 0.95)
    specs = _model_specs(models)
    names = {get_model(m).name: m for m in specs}
    order = [m for m in BASELINES if m in names] + [m for m in names if m not in BASELINES]
    seeds = _check_seeds(seeds)
    for forbidden in ("train", "val", "table_key", "patches"):
        if forbidden in fit_kwargs or any(forbidden in o for o in specs.values()):
            msg = f"`{forbidden}=` is set by the protocol in `benchmark`; remove it."
            raise TypeError(msg)
    if not isinstance(key_added, str) or not key_added:
        msg = f"Expected `key_added` to be a non-empty string, found {key_added!r}."
        raise ValueError(msg)
    if reselect_genes not in (None, True, False):
        msg = f"Expected `reselect_genes` to be None, True or False, found {reselect_genes!r}."
        raise ValueError(msg)

    folds = protocol_folds(table, protocol, n_folds=n_folds, group_key=group_key)
    patient_of = _patients(table, group_key)
    selection = dict(stpred_uns(table).get("gene_selection", {}))
    plans = [_gene_plan(fold, selection, reselect_genes, patient_of) for fold in folds]
    for fold in folds:
        check_no_leak(fold, protocol, patient_of)
    if any(p == "reselect" for p in plans):
        _check_raw(sdata, raw_table_key, table)

    description = {
        "name": protocol,
        "description": PROTOCOLS[protocol],
        "seeds": list(seeds),
        "models": order,
        "baselines": [m for m in BASELINES if m in names],
        "group_key": group_key,
        "folds": [],
        "transform": dict(stpred_uns(table).get("normalize", {})).get("method", "unknown"),
        "normalisation_statistics": (
            "none across spots: the targets are per-spot transforms; model statistics (head bias, standardisation, "
            "ridge penalty, PCA) come from the training rows of each fold"
        ),
        "validation": "from the training sections only (see each fold); closed-form models use no validation rows",
        "constant": constant,
        "headline": (
            "pcc_gene per test section, averaged over the sections of all folds (mean_over_sections); 'pooled' "
            "stacks the test spots of a fold and rewards per-section offsets (MMAP's paper metric): reported "
            "beside, labelled"
        ),
        "bootstrap": {"n_boot": n_boot, "seed": bootstrap_seed, "ci": 0.95, "method": "percentile"},
        "metrics": dict(_metrics.DEFINITIONS),
        "status": "running",
    }
    frames: list[pd.DataFrame] = []
    for fold, plan in zip(folds, plans, strict=True):
        frames.extend(
            _run_fold(
                sdata,
                table,
                fold,
                plan,
                selection=selection,
                order=order,
                specs={m: specs[names[m]] for m in order},
                seeds=seeds,
                description=description,
                raw_table_key=raw_table_key,
                table_key=table_key,
                group_key=group_key,
                embedding_key=embedding_key,
                constant=constant,
                n_boot=n_boot,
                bootstrap_seed=bootstrap_seed,
                progress=progress,
                path=path,
                done=frames,
                fit_kwargs=fit_kwargs,
            )
        )
    description["status"] = "complete"
    scores = pd.concat(frames, ignore_index=True)
    scores.attrs["protocol"] = description
    result = BenchmarkResult(scores=scores, protocol=description)
    if path is not None:
        result.to_json(path)
    bench = dict(stpred_uns(table).get("benchmark", {}))
    bench[key_added] = plain({"protocol": description, "scores": _columns(scores)})
    table.uns[UNS_KEY]["benchmark"] = bench
    record(table, "tl.benchmark", protocol=protocol, models=order, seeds=list(seeds), key_added=key_added)
    return result


# ------------------------------------------------------------------------------------------------ the folds
def protocol_folds(table: AnnData, protocol: str, *, n_folds: int = 4, group_key: str = PATIENT_KEY) -> list[dict]:
    """The folds of a named protocol (see :data:`PROTOCOLS`)."""
    from ._splits import sample_specific_folds, sections_by_patient, slide_wise_folds

    if protocol == "sample-specific":
        return sample_specific_folds(table, group_key=group_key)
    if protocol == "slide-wise":
        return slide_wise_folds(table, n_folds=n_folds, group_key=group_key)
    n_patients = len(sections_by_patient(table, group_key))
    if n_patients < 2:
        msg = "Leave-one-patient-out needs at least two patients; use protocol='sample-specific'."
        raise ValueError(msg)
    return slide_wise_folds(table, n_folds=n_patients, group_key=group_key)


def check_no_leak(fold: Mapping[str, Any], protocol: str, patient_of: Mapping[str, str]) -> None:
    """Refuse a fold whose test data would reach training: a shared section, or a shared patient across patients."""
    shared = sorted(set(fold["train"]) & set(fold["test"]))
    if shared:
        msg = f"Fold {fold['fold']} has sections {shared} on both the training and the test side."
        raise ValueError(msg)
    if protocol != "sample-specific":
        both = sorted({patient_of[s] for s in fold["train"]} & {patient_of[s] for s in fold["test"]})
        if both:
            msg = (
                f"Fold {fold['fold']} has patient(s) {both} on both sides, which the {protocol!r} protocol forbids; "
                "check the patient column (`group_key`)."
            )
            raise ValueError(msg)


def _patients(table: AnnData, group_key: str) -> dict[str, str]:
    from ._splits import sections_by_patient

    return {s: p for p, secs in sections_by_patient(table, group_key).items() for s in secs}


def _gene_plan(
    fold: Mapping[str, Any], selection: Mapping[str, Any], reselect: bool | None, patient_of: Mapping[str, str]
) -> str:
    """``"keep"`` or ``"reselect"`` for one fold; refuses a kept panel that saw a test section."""
    if selection.get("flavor") == "list":
        return "keep"  # a panel the user named; nothing in the data chose it
    chosen = selection.get("sections")
    saw_test = chosen is None or bool(set(map(str, chosen)) & set(fold["test"]))
    if reselect is True:
        return "reselect"
    if reselect is False:
        if saw_test:
            msg = (
                f"The gene panel was chosen on sections {chosen if chosen is not None else 'unknown'}, which include "
                f"test sections of fold {fold['fold']} ({fold['test']}). Pass `reselect_genes=None` (re-select on "
                "each fold's training sections) or choose the panel on training sections only."
            )
            raise ValueError(msg)
        return "keep"
    return "reselect" if saw_test else "keep"


def _check_raw(sdata: SpatialData, raw_table_key: str, table: AnnData) -> None:
    if raw_table_key not in sdata.tables or raw_table_key == STPRED_TABLE:
        msg = (
            f"Re-selecting genes per fold needs the raw-count table {raw_table_key!r} read by `pp.select_genes`; "
            f"found the tables {sorted(sdata.tables)}. Pass `raw_table_key=` or choose the panel on training "
            "sections only."
        )
        raise KeyError(msg)
    raw = sdata.tables[raw_table_key]
    if not raw.obs_names.equals(table.obs_names):
        msg = (
            f"The rows of table {raw_table_key!r} differ from those of the `stpred` table; re-run "
            "`stpred.pp.select_genes` so that both hold the same spots."
        )
        raise ValueError(msg)


def _fold_table(sdata: SpatialData, table: AnnData, fold: Mapping[str, Any], selection: Mapping[str, Any], raw_key: str) -> AnnData:
    """The ``stpred`` table of one fold: the recorded recipe re-run on the fold's training sections, normalised."""
    from ..pp import normalize, select_genes

    options = {"n_top": int(selection.get("n_top", 250)), "flavor": selection.get("flavor", "mean")}
    exclude = selection.get("exclude")
    if isinstance(exclude, str | list | tuple):
        options["exclude"] = list(exclude) if not isinstance(exclude, str) else exclude
    fold_table = select_genes(sdata, sections=list(fold["train"]), table_key=raw_key, inplace=False, **options)
    for key, value in table.obsm.items():
        if key not in fold_table.obsm:
            fold_table.obsm[key] = value
    for key in ("lattice", "mpp", "technology", "pitch_um"):
        if key in stpred_uns(table):
            stpred_uns(fold_table)[key] = stpred_uns(table)[key]
    sdata.tables[_FOLD_TABLE] = fold_table
    normalize(sdata, table_key=_FOLD_TABLE, method=dict(stpred_uns(table).get("normalize", {})).get("method", "log_share"))
    return sdata.tables[_FOLD_TABLE]


def _run_fold(
    sdata: SpatialData,
    table: AnnData,
    fold: dict[str, Any],
    plan: str,
    *,
    selection: Mapping[str, Any],
    order: Sequence[str],
    specs: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    description: dict[str, Any],
    raw_table_key: str,
    table_key: str,
    group_key: str,
    embedding_key: str | None,
    constant: str,
    n_boot: int,
    bootstrap_seed: int,
    progress: bool,
    path: str | os.PathLike | None,
    done: list[pd.DataFrame],
    fit_kwargs: Mapping[str, Any],
) -> list[pd.DataFrame]:
    """Fit and score every model and seed of one fold; the fold's temporary table is removed afterwards."""
    from ..models import get_model
    from ._evaluate import score_arrays
    from ._fit import fit_unregistered
    from ._inputs import target_matrix

    key = table_key
    try:
        if plan == "reselect":
            fold_table, key = _fold_table(sdata, table, fold, selection, raw_table_key), _FOLD_TABLE
        else:
            fold_table = table
        genes_on = list(fold["train"]) if plan == "reselect" else selection.get("sections", "user list")
        sections = fold_table.obs[SECTION_KEY].astype(str).to_numpy()
        rows = np.flatnonzero(np.isin(sections, fold["test"]))
        truth = target_matrix(fold_table)[rows].astype(np.float64)
        raw = None
        if dict(stpred_uns(fold_table).get("normalize", {})).get("method") == "log1p":
            x = fold_table.X[rows]
            raw = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
        entry = {
            "fold": fold["fold"],
            "train": list(fold["train"]),
            "test": list(fold["test"]),
            "test_patients": list(fold["test_patients"]),
            "genes": {"plan": plan, "chosen_on": genes_on, "n_genes": int(fold_table.n_vars)},
            "validation": {},
        }
        description["folds"].append(entry)
        frames = []
        for seed in seeds:
            preds: dict[str, np.ndarray] = {}
            for name in order:
                options = {**fit_kwargs, **specs[name]}
                trainable = get_model(name).trainable
                started = time.perf_counter()
                predictor = fit_unregistered(
                    sdata,
                    name,
                    train=list(fold["train"]),
                    val=None if trainable else False,
                    seed=seed,
                    embedding_key=embedding_key,
                    table_key=key,
                    group_key=group_key,
                    progress=progress,
                    **options,
                )
                entry["validation"][f"{name}/seed{seed}"] = {
                    **predictor.info["validation"],
                    "best": predictor.info["best"],
                }
                _check_validation(predictor.info["validation"], fold)
                pred = predictor.predict(sdata, list(fold["test"]), table_key=key, progress=progress)
                entry["validation"][f"{name}/seed{seed}"]["seconds"] = round(time.perf_counter() - started, 1)
                if not np.isfinite(pred).all():
                    msg = f"{name!r} predicted NaN or infinite values on fold {fold['fold']} (seed {seed})."
                    raise ValueError(msg)
                preds[name] = pred.astype(np.float64)
                compare = [(name, b) for b in BASELINES if b in preds and b != name]
                frame = score_arrays(
                    {name: preds[name], **{b: preds[b] for _, b in compare}},
                    truth,
                    labels=sections[rows],
                    raw=raw,
                    constant=constant,
                    compare=compare,
                    n_boot=n_boot,
                    seed=bootstrap_seed,
                )
                frame = frame[frame["key"] == name]
                frames.append(
                    frame.rename(columns={"key": "model", "group": "section"}).assign(
                        protocol=description["name"],
                        seed=seed,
                        fold=fold["fold"],
                        train_sections=",".join(fold["train"]),
                        test_sections=",".join(fold["test"]),
                        genes_chosen_on=",".join(genes_on) if isinstance(genes_on, list) else str(genes_on),
                    )
                )
                if path is not None:
                    write_json(path, pd.concat([*done, *frames], ignore_index=True), description)
        return frames
    finally:
        if _FOLD_TABLE in sdata.tables:
            del sdata.tables[_FOLD_TABLE]


def _check_validation(info: Mapping[str, Any], fold: Mapping[str, Any]) -> None:
    """The validation split of a fit must come from the fold's training sections (guards future split rules)."""
    used = set(info.get("sections", []))
    if used & set(fold["test"]):
        msg = f"The validation split used test sections {sorted(used & set(fold['test']))}; refusing the result."
        raise RuntimeError(msg)


def _model_specs(models: Any) -> dict[str, dict[str, Any]]:
    if isinstance(models, str):
        models = [models]
    if isinstance(models, Mapping):
        specs = {str(k): dict(v or {}) for k, v in models.items()}
    elif isinstance(models, Sequence):
        specs = {str(m): {} for m in models}
        if len(specs) != len(models):
            msg = f"`models` lists a model twice: {list(models)}."
            raise ValueError(msg)
    else:
        msg = f"Expected `models` to be a list of model names or a dict name -> options, found {type(models).__name__}."
        raise TypeError(msg)
    if not specs:
        msg = "`models` is empty; name at least one model, e.g. ['mean', 'ridge']."
        raise ValueError(msg)
    return specs


def _check_seeds(seeds: Any) -> list[int]:
    seeds = [seeds] if isinstance(seeds, int | np.integer) else list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int | np.integer) for s in seeds):
        msg = f"Expected `seeds` to be a non-empty list of ints, found {seeds!r}."
        raise ValueError(msg)
    if len(set(seeds)) != len(seeds):
        msg = f"`seeds` lists a seed twice: {seeds}."
        raise ValueError(msg)
    return [int(s) for s in seeds]


# ------------------------------------------------------------------------------------------------ reporting
def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds of the headline metrics (see :meth:`BenchmarkResult.summary`)."""
    frame = scores[scores["metric"].isin(SUMMARY_METRICS)].copy()
    if "comparator" not in frame:
        frame["comparator"] = np.nan
    frame["comparator"] = frame["comparator"].fillna("")
    keys = ["model", "metric", "comparator"]
    per_section = frame[~frame["section"].isin([MEAN_GROUP, POOLED_GROUP])]
    head = per_section.groupby([*keys, "seed"], sort=False)["value"].mean()
    pooled = frame[frame["section"] == POOLED_GROUP].groupby([*keys, "seed"], sort=False)["value"].mean()
    out = head.groupby(level=keys, sort=False).agg(["mean", "std", "count"]).rename(
        columns={"std": "sd", "count": "n_seeds"}
    )
    out["pooled"] = pooled.groupby(level=keys, sort=False).mean().reindex(out.index)
    return out.reset_index()


def _columns(scores: pd.DataFrame) -> dict[str, list[Any]]:
    """The tidy table as homogeneous columns (what ``uns`` can store): text columns with ``""`` for missing."""
    out = {}
    for col in scores.columns:
        values = scores[col]
        if values.dtype == object:
            out[col] = values.fillna("").astype(str).tolist()
        else:
            out[col] = values.astype(float).tolist() if values.dtype.kind == "f" else values.tolist()
    return out


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (so ``json.dumps(allow_nan=False)`` works)."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        return strict_json(value.item())
    return value


def write_json(path: str | os.PathLike, scores: pd.DataFrame, protocol: Mapping[str, Any]) -> Path:
    """Write ``{"protocol", "summary", "scores"}`` to ``path`` as strict JSON (atomically replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "protocol": protocol,
        "summary": summarize(scores).to_dict(orient="records") if len(scores) else [],
        "scores": scores.to_dict(orient="records"),
    }
    text = json.dumps(strict_json(plain_records(body)), indent=1, allow_nan=False)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def plain_records(value: Any) -> Any:
    """Numpy scalars and arrays as Python values, recursively (lists stay lists, unlike :func:`plain`)."""
    if isinstance(value, Mapping):
        return {str(k): plain_records(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [plain_records(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
