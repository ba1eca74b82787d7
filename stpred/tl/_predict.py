"""``tl.predict``: write a fitted model's predictions into ``layers`` of the ``stpred`` table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import STPRED_TABLE, TARGET_LAYER, UNS_KEY, prediction_layer
from .._docs import doc_overwrite, doc_params, doc_sdata_any
from .._provenance import plain, record, stpred_uns
from .._sections import section_names
from .._validate import check_device, check_one_of, check_sections, get_table
from ..io._anndata import accepts_anndata
from ._ensemble import EnsemblePredictor, as_ensemble
from ._predictor import Predictor, resolve_predictor
from ._region import predict_region
from ._uncertainty import check_options, predict_extras

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData


@accepts_anndata
@doc_params(sdata=doc_sdata_any, overwrite=doc_overwrite)
def predict(
    sdata: SpatialData,
    model: str | Predictor | EnsemblePredictor | Sequence[Any] | Any = "hifusion",
    *,
    sections: Sequence[str] | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    table_key: str = STPRED_TABLE,
    missing_genes: Literal["raise", "nan"] = "raise",
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    uncertainty: Literal["mc_dropout", "ensemble"] | None = None,
    n_samples: int = 20,
    ood: bool | None = None,
    seed: int = 0,
    region: str | None = None,
) -> None:
    """Predict expression for every spot and write it as a layer of the ``stpred`` table.

    Parameters
    ----------
    {sdata}
    model
        A model name fitted on this object with :func:`stpred.tl.fit` (found through the checkpoint recorded in
        ``uns["stpred"]["models"]``, also after a zarr round trip), a :class:`~stpred.tl.Predictor`, an
        :class:`~stpred.tl.EnsemblePredictor`, the directory of a saved one, or a list of these (a deep ensemble
        of predictors trained on the same genes; the layer holds their mean). An object that has no
        ``table_key`` table yet (a section read on its own, never part of training) gets one: the predictor's
        genes (a :class:`KeyError` names any absent from the raw table's ``var_names``), their measured counts
        normalised with the predictor's recipe into ``layers["target"]`` (so :func:`stpred.tl.evaluate` can
        score them), and the crops the model reads cut at the training resolution; ``uns["stpred"]["made_for"]``
        names the predictor.
    sections
        Sections to predict (``None``: all). Rows of other sections are NaN in the new layer.
    key_added
        Layer name (default ``"stpred_<model>"``).
    {overwrite}
    table_key
        Name of the ``stpred`` table.
    missing_genes
        Only used when the table is created for a new object. ``"raise"``: a :class:`KeyError` names the
        predictor's genes absent from the raw table. ``"nan"``: predict them anyway; their counts are NaN
        (missing, not zero), and so are their targets (with ``"log_share"``, whose denominator sums over every
        gene, all targets are NaN: only the predictions are meaningful then).
    batch_size
        Spots per inference batch.
    device
        ``"cuda"``, ``"cuda:<index>"``, ``"cpu"`` or ``"mps"`` (default: CUDA when available). A device this
        torch build cannot use is refused before any work.
    progress
        Show a progress bar.
    uncertainty
        ``None``: no spread. ``"mc_dropout"``: ``n_samples`` passes with the model's dropout layers (and only
        those; BatchNorm stays in eval mode) active; the layer holds the mean over the passes. Refused for a
        model without dropout. ``"ensemble"``: the members of an ensemble (``tl.fit(..., n_models=k)`` or
        ``model=[p1, p2, ...]``); the layer holds their mean. Both write the standard deviation to
        ``layers[key_added + "_std"]``. See :doc:`/uncertainty` for how well it is calibrated.
    n_samples
        MC-dropout passes (``>= 2``).
    ood
        Out-of-distribution scores: the Mahalanobis distance of each spot's image features from the training
        spots' (``obs[key_added + "_ood"]``) and whether it exceeds the validation spots' 99th percentile
        (``obs[key_added + "_ood_flag"]``). ``None``: when the predictor carries a reference (fitted by
        :func:`stpred.tl.fit` for HiFusion, HiST and MMAP); ``True``: required; ``False``: skipped.
    seed
        Seed of the MC-dropout masks (the random state is restored afterwards).
    region
        Key of a shapes element of tiles (from :func:`stpred.pp.tile`): predict every tile instead of the spots
        of the ``stpred`` table. Crops are cut around each tile centre at the microns per pixel the model was
        trained with (HiST: embedded with the training encoder, on a lattice of the tile centres); the tiles' table gets the genes as ``var``, the
        predictions (and ``_std``, ``_ood``) as above, and the provenance in ``uns["stpred"]["predictions"]``.
        ``sections`` and ``table_key`` do not apply. See :doc:`/he_only`.

    Returns
    -------
    Nothing; writes ``sdata.tables["stpred"].layers[key_added]`` (float32, same shape as ``X``, normalised like
    ``layers["target"]``), the optional ``_std`` layer and ``_ood`` / ``_ood_flag`` columns of ``obs`` (NaN /
    ``False`` outside ``sections``), and the provenance under ``uns["stpred"]["predictions"][key_added]``.

    Examples
    --------
    >>> stpred.tl.fit(sdata, "hifusion", train=["S0", "S1"])
    >>> stpred.tl.predict(sdata, "hifusion", sections=["S2"])
    >>> sdata.tables["stpred"].layers["stpred_hifusion"]
    """
    device = check_device(device)
    check_one_of(missing_genes, ("raise", "nan"), name="missing_genes")
    if region is not None:
        if sections is not None or table_key != STPRED_TABLE:
            msg = "`sections` and `table_key` select spots of the `stpred` table; with `region=` drop them."
            raise ValueError(msg)
        predict_region(
            sdata, _resolve_model(sdata, model, table_key), region, key_added=key_added, overwrite=overwrite,
            uncertainty=uncertainty, n_samples=n_samples, ood=ood, seed=seed, batch_size=batch_size, device=device,
            progress=progress,
        )  # fmt: skip
        return
    predictor = _resolve_model(sdata, model, table_key)
    with_ood = check_options(predictor, uncertainty=uncertainty, n_samples=n_samples, ood=ood)
    created = table_key not in getattr(sdata, "tables", {})
    if created:
        _prediction_table(sdata, predictor, table_key=table_key, missing_genes=missing_genes)
    try:
        _predict(
            sdata, predictor, sections=sections, key_added=key_added, overwrite=overwrite, table_key=table_key,
            batch_size=batch_size, device=device, progress=progress, uncertainty=uncertainty, n_samples=n_samples,
            with_ood=with_ood, seed=seed,
        )  # fmt: skip
    except BaseException:
        if created:  # a refused call leaves the object as it was
            del sdata.tables[table_key]
        raise


def _prediction_table(sdata: SpatialData, predictor: Predictor, *, table_key: str, missing_genes: str) -> None:
    """Create the table of a section never seen in training: the predictor's genes, normalised its way, with crops."""
    from ..io._adopt import resolve
    from ..pp import extract_patches, normalize, select_genes

    if not hasattr(sdata, "tables"):
        msg = f"Expected a SpatialData object or an AnnData, found {type(sdata).__name__}."
        raise TypeError(msg)
    layout = resolve(sdata)
    raw = sdata.tables[layout.table_key]
    var_names = set(map(str, raw.var_names))
    absent = [g for g in predictor.genes if g not in var_names]
    if absent and (missing_genes == "raise" or len(absent) == len(predictor.genes)):
        opt = " or pass `missing_genes='nan'` to predict them without measured values" if missing_genes == "raise" else ""
        msg = (
            f"{len(absent)} of the predictor's {len(predictor.genes)} genes are not in `var_names` of table "
            f"{layout.table_key!r} (first {min(len(absent), 10)}: {absent[:10]}). Check that the object uses the "
            f"same gene names as the training data (symbols vs Ensembl ids){opt}."
        )
        raise KeyError(msg)
    method = predictor.normalize.get("method", "log_share")
    if not absent:
        select_genes(sdata, genes=predictor.genes, table_key=layout.table_key, key_added=table_key)
    else:
        _table_with_missing(sdata, predictor, absent, raw_key=layout.table_key, table_key=table_key, method=method)
    try:
        if not absent:
            normalize(sdata, method=method, table_key=table_key)
        table = sdata.tables[table_key]
        made_for = {"model": predictor.name, "checkpoint": predictor.info.get("checkpoint"), "missing_genes": absent}
        stpred_uns(table)["made_for"] = plain(made_for)
        crops = getattr(predictor.model, "crop_sizes", (None, None))
        if set(getattr(predictor.model, "inputs", ())) & {"spot", "context"} and crops[0] is not None:
            context = crops[1] if "context" in predictor.model.inputs else None
            mpp = dict(predictor.info.get("patches") or {}).get("mpp")
            extract_patches(
                sdata, size=int(crops[0]), context_size=context, mpp=mpp, table_key=table_key, progress=False
            )
    except BaseException:
        del sdata.tables[table_key]
        raise


def _table_with_missing(
    sdata: SpatialData, predictor: Predictor, absent: list[str], *, raw_key: str, table_key: str, method: str
) -> None:
    """The prediction table when some of the predictor's genes are not measured: their counts and targets NaN."""
    from anndata import AnnData
    from spatialdata.models import TableModel

    from ..pp import select_genes
    from ..pp._normalize import _transform

    present = [g for g in predictor.genes if g not in set(absent)]
    part = select_genes(sdata, genes=present, table_key=raw_key, key_added=table_key, inplace=False)
    X = np.full((part.n_obs, len(predictor.genes)), np.nan, dtype=np.float32)
    cols = [predictor.genes.index(g) for g in present]
    X[:, cols] = np.asarray(part.X, dtype=np.float32)
    uns = {k: v for k, v in part.uns.items() if k != TableModel.ATTRS_KEY}
    table = AnnData(X=X, obs=part.obs.copy(), obsm=dict(part.obsm), uns=uns)
    table.var_names = pd.Index(predictor.genes)
    table.layers[TARGET_LAYER] = _transform(X, method).astype(np.float32)
    stpred_uns(table)["genes"] = list(predictor.genes)
    stpred_uns(table)["normalize"] = {"method": method}
    attrs = part.uns[TableModel.ATTRS_KEY]
    sdata.tables[table_key] = TableModel.parse(
        table,
        region=attrs[TableModel.REGION_KEY],
        region_key=attrs[TableModel.REGION_KEY_KEY],
        instance_key=attrs[TableModel.INSTANCE_KEY],
    )


def _predict(
    sdata: SpatialData,
    predictor: Predictor,
    *,
    sections: Sequence[str] | None,
    key_added: str | None,
    overwrite: bool,
    table_key: str,
    batch_size: int | None,
    device: str | None,
    progress: bool,
    uncertainty: str | None,
    n_samples: int,
    with_ood: bool,
    seed: int,
) -> None:
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    key = key_added or prediction_layer(predictor.name)
    std_key, ood_key, flag_key = f"{key}_std", f"{key}_ood", f"{key}_ood_flag"
    written = [("layers", key), *([("layers", std_key)] if uncertainty else [])]
    written += [("obs", ood_key), ("obs", flag_key)] if with_ood else []
    taken = [f"`{where}[{k!r}]`" for where, k in written if k in getattr(table, where)]
    if taken and not overwrite:
        verb, them = ("exists", "it") if len(taken) == 1 else ("exist", "them")
        msg = f"{', '.join(taken)} already {verb}; pass `overwrite=True` to replace {them} or choose another `key_added`."
        raise ValueError(msg)
    if key in ("target", "counts") or std_key in ("target", "counts"):
        msg = f"`key_added={key!r}` would replace the measured data; choose another name."
        raise ValueError(msg)
    all_sections = section_names(table)
    chosen = check_sections(sections, all_sections)
    rows = np.flatnonzero(np.isin(table.obs["section"].astype(str).to_numpy(), chosen))
    extras = None
    if uncertainty is None and not with_ood:
        pred = predictor.predict(
            sdata, chosen, table_key=table_key, batch_size=batch_size, device=device, progress=progress
        )
    else:
        extras = predict_extras(
            predictor, sdata, chosen, uncertainty=uncertainty, n_samples=n_samples, ood=with_ood, seed=seed,
            table_key=table_key, batch_size=batch_size, device=device, progress=progress,
        )  # fmt: skip
        pred = extras.mean
    layer = np.full(table.shape, np.nan, dtype=np.float32)
    layer[rows] = pred
    table.layers[key] = layer
    # an overwritten prediction keeps no spread or OOD columns of the one it replaces
    if uncertainty is None:
        table.layers.pop(std_key, None)
    if not with_ood:
        table.obs.drop(columns=[c for c in (ood_key, flag_key) if c in table.obs], inplace=True)
    if extras is not None and extras.std is not None:
        spread = np.full(table.shape, np.nan, dtype=np.float32)
        spread[rows] = extras.std
        table.layers[std_key] = spread
    if extras is not None and extras.ood_score is not None:
        score = np.full(table.n_obs, np.nan, dtype=np.float32)
        flag = np.zeros(table.n_obs, dtype=bool)
        score[rows], flag[rows] = extras.ood_score, extras.ood_flag
        table.obs[ood_key], table.obs[flag_key] = score, flag
    entry = {
        "model": predictor.name,
        "sections": chosen,
        "genes": predictor.genes,
        "normalize": predictor.normalize,
        "seed": predictor.info.get("seed"),
        "train_sections": predictor.info.get("train_sections"),
        "validation": predictor.info.get("validation"),
        "config": predictor.info.get("config"),
        "checkpoint": predictor.info.get("checkpoint"),
        "n_train_spots": predictor.info.get("n_train_spots"),
        "versions": predictor.info.get("versions"),
        **({"ensemble": predictor.info["ensemble"]} if "ensemble" in predictor.info else {}),
        **(extras.provenance if extras is not None else {}),
    }
    predictions = dict(stpred_uns(table).get("predictions", {}))
    predictions[key] = plain(entry)
    table.uns[UNS_KEY]["predictions"] = predictions
    record(
        table, "tl.predict", model=predictor.name, key_added=key, sections=chosen,
        **({"uncertainty": uncertainty, "n_samples": n_samples} if uncertainty else {}),
        **({"ood": True} if with_ood else {}),
    )  # fmt: skip


def _resolve_model(sdata: SpatialData, model: Any, table_key: str) -> Any:
    """A Predictor or EnsemblePredictor from what ``model=`` accepts (a list makes an ensemble)."""
    if isinstance(model, list | tuple):
        return as_ensemble(model, sdata, table_key=table_key)
    if isinstance(model, EnsemblePredictor):
        return model
    return resolve_predictor(sdata, model, table_key=table_key)
