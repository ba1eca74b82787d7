"""Choose the genes to predict and create the ``stpred`` table."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import SECTION_KEY, SPATIAL_KEY, STPRED_TABLE, UNS_KEY
from .._docs import doc_overwrite, doc_params, doc_sdata, doc_sections, doc_table_key
from .._provenance import record
from .._validate import check_one_of, check_positive, check_raw_counts, check_sections, check_table_shape, get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_FLAVORS = ("mean", "hvg")


def section_names(adata: AnnData) -> list[str]:
    """Sections of ``adata`` in a stable order (category order when categorical, else first appearance).

    Parameters
    ----------
    adata
        Table with an ``obs["section"]`` column.

    Returns
    -------
    The section names that have at least one row.
    """
    if SECTION_KEY not in adata.obs:
        msg = f"The table has no `obs[{SECTION_KEY!r}]` column; found {list(adata.obs.columns)}. Read the data with an `stpred.io` reader."
        raise KeyError(msg)
    col = adata.obs[SECTION_KEY]
    present = pd.unique(col.astype(str))
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.categories if str(c) in set(present)]
    return [str(s) for s in present]


def _shared_genes(raw: AnnData) -> np.ndarray:
    """Boolean mask of the genes present in every section (from ``var["present_{section}"]`` where written)."""
    mask = np.ones(raw.n_vars, dtype=bool)
    for section in section_names(raw):
        col = f"present_{section}"
        if col in raw.var and pd.api.types.is_bool_dtype(raw.var[col]):
            mask &= raw.var[col].to_numpy(dtype=bool)
    return mask


def _rank_mean(raw: AnnData, rows_by_section: dict[str, np.ndarray], genes: np.ndarray) -> pd.DataFrame:
    """Average over sections of the per-section mean raw count of each gene."""
    X = raw.X
    means = []
    for rows in rows_by_section.values():
        sub = X[rows][:, genes]
        means.append(np.asarray(sub.mean(axis=0, dtype=np.float64)).ravel())
    score = np.mean(means, axis=0)
    df = pd.DataFrame({"gene": raw.var_names[genes].astype(str), "score": score})
    return df.sort_values(["score", "gene"], ascending=[False, True], kind="mergesort")


def _rank_hvg(
    raw: AnnData, rows_by_section: dict[str, np.ndarray], genes: np.ndarray, n_top: int
) -> tuple[pd.DataFrame, str]:
    """Rank genes with :func:`scanpy.pp.highly_variable_genes` on the raw counts of the chosen sections."""
    import anndata as ad
    import scanpy as sc

    rows = np.concatenate(list(rows_by_section.values()))
    X = raw.X[rows][:, genes]
    X = X.astype(np.float32) if sparse.issparse(X) else sparse.csr_matrix(np.asarray(X, dtype=np.float32))
    adata = ad.AnnData(X=sparse.csr_matrix(X), obs=pd.DataFrame(index=raw.obs_names[rows].astype(str)))
    adata.var_names = raw.var_names[genes].astype(str)
    adata.obs[SECTION_KEY] = pd.Categorical(
        np.repeat(list(rows_by_section), [len(r) for r in rows_by_section.values()])
    )
    batch_key = SECTION_KEY if len(rows_by_section) > 1 else None
    try:
        import skmisc  # noqa: F401  (seurat_v3 fits a loess curve with scikit-misc)

        hvg_flavor = "seurat_v3"
    except ImportError:
        hvg_flavor = "seurat"
    if hvg_flavor == "seurat_v3":
        df = sc.pp.highly_variable_genes(
            adata, flavor="seurat_v3", n_top_genes=n_top, batch_key=batch_key, inplace=False
        )
        df.index = adata.var_names
        df["gene"] = adata.var_names.to_numpy()
        df["rank"] = df["highly_variable_rank"].fillna(np.inf)
        df = df.sort_values(["rank", "gene"], kind="mergesort")
    else:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        df = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top, batch_key=batch_key, inplace=False)
        df.index = adata.var_names
        df["gene"] = adata.var_names.to_numpy()
        nb = df["highly_variable_nbatches"] if "highly_variable_nbatches" in df else pd.Series(1, index=df.index)
        df["_hv"] = df["highly_variable"].astype(bool)
        df["_nb"] = nb.fillna(0).to_numpy()
        df["_disp"] = df["dispersions_norm"].astype(np.float64).fillna(-np.inf).to_numpy()
        df = df.sort_values(["_hv", "_nb", "_disp", "gene"], ascending=[False, False, False, True], kind="mergesort")
    return df, hvg_flavor


@doc_params(sdata=doc_sdata, sections=doc_sections, table_key=doc_table_key, overwrite=doc_overwrite)
def select_genes(
    sdata: SpatialData,
    *,
    n_top: int = 250,
    flavor: Literal["mean", "hvg"] = "mean",
    sections: Sequence[str] | None = None,
    table_key: str = "table",
    overwrite: bool = False,
    allow_non_integer: bool = False,
) -> None:
    """Choose the genes to predict and create the ``stpred`` table.

    Only genes present in every section of the data are candidates (``var["present_<section>"]``, written by
    :func:`stpred.io.concat`, where it exists; otherwise every column of the table counts as present), so that the
    test sections have a measured value for every selected gene.

    Parameters
    ----------
    {sdata}
    n_top
        Number of genes to keep.
    flavor
        ``"mean"``: the genes with the highest mean raw count, where the mean is taken per section over that
        section's spots and then averaged over the chosen sections (the HiFusion recipe); ties are broken by gene
        name. ``"hvg"``: :func:`scanpy.pp.highly_variable_genes` on the chosen sections (``batch_key="section"``
        with more than one section), ``flavor="seurat_v3"`` on raw counts when ``scikit-misc`` is installed,
        otherwise ``flavor="seurat"`` on log1p-normalised copies (``normalize_total(target_sum=1e4)``); the flavour
        used is recorded as ``uns["stpred"]["gene_selection"]["hvg_flavor"]``.
    {sections}
        Pass only the training sections to keep the test sections out of the gene choice.
    {table_key}
    {overwrite}
    allow_non_integer
        Accept non-integer values in ``X`` (e.g. counts estimated by another tool), with a warning. By default
        ``X`` must hold raw counts: finite, non-negative integers; log-transformed or normalised data is refused.

    Returns
    -------
    Nothing; adds ``sdata.tables["stpred"]``: the same ``obs`` (a copy) and ``obsm["spatial"]``, ``X`` the dense
    ``float32`` raw counts of the selected genes (ranked, best first), annotating the same shapes, and
    ``uns["stpred"]`` = the raw table's ``uns["stpred"]`` plus ``"genes"`` (list) and ``"gene_selection"``
    (``flavor``, ``n_top``, ``sections``, ``test_sections_included``: ``False`` when ``sections`` is a strict subset
    of the data's sections) and a provenance entry.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32)
    >>> stpred.pp.select_genes(sdata, n_top=4, sections=["S0"])
    >>> sdata.tables["stpred"].shape
    (61, 4)
    """
    from anndata import AnnData
    from spatialdata.models import TableModel

    try:
        raw = get_table(sdata, table_key)
    except KeyError as err:
        msg = (
            f"{err.args[0]} Pass `table_key=` naming the raw-count table, or read the data with an `stpred.io` reader."
        )
        raise KeyError(msg) from None
    check_table_shape(raw, name=table_key)
    check_raw_counts(raw.X, name=table_key, allow_non_integer=allow_non_integer)
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer):
        msg = f"Expected `n_top` to be an int, found {type(n_top).__name__}."
        raise TypeError(msg)
    check_positive(n_top, name="n_top")
    check_one_of(flavor, _FLAVORS, name="flavor")
    available = section_names(raw)
    chosen = check_sections(sections, available)
    if STPRED_TABLE in sdata.tables and not overwrite:
        msg = f"Table {STPRED_TABLE!r} already exists; pass `overwrite=True` to replace it (its layers are lost)."
        raise ValueError(msg)
    if table_key == STPRED_TABLE:
        msg = f"`table_key` must name the raw-count table, not {STPRED_TABLE!r}."
        raise ValueError(msg)
    shared = np.flatnonzero(_shared_genes(raw))
    if n_top > len(shared):
        msg = (
            f"`n_top={n_top}` is larger than the number of genes present in all sections ({len(shared)}); "
            f"pass `n_top<={len(shared)}`."
        )
        raise ValueError(msg)

    sec = raw.obs[SECTION_KEY].astype(str).to_numpy()
    rows_by_section = {s: np.flatnonzero(sec == s) for s in chosen}
    info: dict[str, object] = {}
    if flavor == "mean":
        ranked = _rank_mean(raw, rows_by_section, shared)
    else:
        ranked, info["hvg_flavor"] = _rank_hvg(raw, rows_by_section, shared, n_top)
    genes = ranked["gene"].to_numpy()[:n_top].astype(str)
    logger.info("Selected %d of %d shared genes (flavor=%r, sections=%s).", n_top, len(shared), flavor, chosen)

    gene_idx = raw.var_names.get_indexer(genes)
    X = raw.X[:, gene_idx]
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    var = raw.var.iloc[gene_idx].copy()
    var.index = pd.Index(genes)
    adata = AnnData(X=np.ascontiguousarray(X, dtype=np.float32), obs=raw.obs.copy(), var=var)
    if SPATIAL_KEY in raw.obsm:
        adata.obsm[SPATIAL_KEY] = np.asarray(raw.obsm[SPATIAL_KEY], dtype=np.float64).copy()
    attrs = raw.uns.get(TableModel.ATTRS_KEY, {})
    uns = copy.deepcopy(dict(raw.uns.get(UNS_KEY, {})))
    uns["genes"] = [str(g) for g in genes]
    uns["gene_selection"] = {
        "flavor": flavor,
        "n_top": int(n_top),
        "sections": list(chosen),
        "test_sections_included": set(chosen) == set(available),
        **({"allow_non_integer": True} if allow_non_integer else {}),
        **info,
    }
    adata.uns[UNS_KEY] = uns
    if attrs:
        region = attrs[TableModel.REGION_KEY]
        adata = TableModel.parse(
            adata,
            region=list(region) if not isinstance(region, str) else region,
            region_key=attrs[TableModel.REGION_KEY_KEY],
            instance_key=attrs[TableModel.INSTANCE_KEY],
        )
    else:
        adata = TableModel.parse(adata)
    record(
        adata,
        "select_genes",
        n_top=int(n_top),
        flavor=flavor,
        sections=list(chosen),
        table_key=table_key,
        **info,
    )
    sdata.tables[STPRED_TABLE] = adata
