"""Downstream analysis on predicted layers: spatial domains, their agreement with measured ones, Moran's I."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SECTION_KEY, SPATIAL_KEY, STPRED_TABLE
from .._docs import doc_params, doc_sdata, doc_sdata_any
from .._provenance import plain, record, stpred_uns
from .._validate import check_positive, get_table
from ..io._anndata import accepts_anndata

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from scipy import sparse
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_doc_table_key = """\
table_key
    Name of the table written by :func:`stpred.pp.select_genes` (the one holding targets and predictions)."""

_doc_n_neighs = """\
n_neighs
    Neighbours per spot in the spatial graph (k-nearest neighbours, built per section so that no edge crosses
    sections). ``None`` chooses from ``uns["stpred"]["technology"]``: 6 for Visium's hexagonal lattice, 4 for the
    square lattices of legacy ST and synthetic data."""

#: Neighbours on each lattice: legacy ST and the synthetic data are square grids, Visium is hexagonal.
_LATTICE_NEIGHBOURS = {"legacy_st": 4, "synthetic": 4, "visium": 6}


# --------------------------------------------------------------------------------------------------- helpers
def _get_layer(table: AnnData, layer: str, *, table_key: str, name: str = "layer") -> np.ndarray:
    """Dense float64 copy of ``table.layers[layer]``, or a :class:`KeyError` listing the layers."""
    if not isinstance(layer, str):
        msg = f"Expected `{name}` to be a layer name (str), found {type(layer).__name__}."
        raise TypeError(msg)
    if layer not in table.layers:
        msg = (
            f"No layer {layer!r} in table {table_key!r}; available layers: {sorted(table.layers)}. "
            "Targets come from `stpred.pp.normalize(sdata)`, predictions from `stpred.tl.predict(sdata, model=...)`."
        )
        raise KeyError(msg)
    values = table.layers[layer]
    if hasattr(values, "toarray"):
        values = values.toarray()
    return np.asarray(values, dtype=np.float64)


def _complete_rows(*arrays: np.ndarray, what: str) -> np.ndarray:
    """Boolean mask of the rows that are finite in every array; warn when some are not."""
    keep = np.ones(arrays[0].shape[0], dtype=bool)
    for a in arrays:
        keep &= np.isfinite(a).all(axis=1)
    if not keep.any():
        msg = f"Every spot has NaN or infinite values in {what}; nothing to analyse."
        raise ValueError(msg)
    if not keep.all():
        warnings.warn(
            f"{int((~keep).sum())} of {keep.size} spots have NaN or infinite values in {what} (e.g. sections that "
            "were not predicted) and are left out.",
            UserWarning,
            stacklevel=3,
        )
    return keep


def _default_n_neighs(table: AnnData, sections: Sequence[str]) -> int:
    technology = stpred_uns(table).get("technology", {}) or {}
    kinds = {technology.get(s) for s in sections}
    counts = {_LATTICE_NEIGHBOURS.get(k, 6) for k in kinds}
    return max(counts) if counts else 6


def spatial_graph(table: AnnData, *, mask: np.ndarray | None = None, n_neighs: int | None = None) -> sparse.csr_matrix:
    """Spatial k-NN graph of the spots of ``table`` with no edge between sections.

    Parameters
    ----------
    table
        Table with ``obs["section"]`` and ``obsm["spatial"]``.
    mask
        Rows to keep (boolean); ``None`` keeps all.
    n_neighs
        Neighbours per spot; ``None`` chooses from the technology (see :func:`domains`).

    Returns
    -------
    Connectivities ``(n_kept, n_kept)`` as built by :func:`squidpy.gr.spatial_neighbors_knn` with
    ``library_key="section"``, in the order of the kept rows.
    """
    import anndata as ad
    import squidpy as sq

    if SPATIAL_KEY not in table.obsm:
        msg = f"The table has no `obsm[{SPATIAL_KEY!r}]` (spot centres); found {sorted(table.obsm)}."
        raise KeyError(msg)
    if SECTION_KEY not in table.obs:
        msg = f"The table has no `obs[{SECTION_KEY!r}]` column; found {list(table.obs.columns)}."
        raise KeyError(msg)
    mask = np.ones(table.n_obs, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    sections = table.obs[SECTION_KEY].astype(str).to_numpy()[mask]
    if n_neighs is None:
        n_neighs = _default_n_neighs(table, sorted(set(sections)))
    smallest = int(pd.Series(sections).value_counts().min())
    if smallest <= n_neighs:
        msg = f"A section has only {smallest} spots, too few for a {n_neighs}-neighbour spatial graph."
        raise ValueError(msg)
    tmp = ad.AnnData(
        obs=pd.DataFrame({SECTION_KEY: pd.Categorical(sections)}, index=np.arange(mask.sum()).astype(str)),
        obsm={SPATIAL_KEY: np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[mask]},
    )
    # squidpy logs every graph it builds through spatialdata's INFO-level logger: keep that quiet here
    sd_logger = logging.getLogger("spatialdata._logging")
    level = sd_logger.level
    sd_logger.setLevel(max(level, logging.WARNING))
    try:
        sq.gr.spatial_neighbors_knn(tmp, library_key=SECTION_KEY, n_neighs=int(n_neighs))
    finally:
        sd_logger.setLevel(level)
    return tmp.obsp["spatial_connectivities"].tocsr()


# --------------------------------------------------------------------------------------------------- domains
@accepts_anndata
@doc_params(sdata=doc_sdata_any, table_key=_doc_table_key, n_neighs=_doc_n_neighs)
def domains(
    sdata: SpatialData,
    *,
    layer: str,
    n_domains: int | None = None,
    resolution: float = 1.0,
    spatial_smoothing: float = 0.0,
    n_pcs: int = 20,
    key_added: str | None = None,
    table_key: str = STPRED_TABLE,
    random_state: int = 0,
    n_neighs: int | None = None,
    overwrite: bool = False,
) -> None:
    """Cluster spots into spatial domains from a measured or predicted expression layer.

    The layer is reduced by PCA (:func:`scanpy.pp.pca`, centred, not scaled). With ``spatial_smoothing > 0`` each
    spot's principal components are mixed with the mean of its spatial neighbours,
    ``(1 - w) * pc + w * mean(pc of neighbours)``, on a graph built per section (no edge crosses sections). The
    spots are then clustered:

    - ``n_domains=None``: Leiden on the k-NN graph of the components (:func:`scanpy.pp.neighbors` with 15
      neighbours, :func:`scanpy.tl.leiden` with ``flavor="igraph"``, ``directed=False``, ``n_iterations=2``); the
      number of domains follows ``resolution``;
    - ``n_domains=k``: k-means with ``k`` clusters on the components (``n_init=10``), which always gives exactly
      ``k`` domains (use it to compare with a known number of annotated regions).

    Domains are named ``"0"``, ``"1"``, ... from the largest to the smallest. Measured and predicted layers
    clustered with the same options can be compared with :func:`domain_agreement`.

    Parameters
    ----------
    {sdata}
    layer
        Layer of the table to cluster, e.g. ``"target"`` (measured) or ``"stpred_hifusion"`` (predicted).
    n_domains
        Fixed number of domains (k-means, at least 2); ``None`` uses Leiden.
    resolution
        Leiden resolution (higher: more domains). Ignored when ``n_domains`` is given.
    spatial_smoothing
        Weight ``w`` in [0, 1] of the neighbours' mean in the smoothed components; 0 turns smoothing off.
    n_pcs
        Number of principal components (capped at ``min(n_spots, n_genes) - 1``).
    key_added
        Name of the ``obs`` column written; default ``f"domains_{{layer}}"``.
    {table_key}
    random_state
        Seed of the PCA, the neighbour search and the clustering.
    {n_neighs}
    overwrite
        Replace an existing ``obs[key_added]`` column; by default an existing column is never replaced.

    Returns
    -------
    Nothing; writes to the table:

    - ``obs[key_added]``: Categorical domain labels (NaN for spots with non-finite values in ``layer``);
    - ``obsm[f"X_pca_{{key_added}}"]``: the (smoothed) components that were clustered (NaN rows for those spots);
    - ``uns["stpred"]["domains"][key_added]``: the parameters, also recorded in ``uns["stpred"]["history"]``.

    Examples
    --------
    >>> stpred.tl.domains(sdata, layer="target", n_domains=4)  # doctest: +SKIP
    >>> stpred.tl.domains(sdata, layer="stpred_hifusion", n_domains=4)  # doctest: +SKIP
    >>> stpred.tl.domain_agreement(sdata, "domains_stpred_hifusion", "domains_target")  # doctest: +SKIP
    """
    table = get_table(sdata, table_key)
    values = _get_layer(table, layer, table_key=table_key)
    if n_domains is not None:
        if not isinstance(n_domains, int | np.integer) or isinstance(n_domains, bool):
            msg = f"Expected `n_domains` to be an integer or None, found {type(n_domains).__name__}."
            raise TypeError(msg)
        if not 2 <= n_domains <= table.n_obs:
            msg = f"Expected `n_domains` between 2 and the number of spots ({table.n_obs}), found {n_domains}."
            raise ValueError(msg)
    check_positive(resolution, name="resolution")
    if not 0.0 <= spatial_smoothing <= 1.0:
        msg = f"Expected `spatial_smoothing` in [0, 1], found {spatial_smoothing!r}."
        raise ValueError(msg)
    check_positive(n_pcs, name="n_pcs")
    if n_neighs is not None:
        check_positive(n_neighs, name="n_neighs")
    key_added = f"domains_{layer}" if key_added is None else key_added
    if key_added in table.obs.columns and not overwrite:
        msg = f"`obs[{key_added!r}]` already exists; pass `overwrite=True` to replace it or choose another `key_added`."
        raise ValueError(msg)

    import anndata as ad
    import scanpy as sc

    keep = _complete_rows(values, what=f"layer {layer!r}")
    x = values[keep]
    n_comps = int(min(n_pcs, min(x.shape) - 1))
    if n_comps < 1:
        msg = f"Layer {layer!r} has shape {x.shape}; PCA needs at least 2 spots and 2 genes."
        raise ValueError(msg)
    if n_comps < n_pcs:
        logger.info("Using %d principal components (the data has shape %s).", n_comps, x.shape)
    tmp = ad.AnnData(X=x.astype(np.float32))
    sc.pp.pca(tmp, n_comps=n_comps, random_state=random_state)
    pcs = np.asarray(tmp.obsm["X_pca"], dtype=np.float64)
    if spatial_smoothing > 0:
        graph = spatial_graph(table, mask=keep, n_neighs=n_neighs)
        degree = np.asarray(graph.sum(axis=1)).ravel()
        degree[degree == 0] = 1.0
        neighbour_mean = (graph @ pcs) / degree[:, None]
        pcs = (1.0 - spatial_smoothing) * pcs + spatial_smoothing * neighbour_mean
    tmp.obsm["X_pca"] = pcs.astype(np.float32)

    if n_domains is None:
        sc.pp.neighbors(tmp, n_neighbors=min(15, tmp.n_obs - 1), use_rep="X_pca", random_state=random_state)
        sc.tl.leiden(
            tmp,
            resolution=resolution,
            flavor="igraph",
            directed=False,
            n_iterations=2,
            random_state=random_state,
        )
        raw = tmp.obs["leiden"].astype(str).to_numpy()
        method = "leiden"
    else:
        from sklearn.cluster import KMeans

        raw = KMeans(n_clusters=int(n_domains), n_init=10, random_state=random_state).fit_predict(pcs).astype(str)
        method = "kmeans"
    labels = _relabel_by_size(raw)

    full = np.full(table.n_obs, None, dtype=object)
    full[keep] = labels
    categories = [str(i) for i in range(len(set(labels)))]
    table.obs[key_added] = pd.Categorical(full, categories=categories)
    embedding = np.full((table.n_obs, pcs.shape[1]), np.nan, dtype=np.float32)
    embedding[keep] = pcs
    table.obsm[f"X_pca_{key_added}"] = embedding

    params: dict[str, Any] = {
        "layer": layer,
        "method": method,
        "n_domains": n_domains,
        "resolution": resolution,
        "spatial_smoothing": spatial_smoothing,
        "n_pcs": n_comps,
        "n_neighs": n_neighs,
        "random_state": random_state,
        "n_found": len(categories),
    }
    uns = stpred_uns(table)
    found = dict(uns.get("domains", {}) or {})
    found[key_added] = plain(params)
    uns["domains"] = found
    record(table, "tl.domains", key_added=key_added, **params)
    logger.info("Found %d domains in layer %r; labels in obs[%r].", len(categories), layer, key_added)


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Rename cluster labels ``"0"``, ``"1"``, ... by decreasing size (ties: by first appearance)."""
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    mapping = {uniq[i]: str(rank) for rank, i in enumerate(order)}
    return np.array([mapping[v] for v in labels], dtype=object)


# --------------------------------------------------------------------------------------------------- agreement
def _label_column(table: AnnData, key: str, *, table_key: str, name: str) -> pd.Series:
    if not isinstance(key, str):
        msg = f"Expected `{name}` to be an `obs` column name (str), found {type(key).__name__}."
        raise TypeError(msg)
    if key not in table.obs:
        msg = (
            f"No column {key!r} in `obs` of table {table_key!r}; found {list(table.obs.columns)}. "
            "Domain labels come from `stpred.tl.domains(sdata, layer=...)`."
        )
        raise KeyError(msg)
    return table.obs[key]


@doc_params(sdata=doc_sdata, table_key=_doc_table_key)
def domain_agreement(
    sdata: SpatialData,
    pred: str,
    truth: str,
    *,
    table_key: str = STPRED_TABLE,
    by: str | None = None,
) -> dict[str, float] | pd.DataFrame:
    """Agreement between two labelings of the spots: adjusted Rand index and normalised mutual information.

    Parameters
    ----------
    {sdata}
    pred
        ``obs`` column with the labels to judge, e.g. ``"domains_stpred_hifusion"``.
    truth
        ``obs`` column with the reference labels, e.g. ``"domains_target"`` or a pathologist annotation.
    {table_key}
    by
        ``obs`` column to group by (e.g. ``"section"``); ``None`` compares all spots at once.

    Returns
    -------
    With ``by=None``, ``{{"ari", "nmi", "n_spots"}}``; otherwise a DataFrame indexed by group with those columns.
    Spots whose label is missing in either column are left out. ARI is
    :func:`sklearn.metrics.adjusted_rand_score`, NMI :func:`sklearn.metrics.normalized_mutual_info_score`
    (arithmetic normalisation).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    table = get_table(sdata, table_key)
    p = _label_column(table, pred, table_key=table_key, name="pred")
    t = _label_column(table, truth, table_key=table_key, name="truth")
    groups = _label_column(table, by, table_key=table_key, name="by") if by is not None else None
    ok = (p.notna() & t.notna()).to_numpy()
    if not ok.any():
        msg = f"No spot has labels in both {pred!r} and {truth!r}."
        raise ValueError(msg)

    def score(mask: np.ndarray) -> dict[str, float]:
        a = p.astype(str).to_numpy()[mask]
        b = t.astype(str).to_numpy()[mask]
        return {
            "ari": float(adjusted_rand_score(b, a)),
            "nmi": float(normalized_mutual_info_score(b, a)),
            "n_spots": int(mask.sum()),
        }

    if groups is None:
        return score(ok)
    g = groups.astype(str).to_numpy()
    order = [str(c) for c in groups.cat.categories] if isinstance(groups.dtype, pd.CategoricalDtype) else None
    names = [n for n in (order or pd.unique(g)) if (ok & (g == n)).any()]
    frame = pd.DataFrame([score(ok & (g == n)) for n in names], index=pd.Index(names, name=by))
    return frame


@doc_params(sdata=doc_sdata, table_key=_doc_table_key, n_neighs=_doc_n_neighs)
def spatial_autocorr_agreement(
    sdata: SpatialData,
    *,
    layer: str,
    truth: str = "target",
    genes: Sequence[str] | None = None,
    table_key: str = STPRED_TABLE,
    n_neighs: int | None = None,
) -> pd.DataFrame:
    """Moran's I of each gene in a predicted layer and in the measured one.

    A good prediction keeps the spatial structure of each gene: genes with patchy expression (high I) should stay
    patchy, noise-like genes (I near 0) should not gain structure. Moran's I is computed by
    :func:`squidpy.gr.spatial_autocorr` (``mode="moran"``, no permutations) on one spatial k-NN graph built per
    section (no edge crosses sections) over the spots where both layers are finite.

    Parameters
    ----------
    {sdata}
    layer
        Predicted layer, e.g. ``"stpred_hifusion"``.
    truth
        Measured layer.
    genes
        Genes to score; ``None`` uses all genes of the table.
    {table_key}
    {n_neighs}

    Returns
    -------
    DataFrame indexed by gene with columns ``I_pred``, ``I_truth`` and ``delta`` (``I_pred - I_truth``). Genes
    constant in a layer get NaN. ``df.attrs`` holds the summary: ``"pearson"`` and ``"spearman"`` correlations
    between ``I_pred`` and ``I_truth`` over the genes where both are defined, ``"n_genes"`` (that count),
    ``"layer"``, ``"truth"`` and ``"n_spots"``.
    """
    import anndata as ad
    import squidpy as sq
    from scipy.stats import pearsonr, spearmanr

    table = get_table(sdata, table_key)
    pred_values = _get_layer(table, layer, table_key=table_key)
    truth_values = _get_layer(table, truth, table_key=table_key, name="truth")
    if n_neighs is not None:
        check_positive(n_neighs, name="n_neighs")
    all_genes = list(map(str, table.var_names))
    if genes is None:
        genes = all_genes
    else:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        missing = [g for g in genes if g not in set(all_genes)]
        if missing:
            msg = f"Gene(s) {missing} not in table {table_key!r}; available: {all_genes[:20]}{' …' if len(all_genes) > 20 else ''}."
            raise KeyError(msg)
        if len(genes) == 0:
            msg = "Expected at least one gene, found an empty list."
            raise ValueError(msg)
    cols = table.var_names.get_indexer(genes)
    keep = _complete_rows(pred_values[:, cols], truth_values[:, cols], what=f"layers {layer!r}/{truth!r}")
    graph = spatial_graph(table, mask=keep, n_neighs=n_neighs)

    tmp = ad.AnnData(
        X=np.zeros((int(keep.sum()), len(genes)), dtype=np.float32),
        var=pd.DataFrame(index=genes),
        layers={"pred": pred_values[np.ix_(keep, cols)], "truth": truth_values[np.ix_(keep, cols)]},
        obsp={"spatial_connectivities": graph},
    )
    out = pd.DataFrame(index=pd.Index(genes, name="gene"))
    for name, key in (("I_pred", "pred"), ("I_truth", "truth")):
        with warnings.catch_warnings():
            # constant genes: squidpy/scanpy warn and return NaN (or 0); handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*variables were constant.*", category=UserWarning)
            res = sq.gr.spatial_autocorr(
                tmp, mode="moran", layer=key, genes=genes, n_perms=None, n_jobs=1, copy=True, show_progress_bar=False
            )
        out[name] = res["I"].reindex(genes).to_numpy(dtype=np.float64)
    # a constant gene has no autocorrelation; squidpy may report 0 or NaN for it depending on the version
    out.loc[np.ptp(tmp.layers["pred"], axis=0) == 0, "I_pred"] = np.nan
    out.loc[np.ptp(tmp.layers["truth"], axis=0) == 0, "I_truth"] = np.nan
    out["delta"] = out["I_pred"] - out["I_truth"]

    both = out[["I_pred", "I_truth"]].dropna()
    pearson = spearman = float("nan")
    if len(both) >= 3 and both["I_pred"].nunique() > 1 and both["I_truth"].nunique() > 1:
        pearson = float(pearsonr(both["I_pred"], both["I_truth"])[0])
        spearman = float(spearmanr(both["I_pred"], both["I_truth"])[0])
    out.attrs = {
        "pearson": pearson,
        "spearman": spearman,
        "n_genes": len(both),
        "layer": layer,
        "truth": truth,
        "n_spots": int(keep.sum()),
    }
    return out
