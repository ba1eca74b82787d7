"""Integer lattice of spot positions in physical units (the input geometry of HiST)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .._constants import SECTION_KEY, SPATIAL_KEY, STPRED_TABLE, UNS_KEY
from .._docs import doc_params, doc_sdata
from .._provenance import record, stpred_uns
from .._validate import check_positive, get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Default lattice unit (µm) per technology (HiST reference: 55 µm for Visium, 100 µm for legacy ST).
DEFAULT_UNIT_UM = {"legacy_st": 100.0, "visium": 55.0}

# Cells are packed into one int64 key: (x + _OFF) * _STRIDE + (y + _OFF); valid while |x|, |y| < _OFF.
_OFF = np.int64(2**30)
_STRIDE = np.int64(2**31)
_MAX_EXTENT = 2**28
#: Largest candidate matrix (spots x cells) searched at once.
_CHUNK = 2**21


def _keys(cells: np.ndarray) -> np.ndarray:
    return (cells[..., 0] + _OFF) * _STRIDE + (cells[..., 1] + _OFF)


def _is_taken(keys: np.ndarray, taken_sorted: np.ndarray) -> np.ndarray:
    if taken_sorted.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.searchsorted(taken_sorted, keys)
    return taken_sorted[np.minimum(pos, taken_sorted.size - 1)] == keys


def _resolve(keys: np.ndarray, d2: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Boolean mask of the claims that win their cell: smallest distance, then smallest spot index."""
    order = np.lexsort((index, d2, keys))
    first = np.ones(order.size, dtype=bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    win = np.zeros(order.size, dtype=bool)
    win[order[first]] = True
    return win


def _offsets(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1, dtype=np.int64)
    # lexicographic (dx, dy): with a common base per spot, argmin's first hit is the smallest (x, y) among ties
    return np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1).reshape(-1, 2)


def lattice_indices(xy_um: np.ndarray, unit_um: float) -> np.ndarray:
    """Map spot centres to a collision-free integer lattice whose step is ``unit_um`` microns.

    Each spot has a continuous lattice position ``p = (xy - min(xy)) / unit_um``. Spots are placed in rounds:

    1. Every spot claims the cell nearest to ``p`` (Euclidean distance; a tie goes to the smaller x, then the
       smaller y, i.e. halves round down).
    2. When several spots claim the same cell, the spot nearest to it wins (ties: smaller row index). The others
       are *collided*.
    3. Each collided spot claims the free cell (not taken in an earlier round) nearest to its ``p``, with the same
       tie rule, and conflicts are resolved as in 2. Repeat until every spot is placed.

    So a spot is never pushed out of its own nearest cell by a displaced spot, and the result does not depend on
    the order of the rows (except for exact ties in distance). Finally the indices are shifted so that each axis
    starts at 0. Only collided spots enter the later rounds, each round is vectorised over them.

    Parameters
    ----------
    xy_um
        ``(n, 2)`` spot centres (x, y) in microns.
    unit_um
        Lattice step in microns (HiST: 55 for Visium, 100 for legacy ST).

    Returns
    -------
    ``(n, 2)`` int64 lattice indices (x, y), unique per row, each axis starting at 0.

    Examples
    --------
    >>> lattice_indices(np.array([[0.0, 0.0], [40.0, 0.0], [210.0, 95.0]]), 100.0).tolist()
    [[0, 0], [1, 0], [2, 1]]
    """
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        msg = f"Expected spot centres of shape (n, 2), found shape {xy.shape}."
        raise ValueError(msg)
    if xy.shape[0] == 0:
        msg = "Expected at least one spot, found 0."
        raise ValueError(msg)
    if not np.isfinite(xy).all():
        msg = f"Spot centres must be finite; found {int((~np.isfinite(xy)).any(axis=1).sum())} row(s) with NaN or inf."
        raise ValueError(msg)
    if not np.isfinite(unit_um):
        msg = f"Expected a finite `unit_um`, found {unit_um!r}."
        raise ValueError(msg)
    check_positive(float(unit_um), name="unit_um")

    pos = (xy - xy.min(axis=0)) / float(unit_um)
    if pos.max() >= _MAX_EXTENT:
        msg = (
            f"The lattice would span {pos.max():.3g} cells with `unit_um={unit_um}`; the limit is {_MAX_EXTENT}. "
            "Check the units (microns) and choose a larger `unit_um`."
        )
        raise ValueError(msg)

    n = pos.shape[0]
    span = np.ceil(pos.max(axis=0) - 0.5).astype(np.int64) + 3  # the cells they span plus a border of one
    if n > int(span[0]) * int(span[1]):
        msg = (
            f"{n} spots do not fit on the {span[0]} x {span[1]} lattice cells around them with `unit_um={unit_um}`; "
            "choose a smaller `unit_um` (at most the centre-to-centre spot distance)."
        )
        raise ValueError(msg)
    index = np.arange(n)
    base = np.ceil(pos - 0.5).astype(np.int64)  # nearest cell, halves round down
    keys = _keys(base)
    d2 = ((base - pos) ** 2).sum(axis=1)
    win = _resolve(keys, d2, index)
    out = base.copy()
    taken = np.sort(keys[win])
    todo = index[~win]
    if todo.size > 0.1 * n and n > 10:
        warnings.warn(
            f"{todo.size} of {n} spots share a lattice cell at `unit_um={unit_um}`; the unit is probably too large "
            "for this spot spacing (placement gets slow and distorted).",
            UserWarning,
            stacklevel=2,
        )
    radius = np.ones(n, dtype=np.int64)
    n_rounds = 0
    while todo.size:
        n_rounds += 1
        claims_spot, claims_cell, claims_d2 = [], [], []
        for r in np.unique(radius[todo]):
            group = todo[radius[todo] == r]
            off = _offsets(int(r))
            step = max(1, _CHUNK // off.shape[0])
            for start in range(0, group.size, step):  # chunks bound the (m, K) candidate matrix, not one per spot
                spots = group[start : start + step]
                cand = base[spots, None, :] + off[None]  # (m, K, 2)
                cd2 = ((cand - pos[spots, None, :]) ** 2).sum(axis=-1)
                cd2[_is_taken(_keys(cand), taken)] = np.inf
                best = cd2.argmin(axis=1)
                bd2 = cd2[np.arange(spots.size), best]
                # any cell outside the square lies at least r + 0.5 away from p: only then is `best` the nearest
                sure = bd2 < (r + 0.5) ** 2
                radius[spots[~sure]] *= 2
                claims_spot.append(spots[sure])
                claims_cell.append(cand[np.arange(spots.size), best][sure])
                claims_d2.append(bd2[sure])
        spots = np.concatenate(claims_spot)
        if spots.size:
            cells = np.concatenate(claims_cell)
            ckeys = _keys(cells)
            won = _resolve(ckeys, np.concatenate(claims_d2), spots)
            out[spots[won]] = cells[won]
            taken = np.sort(np.concatenate([taken, ckeys[won]]))
            done = np.zeros(n, dtype=bool)
            done[spots[won]] = True
            todo = todo[~done[todo]]
    if n_rounds:
        logger.debug("lattice: %d collided spot(s) placed in %d round(s)", int((~win).sum()), n_rounds)
    return out - out.min(axis=0)


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
    ``uns["stpred"]["mpp"][section]`` and mapped by collision-free rounding to the nearest free cell of a grid
    with step ``unit_um``, shifted to start at 0.

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
    made_by = "pp.select_genes" if table_key == STPRED_TABLE else None
    table = get_table(sdata, table_key, made_by=made_by)
    if not isinstance(key_added, str) or not key_added:
        msg = f"Expected `key_added` to be a non-empty string, found {key_added!r}."
        raise TypeError(msg)
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

    table.obsm[key_added] = out
    stpred_uns(table)["lattice"] = {"key": key_added, "unit_um": units}
    record(table, "lattice", unit_um=units, key_added=key_added, table_key=table_key)
