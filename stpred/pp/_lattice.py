"""Integer lattice of spot positions in physical units (the input geometry of HiST)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .._constants import SECTION_KEY, SPATIAL_KEY, STPRED_TABLE, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._lattice import lattice_indices
from .._provenance import record, stpred_uns
from .._validate import check_positive, get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Default lattice unit (µm) per technology (HiST reference: 55 µm for Visium, 100 µm for legacy ST).
DEFAULT_UNIT_UM = {"legacy_st": 100.0, "visium": 55.0}

def _default_unit(technology: str | None, pitch_um: float | None, section: str) -> float:
    if technology in DEFAULT_UNIT_UM:
        return DEFAULT_UNIT_UM[technology]
    if technology == "synthetic" and pitch_um is not None:
        return float(pitch_um) / 2.0
    msg = (
        f"No default lattice unit for section {section!r} (technology {technology!r}, pitch {pitch_um!r} µm); "
        "pass `unit_um=` (e.g. 55.0 for Visium-like, 100.0 for legacy-ST-like spacing)."
    )
    raise ValueError(msg)


@doc_params(sdata=doc_sdata)
def lattice(
    sdata: SpatialData,
    *,
    unit_um: float | Mapping[str, float] | None = None,
    table_key: str = STPRED_TABLE,
    key_added: str = "lattice",
) -> None:
    """Place every spot on an integer lattice in physical units (the geometry HiST attends over).

    Per section, the spot centres ``obsm["spatial"]`` (pixels) are converted to microns with
    ``uns["stpred"]["mpp"][section]`` and placed by collision-free
    rounding to the nearest free cell of a grid with step ``unit_um``, shifted to start at 0.

    Parameters
    ----------
    {sdata}
    unit_um
        Lattice step in microns: one value for all sections or a mapping ``section -> value``. ``None`` uses
        the technology of each section (``uns["stpred"]["technology"]``): 100 µm for legacy ST, 55 µm for Visium
        (the HiST reference values) and half the spot pitch for synthetic data.
    table_key
        Table whose spots are mapped (default the ``"stpred"`` table made by :func:`stpred.pp.select_genes`).
    key_added
        Name of the ``obsm`` entry to write.

    Returns
    -------
    Nothing; sets

    - ``sdata.tables[table_key].obsm[key_added]``: int64 ``(n_spots, 2)`` lattice indices (x, y) per section;
    - ``sdata.tables[table_key].uns["stpred"]["lattice"]``: ``{{"key": key_added, "unit_um": {{section: µm}}}}``.
    """
    table = get_table(sdata, table_key)
    if not isinstance(key_added, str) or not key_added:
        msg = f"Expected `key_added` to be a non-empty string, found {key_added!r}."
        raise TypeError(msg)
    out, units = compute_lattice(table, unit_um=unit_um, table_key=table_key)
    table.obsm[key_added] = out
    stpred_uns(table)["lattice"] = {"key": key_added, "unit_um": units}
    record(table, "lattice", unit_um=units, key_added=key_added, table_key=table_key)


def compute_lattice(
    table: AnnData, *, unit_um: float | Mapping[str, float] | None = None, table_key: str = STPRED_TABLE
) -> tuple[np.ndarray, dict[str, float]]:
    """Lattice indices of every row of ``table`` and the unit of each section, without writing anything."""
    if SPATIAL_KEY not in table.obsm:
        msg = (
            f"Table {table_key!r} has no `obsm[{SPATIAL_KEY!r}]` (spot centres in pixels); found {sorted(table.obsm)}."
        )
        raise KeyError(msg)
    if SECTION_KEY not in table.obs:
        msg = f"Table {table_key!r} has no `obs[{SECTION_KEY!r}]` column; found {list(table.obs.columns)}."
        raise KeyError(msg)
    meta = table.uns.get(UNS_KEY, {})
    mpp = meta.get("mpp")
    if not isinstance(mpp, Mapping):
        msg = f"Table {table_key!r} has no `uns['stpred']['mpp']` (µm per pixel per section); read the data with stpred.io."
        raise KeyError(msg)
    sections = [str(s) for s in table.obs[SECTION_KEY].astype(str).unique()]
    missing = [s for s in sections if s not in mpp]
    if missing:
        msg = f"No µm-per-pixel value for section(s) {missing} in `uns['stpred']['mpp']`; found {sorted(mpp)}."
        raise KeyError(msg)

    technology = meta.get("technology", {}) or {}
    pitch = meta.get("pitch_um", {}) or {}
    units: dict[str, float] = {}
    for s in sections:
        if unit_um is None:
            units[s] = _default_unit(technology.get(s), pitch.get(s), s)
        elif isinstance(unit_um, Mapping):
            if s not in unit_um:
                msg = f"`unit_um` has no value for section {s!r}; found {sorted(unit_um)}."
                raise KeyError(msg)
            units[s] = float(unit_um[s])
        else:
            units[s] = float(unit_um)
        check_positive(units[s], name=f"unit_um[{s!r}]")

    xy = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    labels = table.obs[SECTION_KEY].astype(str).to_numpy()
    out = np.zeros((table.n_obs, 2), dtype=np.int64)
    for s in sections:  # a loop over sections, not spots
        rows = np.flatnonzero(labels == s)
        out[rows] = lattice_indices(xy[rows] * float(mpp[s]), units[s])
    return out, units
