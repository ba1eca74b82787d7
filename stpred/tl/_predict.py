"""``tl.predict``: write a fitted model's predictions into ``layers`` of the ``stpred`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import STPRED_TABLE, UNS_KEY, prediction_layer
from .._docs import doc_overwrite, doc_params, doc_sdata
from .._provenance import plain, record, stpred_uns
from .._sections import section_names
from .._validate import check_device, check_sections, get_table
from ._predictor import Predictor, resolve_predictor

if TYPE_CHECKING:
    from spatialdata import SpatialData


@doc_params(sdata=doc_sdata, overwrite=doc_overwrite)
def predict(
    sdata: SpatialData,
    model: str | Predictor | Any = "hifusion",
    *,
    sections: Sequence[str] | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    table_key: str = STPRED_TABLE,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> None:
    """Predict expression for every spot and write it as a layer of the ``stpred`` table.

    Parameters
    ----------
    {sdata}
    model
        A model name fitted on this object with :func:`stpred.tl.fit`, a :class:`~stpred.tl.Predictor`, or the
        directory of a saved predictor.
    sections
        Sections to predict (``None``: all). Rows of other sections are NaN in the new layer.
    key_added
        Layer name (default ``"stpred_<model>"``).
    {overwrite}
    table_key
        Name of the ``stpred`` table.
    batch_size
        Spots per inference batch.
    device
        ``"cuda"``, ``"cuda:<index>"``, ``"cpu"`` or ``"mps"`` (default: CUDA when available). A device this
        torch build cannot use is refused before any work.
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
    device = check_device(device)
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    predictor = resolve_predictor(sdata, model, table_key=table_key)
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
        "validation": predictor.info.get("validation"),
        "config": predictor.info.get("config"),
        "checkpoint": predictor.info.get("checkpoint"),
        "versions": predictor.info.get("versions"),
    }
    predictions = dict(stpred_uns(table).get("predictions", {}))
    predictions[key] = plain(entry)
    table.uns[UNS_KEY]["predictions"] = predictions
    record(table, "tl.predict", model=predictor.name, key_added=key, sections=chosen)
