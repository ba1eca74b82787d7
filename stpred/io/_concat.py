"""Combine single-section SpatialData objects into one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import RAW_TABLE, SECTION_KEY, UNS_KEY

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

_ELEMENT_KINDS = ("images", "labels", "points", "shapes")


def _sections_of(table: AnnData, i: int) -> list[str]:
    if SECTION_KEY not in table.obs:
        msg = (
            f"The table of object {i} has no `obs[{SECTION_KEY!r}]` column; found {list(table.obs.columns)}. "
            "Read sections with `stpred.io.read_legacy_st` / `stpred.io.read_visium`."
        )
        raise KeyError(msg)
    return list(pd.unique(table.obs[SECTION_KEY].astype(str)))


def _regions_of(table: AnnData) -> list[str]:
    """Names of the elements that ``table`` annotates."""
    region = table.uns.get("spatialdata_attrs", {}).get("region", [])
    return [region] if isinstance(region, str) else list(region)


def _merge_stpred_uns(tables: Sequence[AnnData]) -> dict[str, Any]:
    """Merge the per-section dictionaries of ``uns["stpred"]`` (``mpp``, ``pitch_um``, ...) of every table."""
    merged: dict[str, Any] = {}
    for table in tables:
        for key, value in dict(table.uns.get(UNS_KEY, {})).items():
            if isinstance(value, dict) and isinstance(merged.get(key, {}), dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
    return merged


def _merge_var(tables: Sequence[AnnData], sections: Sequence[Sequence[str]]) -> pd.DataFrame:
    """Union of genes in order of first appearance; ``present_{section}`` says which section measured each gene."""
    genes = pd.Index(pd.unique(np.concatenate([t.var_names.to_numpy(dtype=object) for t in tables])), dtype=object)
    var = pd.DataFrame(index=genes)
    for table, secs in zip(tables, sections, strict=True):
        present = genes.isin(table.var_names)
        for section in secs:
            column = f"present_{section}"
            if column in table.var:  # keep what a reader recorded (a merged input may miss some genes)
                values = table.var[column].reindex(genes)
                var[column] = values.where(values.notna(), other=False).astype(bool).to_numpy()
            else:
                var[column] = present
    # other gene annotations: first non-missing value over the tables
    for table in tables:
        for column in table.var.columns:
            if column.startswith("present_"):
                continue
            values = table.var[column].reindex(genes)
            if column not in var:
                var[column] = values
            else:
                var[column] = var[column].where(var[column].notna(), values)
    return var


def concat(sdatas: Sequence[SpatialData]) -> SpatialData:
    """Combine sections read separately into one SpatialData object.

    Images, shapes (and any labels or points) are kept under their names; the raw tables are concatenated into one
    ``"table"`` that annotates every section's shapes.

    Parameters
    ----------
    sdatas
        SpatialData objects in the stpred contract (from :func:`stpred.io.read_legacy_st`,
        :func:`stpred.io.read_visium` or :func:`stpred.io.concat`), each with one table ``"table"`` and no other.
        Section names must be unique across all of them.

    Returns
    -------
    One SpatialData object with every element of the inputs and the table ``"table"``:

    - ``X``: raw counts (CSR, float32) over the **union** of genes; a gene that a section did not measure is 0
      there, and ``var["present_{section}"]`` (bool) is ``False`` for it, so the genes measured in every section
      are ``var.filter(like="present_").all(axis=1)``;
    - ``obs``, ``obsm["spatial"]``: stacked in input order;
    - ``uns["stpred"]``: the per-section dictionaries (``mpp``, ``spot_diameter_um``, ``pitch_um``,
      ``technology``) merged.

    Examples
    --------
    >>> import stpred
    >>> a = stpred.datasets.synthetic(n_sections=1, seed=0)
    >>> sdata = stpred.io.concat([a])
    """
    import anndata as ad
    from scipy import sparse
    from spatialdata import SpatialData

    from ._legacy_st import _parse_table

    if isinstance(sdatas, SpatialData) or not isinstance(sdatas, Sequence):
        msg = f"Expected a list of SpatialData objects, found {type(sdatas).__name__}. Pass `[sdata_a, sdata_b, ...]`."
        raise TypeError(msg)
    if len(sdatas) == 0:
        msg = "Expected at least one SpatialData object, found an empty list."
        raise ValueError(msg)
    tables = []
    for i, sdata in enumerate(sdatas):
        if not isinstance(sdata, SpatialData):
            msg = f"Expected SpatialData objects, found {type(sdata).__name__} at position {i}."
            raise TypeError(msg)
        names = sorted(sdata.tables)
        if names != [RAW_TABLE]:
            msg = (
                f"Object {i} has tables {names}; `concat` combines raw sections with exactly one table "
                f"{RAW_TABLE!r}. Concatenate before `stpred.pp.select_genes` (or delete the other tables)."
            )
            raise ValueError(msg)
        tables.append(sdata.tables[RAW_TABLE])

    sections = [_sections_of(t, i) for i, t in enumerate(tables)]
    flat = [s for secs in sections for s in secs]
    duplicated = sorted({s for s in flat if flat.count(s) > 1})
    if duplicated:
        msg = f"Section names must be unique across the inputs; found {duplicated} more than once. Rename a section."
        raise ValueError(msg)

    elements: dict[str, dict[str, Any]] = {kind: {} for kind in _ELEMENT_KINDS}
    for sdata in sdatas:
        for kind in _ELEMENT_KINDS:
            for name, element in getattr(sdata, kind).items():
                if name in elements[kind]:
                    msg = f"Element name {name!r} ({kind}) occurs in more than one input; rename it before `concat`."
                    raise ValueError(msg)
                elements[kind][name] = element

    var = _merge_var(tables, sections)
    regions = list(dict.fromkeys(r for t in tables for r in _regions_of(t)))
    stripped = []
    for table in tables:
        t = ad.AnnData(X=sparse.csr_matrix(table.X, dtype=np.float32), obs=table.obs.copy(), var=table.var[[]].copy())
        t.obsm.update({k: np.asarray(v) for k, v in table.obsm.items()})
        stripped.append(t)
    joined = ad.concat(stripped, join="outer", merge=None, fill_value=0)
    if joined.obs_names.has_duplicates:
        dup = joined.obs_names[joined.obs_names.duplicated()][:3].tolist()
        msg = f"Spot names must be unique across sections; found duplicates (first: {dup})."
        raise ValueError(msg)
    joined = joined[:, var.index].copy()
    joined.X = sparse.csr_matrix(joined.X, dtype=np.float32)
    joined.var = var
    for column in joined.obs.columns:
        categorical = any(column in t.obs and isinstance(t.obs[column].dtype, pd.CategoricalDtype) for t in tables)
        if categorical and not joined.obs[column].isna().any():
            joined.obs[column] = pd.Categorical(
                joined.obs[column].astype(str), categories=list(dict.fromkeys(joined.obs[column].astype(str)))
            )
    joined.uns[UNS_KEY] = _merge_stpred_uns(tables)
    return SpatialData(**elements, tables={RAW_TABLE: _parse_table(joined, regions)})
