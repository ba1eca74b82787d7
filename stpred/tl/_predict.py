"""``tl.predict``: write a fitted model's predictions into ``layers`` of the ``stpred`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import STPRED_TABLE, TARGET_LAYER, UNS_KEY, prediction_layer
from .._docs import doc_overwrite, doc_params, doc_sdata_any
from .._provenance import plain, record, stpred_uns
from .._sections import section_names
from .._validate import check_one_of, check_sections, get_table
from ..io._anndata import accepts_anndata
from ._predictor import Predictor, resolve_predictor

if TYPE_CHECKING:
    from spatialdata import SpatialData


@accepts_anndata
@doc_params(sdata=doc_sdata_any, overwrite=doc_overwrite)
def predict(
    sdata: SpatialData,
    model: str | Predictor | Any = "hifusion",
    *,
    sections: Sequence[str] | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    table_key: str = STPRED_TABLE,
    missing_genes: Literal["raise", "nan"] = "raise",
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> None:
    """Predict expression for every spot and write it as a layer of the ``stpred`` table.

    Parameters
    ----------
    {sdata}
    model
        A model name fitted on this object with :func:`stpred.tl.fit` (found through the checkpoint recorded in
        ``uns["stpred"]["models"]``, also after a zarr round trip), a :class:`~stpred.tl.Predictor`, or the
        directory of a saved predictor. An object that has no ``table_key`` table yet (a section read on its
        own, never part of training) gets one: the predictor's genes (a :class:`KeyError` names any absent from
        the raw table's ``var_names``), their measured counts normalised with the predictor's recipe into
        ``layers["target"]`` (so :func:`stpred.tl.evaluate` can score them), and the crops the model reads cut at
        the training resolution; ``uns["stpred"]["made_for"]`` names the predictor.
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
        ``"cuda"`` or ``"cpu"`` (default: CUDA when available).
    progress
        Show a progress bar.

    Returns
    -------
    Nothing; writes ``sdata.tables["stpred"].layers[key_added]`` (float32, same shape as ``X``, normalised like
    ``layers["target"]``) and its provenance under ``uns["stpred"]["predictions"][key_added]``.

    Examples
    --------
    >>> stpred.tl.fit(sdata, "hifusion", train=["S0", "S1"])
    >>> stpred.tl.predict(sdata, "hifusion", sections=["S2"])
    >>> sdata.tables["stpred"].layers["stpred_hifusion"]
    """
    predictor = resolve_predictor(sdata, model, table_key=table_key)
    created = table_key not in getattr(sdata, "tables", {})
    check_one_of(missing_genes, ("raise", "nan"), name="missing_genes")
    if created:
        _prediction_table(sdata, predictor, table_key=table_key, missing_genes=missing_genes)
    try:
        _predict(sdata, predictor, sections=sections, key_added=key_added, overwrite=overwrite, table_key=table_key,
                 batch_size=batch_size, device=device, progress=progress)
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
        _table_with_missing(sdata, predictor, absent, layout.table_key, table_key, method)
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
    sdata: SpatialData, predictor: Predictor, absent: list[str], raw_key: str, table_key: str, method: str
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
) -> None:
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    key = key_added or prediction_layer(predictor.name)
    if key in table.layers and not overwrite:
        msg = f"Layer {key!r} already exists; pass `overwrite=True` to replace it or choose another `key_added`."
        raise ValueError(msg)
    if key in ("target", "counts"):
        msg = f"`key_added={key!r}` would replace the measured data; choose another name."
        raise ValueError(msg)
    all_sections = section_names(table)
    chosen = check_sections(sections, all_sections)
    pred = predictor.predict(sdata, chosen, table_key=table_key, batch_size=batch_size, device=device, progress=progress)
    layer = np.full(table.shape, np.nan, dtype=np.float32)
    rows = np.flatnonzero(np.isin(table.obs["section"].astype(str).to_numpy(), chosen))
    layer[rows] = pred
    table.layers[key] = layer
    entry = {
        "model": predictor.name,
        "sections": chosen,
        "genes": predictor.genes,
        "normalize": predictor.normalize,
        "seed": predictor.info.get("seed"),
        "train_sections": predictor.info.get("train_sections"),
        "config": predictor.info.get("config"),
        "checkpoint": predictor.info.get("checkpoint"),
        "n_train_spots": predictor.info.get("n_train_spots"),
        "versions": predictor.info.get("versions"),
    }
    predictions = dict(stpred_uns(table).get("predictions", {}))
    predictions[key] = plain(entry)
    table.uns[UNS_KEY]["predictions"] = predictions
    record(table, "tl.predict", model=predictor.name, key_added=key, sections=chosen)
