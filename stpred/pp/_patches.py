"""Spot and context crops of the H&E image around every spot: the :class:`PatchBank`."""

from __future__ import annotations

import logging
import math
import shutil
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, REGION_KEY, SECTION_KEY, STPRED_TABLE
from .._docs import doc_params, doc_sdata_any, doc_sections
from .._provenance import plain, record, stpred_uns
from .._pyramid import pyramid_levels
from .._sections import section_names
from .._validate import check_positive, check_sections, check_table_shape, get_table
from ..io._adopt import section_image_key, table_attrs
from ..io._anndata import accepts_anndata, cache_owner

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData
    from spatialdata import SpatialData
    from xarray import DataArray

logger = logging.getLogger(__name__)

#: Largest image region (bytes) loaded into memory at once; taller tissue is cut in horizontal bands.
_MAX_BUFFER_BYTES = 2 * 1024**3
#: Bytes of crops (uint8) handled per vectorised gather and resize batch.
_GATHER_BYTES = 64 * 1024**2
_FORMAT = "stpred.PatchBank"
_FORMAT_VERSION = 1

# In-memory cache only: user's object -> banks cut from it (latest last); entries die with the object. Nothing
# depends on it: `get_patch_bank` rebuilds a missing bank from `uns["stpred"]["patches"]` (its saved store, else
# the recorded recipe), so a reloaded object in a new process finds its patches again.
# Keyed by id() with a weak reference that drops the entry (AnnData is not hashable).
_CACHE: dict[int, tuple[weakref.ref, list[PatchBank]]] = {}


def _cached(owner: Any) -> list[PatchBank]:
    entry = _CACHE.get(id(owner))
    return list(entry[1]) if entry is not None and entry[0]() is owner else []


def _cache(owner: Any, banks: list[PatchBank]) -> None:
    key = id(owner)
    _CACHE[key] = (weakref.ref(owner, lambda _ref, key=key: _CACHE.pop(key, None)), banks)


@dataclass(eq=False)
class PatchBank:
    """Spot and context crops (``uint8``, ``N × 3 × H × W``) aligned with the rows of the ``stpred`` table.

    Made by :func:`stpred.pp.extract_patches`, which keeps it registered with the SpatialData object so that
    :func:`stpred.pp.embed`, :func:`stpred.tl.fit` and :func:`stpred.tl.predict` find it.

    Attributes
    ----------
    spot
        Spot crops, ``uint8`` ``(N, 3, size, size)``.
    context
        Context crops, ``uint8`` ``(N, 3, context_size, context_size)``, or ``None``.
    obs_names
        Table row (``obs_names``) of each crop.
    sections
        Section of each crop, ``(N,)`` strings.
    size
        Side of the spot crops in output pixels.
    context_size
        Side of the context crops in output pixels, or ``None``.
    mpp
        Microns per output pixel, or ``None`` for crops at the image's native resolution.
    native_mpp
        Microns per full-resolution pixel of each section (where recorded in ``uns["stpred"]["mpp"]``).
    level_mpp
        Microns per pixel of the pyramid level each section's crops were cut from (where known).
    """

    spot: np.ndarray
    context: np.ndarray | None
    obs_names: pd.Index
    sections: np.ndarray
    size: int
    context_size: int | None = None
    mpp: float | None = None
    native_mpp: dict[str, float] = field(default_factory=dict)
    level_mpp: dict[str, float] = field(default_factory=dict)
    _owner: weakref.ref | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.obs_names = pd.Index(np.asarray(self.obs_names).astype(str))
        self.sections = np.asarray(self.sections).astype(str)
        n = len(self.obs_names)
        _check_crops(self.spot, n=n, side=self.size, name="spot")
        if (self.context is None) != (self.context_size is None):
            msg = "`context` and `context_size` must both be given or both be None."
            raise ValueError(msg)
        if self.context is not None:
            _check_crops(self.context, n=n, side=self.context_size, name="context")
        if len(self.sections) != n:
            msg = f"Expected {n} section names (one per crop), found {len(self.sections)}."
            raise ValueError(msg)
        if not self.obs_names.is_unique:
            msg = "`obs_names` of a PatchBank must be unique."
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.obs_names)

    def __repr__(self) -> str:
        res = "native resolution" if self.mpp is None else f"{self.mpp:g} µm/px"
        ctx = "no context" if self.context_size is None else f"context {self.context_size}px"
        secs = list(dict.fromkeys(self.sections.tolist()))
        nbytes = self.spot.nbytes + (0 if self.context is None else self.context.nbytes)
        return (
            f"PatchBank of {len(self)} spots × (spot {self.size}px, {ctx}) at {res}, "
            f"sections {secs}, {nbytes / 1024**2:.1f} MiB"
        )

    def positions(self, obs_names: Sequence[str] | pd.Index) -> np.ndarray:
        """Row positions of ``obs_names`` in this bank.

        Parameters
        ----------
        obs_names
            Table row names to look up.

        Returns
        -------
        ``int64`` positions, one per name, in the order given.
        """
        names = pd.Index(np.asarray(obs_names).astype(str))
        idx = self.obs_names.get_indexer(names)
        if (idx < 0).any():
            missing = names[idx < 0]
            msg = (
                f"{len(missing)} of {len(names)} rows have no patches (first: {list(missing[:3])}); "
                "re-run `stpred.pp.extract_patches(sdata)` after changing the table."
            )
            raise KeyError(msg)
        return idx.astype(np.int64)

    def subset(self, obs_names: Sequence[str] | pd.Index | np.ndarray) -> PatchBank:
        """A new bank holding the crops of ``obs_names`` (in that order), or of a boolean mask over the rows.

        Parameters
        ----------
        obs_names
            Table row names, or a boolean array of length ``len(self)``.

        Returns
        -------
        The subset (arrays are copies).
        """
        arr = np.asarray(obs_names)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                msg = f"A boolean mask must have length {len(self)}, found shape {arr.shape}."
                raise ValueError(msg)
            idx = np.flatnonzero(arr)
        else:
            idx = self.positions(arr)
        return PatchBank(
            spot=self.spot[idx],
            context=None if self.context is None else self.context[idx],
            obs_names=self.obs_names[idx],
            sections=self.sections[idx],
            size=self.size,
            context_size=self.context_size,
            mpp=self.mpp,
            native_mpp=dict(self.native_mpp),
            level_mpp=dict(self.level_mpp),
        )

    def check_aligned(self, table: AnnData) -> None:
        """Raise a :class:`ValueError` unless the bank's rows are the table's rows of the bank's sections, in order.

        For a bank extracted from all sections this means ``bank.obs_names == table.obs_names``.

        Parameters
        ----------
        table
            The ``stpred`` table (or any table with the same ``obs_names`` and ``obs["section"]``).
        """
        secs = set(self.sections.tolist())
        expected = table.obs_names[table.obs[SECTION_KEY].astype(str).isin(secs).to_numpy()]
        if len(expected) == len(self.obs_names) and (expected == self.obs_names).all():
            return
        diff = [(a, b) for a, b in zip(self.obs_names, expected) if a != b][:1]
        detail = f"; first difference: bank {diff[0][0]!r} vs table {diff[0][1]!r}" if diff else ""
        msg = (
            f"The PatchBank does not match the table: {len(self)} crops vs {len(expected)} table rows of sections "
            f"{sorted(secs)}{detail}. Re-run `stpred.pp.extract_patches(sdata)` after changing the table."
        )
        raise ValueError(msg)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the bank to a zarr (format 3) store.

        The crops are the arrays ``spot`` (and ``context``); names and geometry are JSON attributes. When the bank
        is registered for a SpatialData object, the path is recorded in its ``stpred`` table
        (``uns["stpred"]["patches"]["path"]``), so :func:`get_patch_bank` can reload it in a new session.

        Parameters
        ----------
        path
            Directory of the zarr store.
        overwrite
            Replace an existing store at ``path``.
        """
        import zarr

        path = Path(path)
        if path.exists():
            if not overwrite:
                msg = f"{path} already exists; pass `overwrite=True` to replace it."
                raise FileExistsError(msg)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        for name, arr in (("spot", self.spot), ("context", self.context)):
            if arr is None:
                continue
            chunk_rows = max(1, min(len(arr), (8 * 1024**2) // max(1, arr[0].nbytes))) if len(arr) else 1
            z = root.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(chunk_rows, *arr.shape[1:]))
            z[...] = arr
        root.attrs.update(
            {
                "format": _FORMAT,
                "format_version": _FORMAT_VERSION,
                "obs_names": self.obs_names.tolist(),
                "sections": self.sections.tolist(),
                "size": int(self.size),
                "context_size": None if self.context_size is None else int(self.context_size),
                "mpp": None if self.mpp is None else float(self.mpp),
                "native_mpp": {k: float(v) for k, v in self.native_mpp.items()},
                "level_mpp": {k: float(v) for k, v in self.level_mpp.items()},
            }
        )
        owner = self._owner() if self._owner is not None else None
        if owner is not None and STPRED_TABLE in owner.tables:
            entry = stpred_uns(owner.tables[STPRED_TABLE]).get("patches")
            if entry is not None and _same_geometry(entry, self):
                entry["path"] = str(path.resolve())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchBank:
        """Read a bank written by :meth:`save`.

        Parameters
        ----------
        path
            Directory of the zarr store.

        Returns
        -------
        The bank, with its crops in memory.
        """
        import zarr

        path = Path(path)
        if not path.exists():
            msg = f"No PatchBank at {path}; write one with `PatchBank.save(path)`."
            raise FileNotFoundError(msg)
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
        if attrs.get("format") != _FORMAT:
            msg = f"{path} is not a PatchBank store (attribute 'format' is {attrs.get('format')!r}, expected {_FORMAT!r})."
            raise ValueError(msg)
        context = root["context"][...] if "context" in root else None
        return cls(
            spot=root["spot"][...],
            context=context,
            obs_names=pd.Index(attrs["obs_names"], dtype=object),
            sections=np.asarray(attrs["sections"], dtype=str),
            size=int(attrs["size"]),
            context_size=attrs.get("context_size"),
            mpp=attrs.get("mpp"),
            native_mpp=dict(attrs.get("native_mpp", {})),
            level_mpp=dict(attrs.get("level_mpp", {})),
        )


def _check_crops(arr: Any, *, n: int, side: int | None, name: str) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4:
        found = f"{type(arr).__name__} {getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}".strip()
        msg = f"Expected `{name}` to be a uint8 numpy array (N, 3, H, W), found {found}."
        raise TypeError(msg)
    if arr.shape != (n, 3, side, side):
        msg = f"Expected `{name}` of shape {(n, 3, side, side)}, found {arr.shape}."
        raise ValueError(msg)


def _geometry(size: int, context_size: int | None, mpp: float | None, sections: list[str]) -> dict[str, Any]:
    return plain({"size": size, "context_size": context_size, "mpp": mpp, "sections": sections})


def _same_geometry(entry: Any, bank: PatchBank) -> bool:
    return (
        entry.get("size") == bank.size
        and entry.get("context_size") == bank.context_size
        and entry.get("mpp") == bank.mpp
        and {str(s) for s in entry.get("sections", [])} == set(bank.sections.tolist())
    )


def _register(sdata: SpatialData, bank: PatchBank) -> None:
    owner = cache_owner(sdata)
    banks = [b for b in _cached(owner) if not _same_shape(b, bank)]
    banks.append(bank)
    _cache(owner, banks)
    bank._owner = weakref.ref(sdata)


def _same_shape(a: PatchBank, b: PatchBank) -> bool:
    return (
        a.size == b.size
        and a.context_size == b.context_size
        and a.mpp == b.mpp
        and set(a.sections.tolist()) == set(b.sections.tolist())
    )


def get_patch_bank(sdata: SpatialData, *, size: int | None = None, context_size: int | None = None) -> PatchBank:
    """The patch bank extracted for ``sdata`` (the latest one matching ``size``/``context_size``).

    Banks live in memory for as long as ``sdata`` does. After a restart, a bank whose path was recorded by
    :meth:`PatchBank.save` in ``uns["stpred"]["patches"]`` is loaded from disk.

    Parameters
    ----------
    sdata
        The SpatialData object passed to :func:`stpred.pp.extract_patches`.
    size
        Required spot-crop side; ``None`` accepts any.
    context_size
        Required context-crop side; ``None`` accepts any.

    Returns
    -------
    The bank, checked against the current ``stpred`` table.
    """
    table = get_table(sdata, STPRED_TABLE, made_by="pp.select_genes")

    def fits(b: PatchBank) -> bool:
        return (size is None or b.size == size) and (context_size is None or b.context_size == context_size)

    cached = _cached(cache_owner(sdata))
    candidates = [b for b in cached if fits(b)]
    for bank in reversed(candidates):
        try:
            bank.check_aligned(table)
        except ValueError:
            continue  # the table changed since: fall through to the recorded store or recipe
        return bank
    entry = stpred_uns(table).get("patches")
    geometry_ok = entry is not None and (
        (size is None or entry.get("size") == size) and (context_size is None or entry.get("context_size") == context_size)
    )
    if geometry_ok and entry.get("path") and Path(entry["path"]).exists():
        bank = PatchBank.load(entry["path"])
        bank.check_aligned(table)
        _register(sdata, bank)
        logger.info("Loaded the patch bank from %s.", entry["path"])
        return bank
    if geometry_ok and entry.get("size") is not None:
        # re-cut from the recorded recipe (a reloaded object, a new process): crops are deterministic
        sections = [str(x) for x in entry.get("sections", [])] or None
        bank = _cut(
            sdata, table, size=int(entry["size"]), context_size=entry.get("context_size"), mpp=entry.get("mpp"),
            sections=sections, progress=False,
        )
        _register(sdata, bank)
        logger.info("Re-cut the patch bank from the recipe recorded in `uns['stpred']['patches']`.")
        return bank
    msg = "No patches for this SpatialData; run `stpred.pp.extract_patches(sdata)` first."
    available = [(b.size, b.context_size) for b in cached]
    if entry is not None and not geometry_ok:
        available.append((entry.get("size"), entry.get("context_size")))
    if available:
        msg += f" Patches exist with (size, context_size) {available}; asked for ({size}, {context_size})."
    raise KeyError(msg)


# --------------------------------------------------------------------------------------------------------------------
# geometry


def _coordinate_system(shapes: Any, image: Any, section: str) -> str:
    from spatialdata.transformations import get_transformation

    cs_shapes = set(get_transformation(shapes, get_all=True))
    cs_image = set(get_transformation(image, get_all=True))
    if section in cs_shapes and section in cs_image:
        return section
    common = sorted(cs_shapes & cs_image)
    if not common:
        msg = (
            f"The spots and the image of section {section!r} share no coordinate system "
            f"(spots: {sorted(cs_shapes)}, image: {sorted(cs_image)})."
        )
        raise ValueError(msg)
    return common[0]


def _to_level_matrix(shapes: Any, level: DataArray, cs: str) -> np.ndarray:
    """3×3 affine matrix mapping spot coordinates (x, y, 1) to pixel coordinates of ``level``."""
    from spatialdata.transformations import Sequence as TSequence
    from spatialdata.transformations import get_transformation

    chain = TSequence(
        [
            get_transformation(shapes, to_coordinate_system=cs),
            get_transformation(level, to_coordinate_system=cs).inverse(),
        ]
    )
    return np.asarray(chain.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


@dataclass
class _SectionPlan:
    """Where to cut one section's crops: the level, centres in its pixel grid and window sides."""

    section: str
    rows: np.ndarray  # positions in the table
    level: DataArray
    cx: np.ndarray  # floor of the centre, level pixels
    cy: np.ndarray
    windows: dict[str, int]  # crop name -> window side in level pixels
    level_mpp: float | None


def _plan_section(
    sdata: SpatialData,
    table: AnnData,
    section: str,
    rows: np.ndarray,
    *,
    sizes: dict[str, int],
    mpp: float | None,
    native_mpp: float | None,
) -> _SectionPlan:
    key = section_image_key(table, section)
    if key not in sdata.images:
        msg = (
            f"No image {key!r} for section {section!r} in `sdata.images`; found {sorted(sdata.images)}. Name the "
            "image with `stpred.io.adopt(sdata, image_key=...)` and re-run `stpred.pp.select_genes`."
        )
        raise KeyError(msg)
    image = sdata.images[key]
    levels = pyramid_levels(image)
    obs = table.obs.iloc[rows]
    attrs = table_attrs(table)  # the table's own region and instance columns (stpred's readers: region, spot_id)
    region_key, instance_key = (attrs[1], attrs[2]) if attrs is not None else (REGION_KEY, INSTANCE_KEY)
    regions = obs[region_key].astype(str).to_numpy() if region_key in obs else None
    if regions is None or instance_key not in obs:
        msg = f"The table needs `obs[{region_key!r}]` and `obs[{instance_key!r}]` to find the spots; found {list(obs.columns)}."
        raise KeyError(msg)
    # spot centres (shapes coordinates) and the shapes→scale0 matrix; one shapes element per section is the contract,
    # but any number is handled
    xy = np.empty((len(rows), 2), dtype=np.float64)
    matrices = {}
    for region in pd.unique(regions):
        if region not in sdata.shapes:
            msg = f"No shapes {region!r} (named in `obs[{region_key!r}]`) in `sdata.shapes`; found {sorted(sdata.shapes)}."
            raise KeyError(msg)
        shapes = sdata.shapes[region]
        sel = regions == region
        ids = obs[instance_key].to_numpy()[sel]
        try:
            geom = shapes.geometry.loc[ids]
        except KeyError:
            msg = (
                f"Some `obs[{instance_key!r}]` values of section {section!r} are not in the index of shapes {region!r}."
            )
            raise KeyError(msg) from None
        if not (geom.geom_type == "Point").all():
            geom = geom.centroid  # polygons (e.g. square bins): their centre
        xy[sel] = np.c_[geom.x.to_numpy(), geom.y.to_numpy()]
        cs = _coordinate_system(shapes, image, section)
        matrices[region] = [_to_level_matrix(shapes, lvl, cs) for lvl in levels]

    # choose the level: native → finest; else the coarsest whose mpp is <= the target (finer or equal)
    level_idx = 0
    level_mpp = native_mpp
    if mpp is not None:
        if native_mpp is None:
            msg = (
                f"`mpp={mpp}` needs the microns per pixel of section {section!r}, but "
                "`uns['stpred']['mpp']` has no entry for it; pass `mpp=None` for native resolution."
            )
            raise KeyError(msg)
        first = next(iter(matrices.values()))
        level_mpps = [native_mpp / math.sqrt(abs(np.linalg.det(m[:2, :2]))) for m in first]
        finer = [i for i, m in enumerate(level_mpps) if m <= mpp * (1 + 1e-6)]
        level_idx = max(finer, key=lambda i: level_mpps[i]) if finer else int(np.argmin(level_mpps))
        level_mpp = level_mpps[level_idx]
        if not finer:
            logger.warning(
                "Section %r: the target %g µm/px is finer than the native %g µm/px; crops are upsampled.",
                section,
                mpp,
                level_mpp,
            )
    level = levels[level_idx]
    if level.dims != ("c", "y", "x") or level.sizes["c"] != 3:
        msg = f"Expected an RGB image (c=3, y, x) for section {section!r}, found dims {dict(level.sizes)}."
        raise ValueError(msg)
    if level.dtype != np.uint8:
        msg = f"Expected a uint8 image for section {section!r}, found {level.dtype}; convert it to uint8 RGB."
        raise TypeError(msg)
    centres = np.empty_like(xy)
    for region, mats in matrices.items():
        sel = regions == region
        a = mats[level_idx]
        centres[sel] = xy[sel] @ a[:2, :2].T + a[:2, 2]
    cx = np.floor(centres[:, 0]).astype(np.int64)
    cy = np.floor(centres[:, 1]).astype(np.int64)
    height, width = int(level.sizes["y"]), int(level.sizes["x"])
    outside = (cx < 0) | (cx >= width) | (cy < 0) | (cy >= height)
    if outside.any():
        msg = (
            f"{int(outside.sum())} of {len(rows)} spot centres of section {section!r} lie outside its image "
            f"({width}×{height} px at the level used; first: {list(table.obs_names[rows[outside]][:3])}). "
            "Check the spot coordinates and the image transformation."
        )
        raise ValueError(msg)
    windows = dict(sizes) if mpp is None else {k: max(1, round(s * mpp / level_mpp)) for k, s in sizes.items()}
    _warn_padding(section, cx, cy, windows, height=height, width=width)
    return _SectionPlan(section, rows, level, cx, cy, windows, level_mpp)


#: Share of zero-padded crop pixels above which extraction warns (below it: a log message).
_PAD_WARN = 0.05


def _inside_pixels(centre: np.ndarray, window: int, extent: int) -> np.ndarray:
    """Per spot, the number of the window's pixels along one axis that lie inside ``[0, extent)``."""
    lo = centre - window // 2
    return np.clip(np.minimum(lo + window, extent) - np.maximum(lo, 0), 0, None)


def _warn_padding(
    section: str, cx: np.ndarray, cy: np.ndarray, windows: dict[str, int], *, height: int, width: int
) -> None:
    """Warn when crops are larger than the image or much of them falls outside it (those pixels are zero-padded)."""
    for name, win in windows.items():
        inside = _inside_pixels(cx, win, width) * _inside_pixels(cy, win, height)
        padded = 1.0 - float(inside.sum()) / (len(cx) * win * win)
        if padded <= 0:
            continue
        n_spots = int((inside < win * win).sum())
        msg = (
            f"Section {section!r}: {name} crops of {win}×{win} px (at the level used) reach beyond the "
            f"{width}×{height} px image for {n_spots} of {len(cx)} spots; {padded:.1%} of their pixels are zero "
            "padding."
        )
        if win > min(height, width) or padded > _PAD_WARN:
            warnings.warn(
                msg + " Use a smaller `size`/`context_size` or a coarser `mpp`, or check the image scale.",
                UserWarning,
                stacklevel=4,
            )
        else:
            logger.info(msg)


# --------------------------------------------------------------------------------------------------------------------
# cutting


def _load_region(data: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``data[:, y0:y1, x0:x1]`` as a ``uint8`` numpy array, zero where the window leaves the image."""
    import dask.array as da

    n_c, height, width = data.shape
    buf = np.zeros((n_c, y1 - y0, x1 - x0), dtype=np.uint8)
    ya, yb, xa, xb = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if yb > ya and xb > xa:
        target = buf[:, ya - y0 : yb - y0, xa - x0 : xb - x0]
        src = data[:, ya:yb, xa:xb]
        if isinstance(src, da.Array):
            da.store(src, target, lock=False)  # one graph: every chunk decoded once, written in place
        else:
            target[...] = np.asarray(src)
    return buf


def _bands(cy: np.ndarray, side: int, row_bytes: int) -> list[np.ndarray]:
    """Split spots (by centre row) into horizontal bands whose loaded region stays under the memory limit."""
    order = np.argsort(cy, kind="stable")
    limit = max(side, _MAX_BUFFER_BYTES // max(row_bytes, 1))
    span = cy[order].max() - cy[order].min() + side if len(cy) else 0
    if span <= limit:
        return [order]
    out = []
    sorted_cy = cy[order]
    start = 0
    while start < len(order):
        stop = int(np.searchsorted(sorted_cy, sorted_cy[start] + (limit - side), side="right"))
        stop = max(stop, start + 1)
        out.append(order[start:stop])
        start = stop
    logger.info("Loading the image in %d bands to stay under %d MiB.", len(out), _MAX_BUFFER_BYTES // 1024**2)
    return out


def _cut_section(plan: _SectionPlan, outputs: dict[str, np.ndarray], sizes: dict[str, int], pbar: Any) -> None:
    """Cut every crop of one section into ``outputs[name][plan.rows]``."""
    from numpy.lib.stride_tricks import sliding_window_view

    data = plan.level.data
    n_c = int(data.shape[0])
    side_max = max(plan.windows.values())
    starts = {k: (plan.cy - w // 2, plan.cx - w // 2) for k, w in plan.windows.items()}
    x_lo = min(int(s[1].min()) for s in starts.values())
    x_hi = max(int((s[1] + plan.windows[k]).max()) for k, s in starts.items())
    for band in _bands(plan.cy, side_max, n_c * (x_hi - x_lo)):
        by_lo = min(int(s[0][band].min()) for s in starts.values())
        by_hi = max(int((s[0][band] + plan.windows[k]).max()) for k, s in starts.items())
        buf = _load_region(data, by_lo, by_hi, x_lo, x_hi)
        for name, win in plan.windows.items():
            view = sliding_window_view(buf, (win, win), axis=(1, 2))  # (3, Hb-win+1, Wb-win+1, win, win)
            ys = starts[name][0][band] - by_lo
            xs = starts[name][1][band] - x_lo
            resize = win != sizes[name]
            step = max(1, _GATHER_BYTES // (n_c * win * win))
            dest = plan.rows[band]
            for lo in range(0, len(band), step):
                crops = view[:, ys[lo : lo + step], xs[lo : lo + step]]  # (3, B, win, win), one gather
                crops = np.moveaxis(crops, 0, 1)
                if resize:
                    crops = _resize(crops, sizes[name])
                outputs[name][dest[lo : lo + step]] = crops
                if name == "spot":
                    pbar.update(len(crops))
        del buf


def _resize(crops: np.ndarray, side: int) -> np.ndarray:
    """Resize ``uint8`` ``(B, 3, w, w)`` crops to ``side`` with antialiased bilinear interpolation.

    Runs on ``uint8`` tensors, for which torch has a fixed-point CPU kernel (several times faster than float32;
    the results differ from the float computation by at most 1 grey level).
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(crops))
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).numpy()


def _cut(
    sdata: SpatialData,
    table: AnnData,
    *,
    size: int,
    context_size: int | None,
    mpp: float | None,
    sections: Sequence[str] | None,
    progress: bool,
) -> PatchBank:
    """Cut the crops of ``sections`` of ``table`` (checked arguments); records nothing."""
    from tqdm.auto import tqdm

    chosen = check_sections(sections, section_names(table))
    uns = stpred_uns(table)
    mpps = {str(k): float(v) for k, v in dict(uns.get("mpp", {})).items()}
    sizes = {"spot": int(size)} | ({} if context_size is None else {"context": int(context_size)})

    sec = table.obs[SECTION_KEY].astype(str).to_numpy()
    rows_all = np.flatnonzero(np.isin(sec, chosen))
    plans = [
        _plan_section(sdata, table, s, np.flatnonzero(sec == s), sizes=sizes, mpp=mpp, native_mpp=mpps.get(s))
        for s in chosen
    ]
    n_total = table.n_obs
    # crops of the chosen rows, in table order
    outputs = {k: np.zeros((len(rows_all), 3, s, s), dtype=np.uint8) for k, s in sizes.items()}
    local = np.full(n_total, -1, dtype=np.int64)
    local[rows_all] = np.arange(len(rows_all))
    with tqdm(total=len(rows_all), desc="patches", unit="spot", disable=not progress) as pbar:
        for plan in plans:
            plan.rows = local[plan.rows]
            _cut_section(plan, outputs, sizes, pbar)
    bank = PatchBank(
        spot=outputs["spot"],
        context=outputs.get("context"),
        obs_names=table.obs_names[rows_all],
        sections=sec[rows_all],
        size=int(size),
        context_size=None if context_size is None else int(context_size),
        mpp=mpp,
        native_mpp={s: mpps[s] for s in chosen if s in mpps},
        level_mpp={p.section: float(p.level_mpp) for p in plans if p.level_mpp is not None},
    )
    return bank


@accepts_anndata
@doc_params(sdata=doc_sdata_any, sections=doc_sections)
def extract_patches(
    sdata: SpatialData,
    *,
    size: int = 224,
    context_size: int | None = 448,
    mpp: float | None = None,
    table_key: str = STPRED_TABLE,
    sections: Sequence[str] | None = None,
    progress: bool = True,
) -> PatchBank:
    """Cut a spot crop and a context crop centred on every spot of the ``stpred`` table.

    Each section's image is read once (the needed pyramid level, or the part of it the spots cover) and all
    crops are gathered from it in vectorised batches; windows that leave the image are zero-padded.

    Crop convention: with the spot centre ``(x, y)`` in pixels of the level used (from the spots' shapes through
    the transformations to the section's coordinate system and back into the image), ``cx = floor(x)``,
    ``cy = floor(y)``, a crop of side ``s`` covers rows ``[cy - s // 2, cy - s // 2 + s)`` and columns
    ``[cx - s // 2, cx - s // 2 + s)``. At native resolution (``mpp=None``) the crops are exact copies of the
    full-resolution pixels.

    Parameters
    ----------
    {sdata}
    size
        Side of the spot crop in output pixels.
    context_size
        Side of the context crop in output pixels; ``None`` for no context crops.
    mpp
        Microns per output pixel. ``None`` keeps each image's native resolution. A number resamples every section
        to that scale, so images from different scanners cover the same physical field: the crop is cut from the
        coarsest pyramid level whose resolution is at least as fine as ``mpp`` (window of
        ``round(size * mpp / level_mpp)`` level pixels) and resized to ``size`` with antialiased bilinear
        interpolation (:func:`torch.nn.functional.interpolate`). Needs ``uns["stpred"]["mpp"]``.
    table_key
        Table made by :func:`stpred.pp.select_genes` whose rows get crops.
    {sections}
    progress
        Show a progress bar.

    Returns
    -------
    The :class:`~stpred.pp.PatchBank`, rows in the order of the table's rows (of the chosen sections). It is also
    registered for ``sdata`` (where :func:`stpred.pp.embed` and :func:`stpred.tl.fit` find it), and the geometry is
    recorded in ``uns["stpred"]["patches"]`` of the table, with a provenance entry.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=2, n_genes=8, grid=6, pitch=32)
    >>> stpred.pp.select_genes(sdata, n_top=4)
    >>> bank = stpred.pp.extract_patches(sdata, size=16, context_size=32, progress=False)
    >>> bank.spot.shape, bank.context.shape
    ((61, 3, 16, 16), (61, 3, 32, 32))
    >>> stpred.pp.extract_patches(sdata, size=16, context_size=32, mpp=2.0, progress=False).level_mpp
    {{'S0': 2.0, 'S1': 2.0}}
    """
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    check_table_shape(table, name=table_key)
    for name, value in (("size", size), ("context_size", context_size)):
        if value is None and name == "context_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            msg = f"Expected `{name}` to be a positive int, found {value!r}."
            raise TypeError(msg)
        check_positive(value, name=name)
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, int | float | np.number):
            msg = f"Expected `mpp` to be a positive number or None, found {mpp!r}."
            raise TypeError(msg)
        check_positive(float(mpp), name="mpp")
        mpp = float(mpp)
    chosen = check_sections(sections, section_names(table))
    bank = _cut(sdata, table, size=size, context_size=context_size, mpp=mpp, sections=chosen, progress=progress)
    uns = stpred_uns(table)
    if table_key == STPRED_TABLE:
        _register(sdata, bank)
    uns["patches"] = _geometry(bank.size, bank.context_size, bank.mpp, list(chosen))
    record(table, "extract_patches", size=size, context_size=context_size, mpp=mpp, sections=list(chosen))
    logger.info("%r", bank)
    return bank


__all__ = ["PatchBank", "extract_patches", "get_patch_bank"]
