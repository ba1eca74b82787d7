"""Choose the genes to predict and create the ``stpred`` table."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import SECTION_KEY, STPRED_TABLE, UNS_KEY
from .._docs import doc_overwrite, doc_params, doc_sdata_any, doc_sections
from .._provenance import record
from .._validate import (
    check_one_of,
    check_positive,
    check_raw_counts,
    check_sections,
    check_table_shape,
    get_table,
)
from ..io._adopt import raw_table_key, resolve, stpred_table
from ..io._anndata import accepts_anndata
from ._inplace import check_copy_inplace, table_copy

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_FLAVORS = ("mean", "hvg")




def _shared_genes(raw: AnnData, sections: Sequence[str]) -> np.ndarray:
    """Boolean mask of the genes present in every section (from ``var["present_{section}"]`` where written)."""
    mask = np.ones(raw.n_vars, dtype=bool)
    for section in sections:
        col = f"present_{section}"
        if col in raw.var and pd.api.types.is_bool_dtype(raw.var[col]):
            mask &= raw.var[col].to_numpy(dtype=bool)
    return mask


def _section_sums(X: np.ndarray | sparse.spmatrix, rows_by_section: dict[str, np.ndarray], n_obs: int) -> np.ndarray:
    """Per-section column sums of ``X`` (``n_sections × n_vars``, float64) without copying or densifying ``X``.

    One sparse indicator matrix (sections × rows) times ``X``: memory is ``O(n_sections × n_vars)`` on top of ``X``.
    """
    rows = np.concatenate(list(rows_by_section.values()))
    cols = np.repeat(np.arange(len(rows_by_section)), [len(r) for r in rows_by_section.values()])
    indicator = sparse.csr_matrix((np.ones(len(rows)), (cols, rows)), shape=(len(rows_by_section), n_obs))
    sums = indicator @ X
    return sums.toarray() if sparse.issparse(sums) else np.asarray(sums, dtype=np.float64)


def _rank_mean(raw: AnnData, rows_by_section: dict[str, np.ndarray], genes: np.ndarray) -> pd.DataFrame:
    """Average over sections of the per-section mean raw count of each gene."""
    sums = _section_sums(raw.X, rows_by_section, raw.n_obs)[:, genes]
    sizes = np.array([len(r) for r in rows_by_section.values()], dtype=np.float64)
    score = (sums / sizes[:, None]).mean(axis=0)
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


#: What ``exclude=`` accepts: prefixes, a compiled regular expression, or a predicate on the gene name.
GeneFilter = str | Sequence[str] | re.Pattern | Callable[[str], bool]


def _exclusion_mask(names: pd.Index, exclude: GeneFilter) -> tuple[np.ndarray, str]:
    """Boolean mask of the gene names matched by ``exclude`` and a printable description of the rule."""
    names = names.astype(str)
    if isinstance(exclude, re.Pattern):
        return np.array([exclude.search(g) is not None for g in names], dtype=bool), f"regex {exclude.pattern!r}"
    if callable(exclude):
        hits = np.array([bool(exclude(g)) for g in names], dtype=bool)
        return hits, f"callable {getattr(exclude, '__name__', type(exclude).__name__)}"
    prefixes = [exclude] if isinstance(exclude, str) else list(exclude)
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        msg = (
            f"Expected `exclude` to be a prefix, a sequence of non-empty prefixes, a compiled regex or a callable, "
            f"found {exclude!r}."
        )
        raise TypeError(msg)
    upper = names.str.upper()
    hits = np.zeros(len(names), dtype=bool)
    for prefix in prefixes:
        hits |= np.asarray(upper.str.startswith(prefix.upper()), dtype=bool)
    return hits, f"prefixes {prefixes} (case-insensitive)"


def _explicit_genes(raw: AnnData, genes: Sequence[str], shared: np.ndarray) -> np.ndarray:
    """Validate an explicit gene list against ``raw.var_names``; return the genes in the given order."""
    if isinstance(genes, str) or not isinstance(genes, Sequence | np.ndarray | pd.Index):
        msg = f"Expected `genes` to be a list of gene names, found {type(genes).__name__}."
        raise TypeError(msg)
    wanted = pd.Index([str(g) for g in genes], dtype=object)
    if len(wanted) == 0:
        msg = "Expected at least one gene in `genes`, found an empty list."
        raise ValueError(msg)
    if wanted.has_duplicates:
        dup = wanted[wanted.duplicated()].unique()[:10].tolist()
        msg = f"`genes` lists {int(wanted.duplicated().sum())} gene(s) more than once (first: {dup}); list each once."
        raise ValueError(msg)
    var_names = raw.var_names.astype(str)
    idx = var_names.get_indexer(wanted) if var_names.is_unique else pd.Index(var_names).get_indexer_for(wanted)
    absent = wanted[idx < 0]
    if len(absent):
        hint = ""
        for column in ("gene_ids", "gene_symbols", "gene_name"):
            if column in raw.var and pd.Index(raw.var[column].astype(str)).isin(absent).any():
                hint = f" Some of them are in `var[{column!r}]`: pass the names used as `var_names` instead."
                break
        msg = (
            f"{len(absent)} of {len(wanted)} requested gene(s) are not in the table's `var_names` (first "
            f"{min(len(absent), 10)}: {absent[:10].tolist()}).{hint} Drop them from `genes` "
            "(e.g. `[g for g in genes if g in sdata.tables['table'].var_names]`)."
        )
        raise KeyError(msg)
    not_everywhere = wanted[~np.isin(idx, shared)]
    if len(not_everywhere):
        warnings.warn(
            f"{len(not_everywhere)} requested gene(s) are not measured in every section (first: "
            f"{not_everywhere[:10].tolist()}); their counts are 0 where they were not measured.",
            UserWarning,
            stacklevel=3,
        )
    return wanted.to_numpy().astype(str)


@accepts_anndata
@doc_params(sdata=doc_sdata_any, sections=doc_sections, overwrite=doc_overwrite)
def select_genes(
    sdata: SpatialData,
    *,
    n_top: int | None = None,
    flavor: Literal["mean", "hvg"] | None = None,
    genes: Sequence[str] | None = None,
    exclude: GeneFilter | None = None,
    sections: Sequence[str] | None = None,
    table_key: str | None = None,
    key_added: str = STPRED_TABLE,
    overwrite: bool = False,
    allow_non_integer: bool = False,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    r"""Choose the genes to predict and create the ``stpred`` table.

    Either rank genes (``n_top`` / ``flavor``, optionally after ``exclude``) or take an explicit list
    (``genes``, e.g. a published panel or the genes of a saved predictor); the two are mutually exclusive.

    When ranking, only genes present in every section of the data are candidates (``var["present_<section>"]``,
    written by :func:`stpred.io.concat`, where it exists; otherwise every column of the table counts as present),
    so that the test sections have a measured value for every selected gene. The raw counts are never densified:
    the ranking uses sparse per-section sums, and only the selected genes' columns become a dense matrix.

    Parameters
    ----------
    {sdata}
    n_top
        Number of genes to keep (default 250 when ``genes`` is not given).
    flavor
        ``"mean"`` (default): the genes with the highest mean raw count, where the mean is taken per section over
        that section's spots and then averaged over the chosen sections (the HiFusion recipe); ties are broken by
        gene name. ``"hvg"``: :func:`scanpy.pp.highly_variable_genes` on the chosen sections
        (``batch_key="section"`` with more than one section), ``flavor="seurat_v3"`` on raw counts when
        ``scikit-misc`` is installed, otherwise ``flavor="seurat"`` on log1p-normalised copies
        (``normalize_total(target_sum=1e4)``); the flavour used is recorded as
        ``uns["stpred"]["gene_selection"]["hvg_flavor"]``.
    genes
        Explicit gene list (names as in ``var_names``), kept in the given order. Genes absent from the table raise
        a :class:`KeyError` listing them (the first ten and their number); genes measured in only some sections
        are kept with a warning.
    exclude
        Genes never to select when ranking: a prefix or a sequence of prefixes (matched case-insensitively, so
        ``("MT-", "RPL", "RPS")`` removes human and mouse mitochondrial and ribosomal-protein genes), a compiled
        :class:`re.Pattern` (genes where ``pattern.search(name)`` matches) or a callable ``name -> bool``
        (``True`` = exclude). Mitochondrial and ribosomal genes are among the most abundant transcripts, so
        without this they take a large share of a top-250 panel ranked by mean count; note that the prefix
        ``"RPS"`` also matches the kinases ``RPS6K*`` (use a regex such as ``re.compile(r"^(MT-|RP[SL]\d+[A-Z]?\d*$|RPLP\d$|RPSA$)", re.I)``
        to be stricter). The rule and the number of excluded genes are recorded.
    {sections}
        Pass only the training sections to keep the test sections out of the gene choice.
    table_key
        Name of the raw-count table; ``None``: the one recorded by :func:`stpred.io.adopt`, else ``"table"``,
        else the only table (other than ``"stpred"``).
    key_added
        Name of the table to create.
    {overwrite}
    inplace
        ``False``: return the new table instead of adding it to ``sdata`` (scanpy's convention).
    copy
        ``True``: return a new SpatialData holding copies of the tables plus the new table, sharing the other
        elements with ``sdata``, which stays unchanged. Cannot be combined with ``inplace=False``.
    allow_non_integer
        Accept non-integer values in ``X`` (e.g. counts estimated by another tool), with a warning. By default
        ``X`` must hold raw counts: finite, non-negative integers; log-transformed or normalised data is refused.

    Returns
    -------
    ``None`` by default, and ``sdata.tables[key_added]`` is added: the same ``obs`` (a copy) and
    ``obsm["spatial"]``, ``X`` the dense ``float32`` raw counts of the selected genes (ranked best first, or in the
    order of ``genes``), annotating the same shapes, and ``uns["stpred"]`` = the raw table's ``uns["stpred"]`` plus
    ``"genes"`` (list) and ``"gene_selection"`` (``flavor`` — ``"list"`` for an explicit list —, ``n_top``,
    ``sections``, ``test_sections_included``: ``False`` when ``sections`` is a strict subset of the data's
    sections, and ``exclude``/``n_excluded`` when given) and a provenance entry. With ``inplace=False`` the table
    is returned instead; with ``copy=True`` the new SpatialData.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32)
    >>> stpred.pp.select_genes(sdata, n_top=4, sections=["S0"])
    >>> sdata.tables["stpred"].shape
    (61, 4)
    >>> panel = list(sdata.tables["table"].var_names[:3])
    >>> stpred.pp.select_genes(sdata, genes=panel, inplace=False).var_names.tolist() == panel
    True
    """
    from spatialdata.models import TableModel

    check_copy_inplace(copy=copy, inplace=inplace)
    if table_key is None and hasattr(sdata, "tables"):
        table_key = raw_table_key(sdata)
    try:
        raw = get_table(sdata, table_key)
    except KeyError as err:
        msg = (
            f"{err.args[0]} Pass `table_key=` naming the raw-count table, or read the data with an `stpred.io` reader."
        )
        raise KeyError(msg) from None
    check_table_shape(raw, name=table_key)
    check_raw_counts(raw.X, name=table_key, allow_non_integer=allow_non_integer)
    if genes is not None:
        given = [name for name, v in (("n_top", n_top), ("flavor", flavor), ("exclude", exclude)) if v is not None]
        if given:
            msg = f"`genes=` gives the gene list itself; it cannot be combined with {', '.join(f'`{g}=`' for g in given)}."
            raise ValueError(msg)
    else:
        n_top = 250 if n_top is None else n_top
        flavor = "mean" if flavor is None else flavor
        if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer):
            msg = f"Expected `n_top` to be an int, found {type(n_top).__name__}."
            raise TypeError(msg)
        check_positive(n_top, name="n_top")
        check_one_of(flavor, _FLAVORS, name="flavor")
    if not isinstance(key_added, str) or not key_added:
        msg = f"Expected `key_added` to be a non-empty table name, found {key_added!r}."
        raise ValueError(msg)
    layout = resolve(sdata, table_key=table_key)
    available = list(layout.sections)
    chosen = check_sections(sections, available)
    if inplace and key_added in sdata.tables and not overwrite:
        msg = f"Table {key_added!r} already exists; pass `overwrite=True` to replace it (its layers are lost)."
        raise ValueError(msg)
    if table_key in (STPRED_TABLE, key_added):
        msg = f"`table_key` must name the raw-count table, not {table_key!r} (the table `select_genes` writes)."
        raise ValueError(msg)
    shared = np.flatnonzero(_shared_genes(raw, available))

    sec = layout.section_labels(raw)
    rows_by_section = {s: np.flatnonzero(sec == s) for s in chosen}
    info: dict[str, object] = {}
    if genes is not None:
        selected = _explicit_genes(raw, genes, shared)
        flavor, n_top = "list", len(selected)
    else:
        if exclude is not None:
            hits, rule = _exclusion_mask(raw.var_names[shared], exclude)
            info["exclude"] = rule
            info["n_excluded"] = int(hits.sum())
            shared = shared[~hits]
        if n_top > len(shared):
            after = " after `exclude`" if exclude is not None else ""
            msg = (
                f"`n_top={n_top}` is larger than the number of genes present in all sections{after} ({len(shared)}); "
                f"pass `n_top<={len(shared)}`."
            )
            raise ValueError(msg)
        if flavor == "mean":
            ranked = _rank_mean(raw, rows_by_section, shared)
        else:
            ranked, info["hvg_flavor"] = _rank_hvg(raw, rows_by_section, shared, n_top)
        selected = ranked["gene"].to_numpy()[:n_top].astype(str)
    logger.info("Selected %d genes (flavor=%r, sections=%s).", len(selected), flavor, chosen)

    adata = stpred_table(sdata, layout, selected)
    attrs = raw.uns.get(TableModel.ATTRS_KEY, {})
    uns = adata.uns[UNS_KEY]
    uns["genes"] = [str(g) for g in selected]
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
        key_added=key_added,
        **info,
    )
    if not inplace:
        return adata
    target = table_copy(sdata) if copy else sdata
    target.tables[key_added] = adata
    return target if copy else None
