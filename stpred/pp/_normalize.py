"""Normalise the selected genes' counts into the training target."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import sparse

from .._constants import STPRED_TABLE, TARGET_LAYER, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._provenance import record, stpred_uns
from .._validate import check_one_of, check_raw_counts, check_table_shape, get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_METHODS = ("log_share", "log1p")


def _transform(counts: np.ndarray, method: str) -> np.ndarray:
    c = counts.astype(np.float64)
    if method == "log1p":
        return np.log1p(c)
    shifted = c + 1.0
    return np.log(shifted) - np.log(shifted.sum(axis=1, keepdims=True))


@doc_params(sdata=doc_sdata)
def normalize(
    sdata: SpatialData,
    *,
    method: Literal["log_share", "log1p"] = "log_share",
    table_key: str = STPRED_TABLE,
    overwrite: bool = False,
) -> None:
    r"""Write the training target ``layers["target"]`` from the selected genes' raw counts.

    Parameters
    ----------
    {sdata}
    method
        ``"log_share"``: :math:`\ln\big((c_g + 1) / \sum_{{g'}} (c_{{g'}} + 1)\big)` per spot, the sum running
        over the selected genes (the log of each gene's pseudo-count share; HiFusion's target).
        ``"log1p"``: :math:`\ln(1 + c_g)`.
    table_key
        Table created by :func:`stpred.pp.select_genes`.
    overwrite
        Normalisation is cheap and deterministic, so re-running it (with any method) simply rewrites the target.
        The one exception: changing the method while prediction layers (``layers["stpred_*"]``) exist raises a
        :class:`ValueError`, since those models were trained on the old target; pass ``overwrite=True`` to replace
        the target anyway.

    Returns
    -------
    Nothing; writes ``layers["target"]`` (``float32``, same shape as ``X``) and ``uns["stpred"]["normalize"] =
    {{"method": method}}`` of the table, and a provenance entry.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32)
    >>> stpred.pp.select_genes(sdata, n_top=4)
    >>> stpred.pp.normalize(sdata, method="log_share")
    >>> sdata.tables["stpred"].layers["target"].dtype
    dtype('float32')
    """
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    check_one_of(method, _METHODS, name="method")
    check_table_shape(table, name=table_key)
    selection = dict(table.uns.get(UNS_KEY, {}).get("gene_selection", {}))
    check_raw_counts(table.X, name=table_key, allow_non_integer=bool(selection.get("allow_non_integer", False)))
    previous = dict(table.uns.get(UNS_KEY, {}).get("normalize", {})).get("method")
    predictions = sorted(k for k in table.layers if k.startswith("stpred_"))
    if TARGET_LAYER in table.layers and previous is not None and previous != method and predictions and not overwrite:
        msg = (
            f"Layer {TARGET_LAYER!r} was made with method {previous!r} and the prediction layers {predictions} were "
            f"trained on it; pass `overwrite=True` to switch to {method!r} anyway, or delete those layers first."
        )
        raise ValueError(msg)
    X = table.X
    counts = X.toarray() if sparse.issparse(X) else np.asarray(X)
    table.layers[TARGET_LAYER] = _transform(counts, method).astype(np.float32)
    uns = stpred_uns(table)
    uns["normalize"] = {"method": method}
    record(table, "normalize", method=method, table_key=table_key)
    logger.info("Wrote layers[%r] of table %r with method %r.", TARGET_LAYER, table_key, method)
