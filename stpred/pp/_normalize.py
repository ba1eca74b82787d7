"""Normalise the selected genes' counts into the training target."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import sparse

from .._constants import STPRED_TABLE, TARGET_LAYER, UNS_KEY
from .._docs import doc_params, doc_sdata_any
from .._provenance import record, stpred_uns
from .._validate import check_one_of, check_raw_counts, check_table_shape, get_table
from ..io._anndata import accepts_anndata
from ._inplace import check_copy_inplace, table_copy

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_METHODS = ("log_share", "log1p", "log10_cp10k")
#: Counts per spot that ``"log10_cp10k"`` scales each spot's selected-gene total to.
_CP10K = 1e4


#: Rows normalised per block: bounds the float64 working memory to a few block-sized arrays.
_BLOCK_ROWS = 16_384


def _transform(counts: np.ndarray, method: str) -> np.ndarray:
    c = counts.astype(np.float64)
    if method == "log1p":
        return np.log1p(c)
    if method == "log10_cp10k":
        total = c.sum(axis=1, keepdims=True)
        share = np.divide(c, total, out=np.zeros_like(c), where=total > 0)  # a spot without counts stays 0
        return np.log10(1.0 + _CP10K * share)
    shifted = c + 1.0
    return np.log(shifted) - np.log(shifted.sum(axis=1, keepdims=True))


def _target(X: np.ndarray | sparse.spmatrix, method: str, *, name: str) -> np.ndarray:
    """The ``float32`` target of ``X``, computed in row blocks (a sparse ``X`` is densified one block at a time)."""
    out = np.empty(X.shape, dtype=np.float32)
    for lo in range(0, X.shape[0], _BLOCK_ROWS):
        block = X[lo : lo + _BLOCK_ROWS]
        block = block.toarray() if sparse.issparse(block) else np.asarray(block)
        if np.isnan(block).any() or (block < 0).any():
            msg = f"`X` of table {name!r} must hold raw counts (no NaN, no negative values)."
            raise ValueError(msg)
        out[lo : lo + _BLOCK_ROWS] = _transform(block, method)
    return out


@accepts_anndata
@doc_params(sdata=doc_sdata_any)
def normalize(
    sdata: SpatialData,
    *,
    method: Literal["log_share", "log1p", "log10_cp10k"] = "log_share",
    table_key: str = STPRED_TABLE,
    key_added: str = TARGET_LAYER,
    overwrite: bool = False,
    inplace: bool = True,
    copy: bool = False,
) -> np.ndarray | SpatialData | None:
    r"""Write the training target ``layers["target"]`` from the selected genes' raw counts.

    Parameters
    ----------
    {sdata}
    method
        ``"log_share"``: :math:`\ln\big((c_g + 1) / \sum_{{g'}} (c_{{g'}} + 1)\big)` per spot, the sum running
        over the selected genes (the log of each gene's pseudo-count share; HiFusion's target).
        ``"log1p"``: :math:`\ln(1 + c_g)` (HiST's target).
        ``"log10_cp10k"``: :math:`\log_{{10}}\big(1 + 10^4 \, c_g / \sum_{{g'}} c_{{g'}}\big)`, the sum running over
        the selected genes (counts per 10,000 of the selected genes, then log base 10; MMAP's target, values in
        ``[0, 4]``). A spot without counts in any selected gene gets 0 everywhere.
    table_key
        Table created by :func:`stpred.pp.select_genes`.
    overwrite
        Normalisation is cheap and deterministic, so re-running it (with any method) simply rewrites the target.
        The one exception: changing the method while prediction layers (``layers["stpred_*"]``) exist raises a
        :class:`ValueError`, since those models were trained on the old target; pass ``overwrite=True`` to replace
        the target anyway.
    key_added
        Layer to write. The models train on ``layers["target"]``; another name keeps a second normalisation
        next to it (e.g. for plotting).
    inplace
        ``False``: return the target array instead of writing it (scanpy's convention); ``sdata`` is unchanged.
    copy
        ``True``: return a new SpatialData holding copies of the tables with the layer written, sharing the other
        elements with ``sdata``, which stays unchanged. Cannot be combined with ``inplace=False``.

    Returns
    -------
    ``None`` by default, and writes ``layers[key_added]`` (``float32``, same shape as ``X``; computed in blocks of
    rows, so a sparse ``X`` is never densified whole) and ``uns["stpred"]["normalize"] = {{"method": method}}``
    of the table (``uns["stpred"]["layers"][key_added]`` for another layer), and a provenance entry. With ``inplace=False`` the array is returned
    instead; with ``copy=True`` the new SpatialData.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32)
    >>> stpred.pp.select_genes(sdata, n_top=4)
    >>> stpred.pp.normalize(sdata, method="log_share")
    >>> sdata.tables["stpred"].layers["target"].dtype
    dtype('float32')
    """
    check_copy_inplace(copy=copy, inplace=inplace)
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    check_one_of(method, _METHODS, name="method")
    check_table_shape(table, name=table_key)
    selection = dict(table.uns.get(UNS_KEY, {}).get("gene_selection", {}))
    check_raw_counts(table.X, name=table_key, allow_non_integer=bool(selection.get("allow_non_integer", False)))
    if not isinstance(key_added, str) or not key_added:
        msg = f"Expected `key_added` to be a non-empty layer name, found {key_added!r}."
        raise ValueError(msg)
    uns = dict(table.uns.get(UNS_KEY, {}))
    previous = dict(uns.get("normalize", {})).get("method")
    predictions = sorted(k for k in table.layers if k.startswith("stpred_"))
    if (
        inplace
        and key_added == TARGET_LAYER
        and TARGET_LAYER in table.layers
        and previous is not None
        and previous != method
        and predictions
        and not overwrite
    ):
        msg = (
            f"Layer {TARGET_LAYER!r} was made with method {previous!r} and the prediction layers {predictions} were "
            f"trained on it; pass `overwrite=True` to switch to {method!r} anyway, or delete those layers first."
        )
        raise ValueError(msg)
    target = _target(table.X, method, name=table_key)
    if not inplace:
        return target
    out = table_copy(sdata) if copy else sdata
    table = out.tables[table_key]
    table.layers[key_added] = target
    if key_added == TARGET_LAYER:
        stpred_uns(table)["normalize"] = {"method": method}
    else:
        stpred_uns(table).setdefault("layers", {})[key_added] = {"method": method}
    record(table, "normalize", method=method, table_key=table_key, key_added=key_added)
    logger.info("Wrote layers[%r] of table %r with method %r.", key_added, table_key, method)
    return out if copy else None
