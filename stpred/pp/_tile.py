"""Tiles over the tissue of an H&E image: where to predict when a section has no spots.

:func:`tile` lays a square grid (or a hexagonal lattice of circles, like Visium / legacy ST spots) over an image in
microns, keeps the tiles that lie on tissue, and writes them as a shapes element with a table that annotates them.

Tissue detection runs squidpy's :func:`squidpy.experimental.im.detect_tissue` (Otsu threshold, holes filled,
specimen-sized components kept) on the HSV saturation, smoothed over 10 µm, of **one low-resolution pyramid level**, handed to squidpy as a small image of
its own: squidpy would otherwise upscale its mask back to the full-resolution image (an ``int32`` array of the whole
slide), which is what we avoid. The tissue fraction of each tile is then read from that low-resolution mask, so a whole
slide is never decoded at full resolution; memory scales with the number of tiles, not with the image size.

squidpy's :func:`~squidpy.experimental.im.make_tiles` and :func:`~squidpy.experimental.im.make_tiles_from_spots` are
not used: ``make_tiles`` places integer-pixel tiles edge to edge on the full-resolution image (no stride, no
hexagonal layout, no size in microns), classifies them against a full-resolution ``labels`` mask that it writes into
the user's object, and keeps background tiles; ``make_tiles_from_spots`` needs existing spots, which an H&E-only
section does not have.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, REGION_KEY, SECTION_KEY, SPATIAL_KEY, TILES_KEY, UNS_KEY
from .._provenance import plain, record
from .._pyramid import pyramid_levels
from .._validate import check_one_of
from ..io._adopt import image_section_mpp

if TYPE_CHECKING:
    from collections.abc import Iterator

    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData
    from xarray import DataArray

logger = logging.getLogger(__name__)

#: Pixels wanted along a tile side on the level used for tissue detection (the coarsest level that has them).
TARGET_TILE_PX = 8
#: Fewest pixels along a tile side on that level; below this the tissue fraction means nothing.
MIN_TILE_PX = 2
#: The tissue fraction of a tile is read on a ``SAMPLES × SAMPLES`` grid of points over its footprint.
SAMPLES = 10
#: The saturation is smoothed with a Gaussian of this many microns (sigma) before thresholding, so that Otsu
#: separates tissue from glass rather than nuclei from the rest of the tissue.
SMOOTH_UM = 10.0
#: Tiles whose footprints are sampled at once (bounds the memory of :func:`tissue_fraction`).
_BATCH = 2048
#: Technology recorded for tiles in ``uns["stpred"]["technology"]``.
TILES_TECHNOLOGY = "tiles"

Layout = Literal["square", "hex"]


# --------------------------------------------------------------------------------------------------------------------
# lattice


def lattice_centres(
    width_um: float, height_um: float, *, size_um: float, stride_um: float, layout: Layout = "square"
) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the tiles that fit inside a ``width_um × height_um`` rectangle, the pattern centred in it.

    Parameters
    ----------
    width_um, height_um
        Size of the rectangle (the image) in microns.
    size_um
        Side of a square tile, or diameter of a circle (``layout="hex"``).
    stride_um
        Distance between neighbouring centres (every nearest-neighbour distance equals it).
    layout
        ``"square"``: rows and columns ``stride_um`` apart. ``"hex"``: rows ``stride_um · √3/2`` apart, every
        other row shifted by ``stride_um / 2``.

    Returns
    -------
    ``(xy_um, ij)``: float ``(n, 2)`` centres (x, y) in microns from the rectangle's top-left corner, and int64
    ``(n, 2)`` lattice indices (x, y); for ``"hex"`` the x index is doubled (``2 · column + row % 2``, the Visium
    array convention) so that neighbours in a row differ by 2.
    """
    half = size_um / 2.0
    dy = stride_um * (np.sqrt(3.0) / 2.0 if layout == "hex" else 1.0)
    n_rows = int(np.floor((height_um - size_um) / dy + 1e-9)) + 1 if height_um >= size_um else 0
    n_cols = int(np.floor((width_um - size_um) / stride_um + 1e-9)) + 1 if width_um >= size_um else 0
    if n_rows == 0 or n_cols == 0:
        return np.zeros((0, 2)), np.zeros((0, 2), dtype=np.int64)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    shift = (rows % 2) * (stride_um / 2.0) if layout == "hex" else np.zeros(rows.size)
    x = half + cols * stride_um + shift
    y = half + rows * dy
    keep = x + half <= width_um + 1e-9
    x, y, rows, cols = x[keep], y[keep], rows[keep], cols[keep]
    # centre the pattern in the rectangle
    x = x + (width_um - (x.max() + half)) / 2.0
    y = y + (height_um - (y.max() + half)) / 2.0
    ix = 2 * cols + rows % 2 if layout == "hex" else cols
    return np.stack([x, y], axis=1), np.stack([ix, rows], axis=1).astype(np.int64)


def footprint_offsets(size: float, layout: Layout, *, samples: int = SAMPLES) -> np.ndarray:
    """Offsets ``(k, 2)`` from a tile centre of the points that sample its footprint (a square or a disc)."""
    u = ((np.arange(samples) + 0.5) / samples - 0.5) * size
    grid = np.stack(np.meshgrid(u, u, indexing="xy"), axis=-1).reshape(-1, 2)
    if layout == "hex":
        grid = grid[(grid**2).sum(1) <= (size / 2.0) ** 2]
    return grid


def tissue_fraction(
    mask: np.ndarray, xy_px: np.ndarray, *, size_px: float, layout: Layout, scale: tuple[float, float]
) -> np.ndarray:
    """Fraction of each tile's footprint on tissue, read on a low-resolution mask.

    Parameters
    ----------
    mask
        ``(h, w)`` mask of a low-resolution level; values ``> 0`` are tissue.
    xy_px
        Tile centres ``(n, 2)`` (x, y) in full-resolution pixels.
    size_px
        Tile side (or circle diameter) in full-resolution pixels.
    layout
        ``"square"`` or ``"hex"`` (circles).
    scale
        Full-resolution pixels per mask pixel along (y, x).

    Returns
    -------
    ``(n,)`` fractions in [0, 1]; points outside the mask count as background.
    """
    h, w = mask.shape
    tissue = mask > 0
    offsets = footprint_offsets(size_px, layout)
    out = np.zeros(len(xy_px))
    # in batches, so that memory stays bounded however many candidate tiles the image holds
    for start in range(0, len(xy_px), _BATCH):
        pts = xy_px[start : start + _BATCH, None, :] + offsets[None, :, :]
        col = np.floor(pts[..., 0] / scale[1]).astype(np.int64)
        row = np.floor(pts[..., 1] / scale[0]).astype(np.int64)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        hit = np.zeros(col.shape, dtype=bool)
        hit[inside] = tissue[row[inside], col[inside]]
        out[start : start + _BATCH] = hit.mean(axis=1)
    return out


# --------------------------------------------------------------------------------------------------------------------
# inputs


def _element_names(sdata: SpatialData) -> dict[str, str]:
    """Every element name of ``sdata`` with its kind (``"images"``, ``"shapes"``, ...)."""
    out = {}
    for kind in ("images", "labels", "points", "shapes", "tables"):
        for name in getattr(sdata, kind):
            out[name] = kind
    return out


def _tile_outputs(sdata: SpatialData) -> set[str]:
    """Names of the elements written by earlier calls of :func:`tile` (tables, their tiles and masks)."""
    out = set()
    for name, table in sdata.tables.items():
        meta = table.uns.get(UNS_KEY, {}).get(TILES_KEY)
        if not isinstance(meta, Mapping):
            continue
        out.add(name)
        out.update(str(r) for r in np.atleast_1d(table.uns.get("spatialdata_attrs", {}).get("region", [])))
        if meta.get("mask_key"):
            out.add(str(meta["mask_key"]))
    return out


def _resolve_image(sdata: SpatialData, image_key: str | None) -> str:
    images = list(sdata.images)
    if image_key is None:
        if len(images) == 1:
            return images[0]
        if not images:
            msg = "`sdata` has no image; tiles are laid over an H&E image (read one with stpred.io)."
            raise ValueError(msg)
        msg = f"`sdata` has {len(images)} images {images}; pass `image_key=` to choose the one to tile."
        raise ValueError(msg)
    if image_key not in sdata.images:
        msg = f"No image {image_key!r} in `sdata.images`; found {images}."
        raise KeyError(msg)
    return image_key


def _default_section(image_key: str) -> str:
    """``"C2"`` for ``"C2_hne"`` (the stpred naming), else the image key.

    Not the image's coordinate system: most hand-built objects put every image in spatialdata's default ``"global"``,
    which would give every slide the same section and the same tile names.
    """
    if image_key.endswith("_hne") and len(image_key) > 4:
        return image_key[: -len("_hne")]
    return image_key


def _resolve_mpp(
    sdata: SpatialData, section: str, image_key: str, mpp: float | None, placed: tuple[str, float, str] | None
) -> tuple[float, str]:
    """µm per full-resolution pixel of the image.

    ``mpp`` if given; else through the image's transformation from an adopted table's layout (``placed``, from
    :func:`~stpred.io._adopt.image_section_mpp` for this section); else ``uns["stpred"]["mpp"][section]`` of a table, whose spot
    coordinates are the image's pixels (stpred's readers).
    """
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, int | float | np.number) or not np.isfinite(mpp) or mpp <= 0:
            msg = f"Expected `mpp` to be a positive number of µm per pixel, found {mpp!r}."
            raise ValueError(msg)
        return float(mpp), "argument"
    if placed is not None:
        return placed[1], placed[2]
    for name, table in sdata.tables.items():
        values = table.uns.get(UNS_KEY, {}).get("mpp")
        if isinstance(values, Mapping) and section in values:
            return float(values[section]), f"tables[{name!r}].uns['stpred']['mpp'][{section!r}]"
    msg = (
        f"The µm per pixel of image {image_key!r} (section {section!r}) are unknown: no table records "
        f"`uns['stpred']['mpp'][{section!r}]`. Pass `mpp=` (microns per full-resolution pixel, e.g. 0.5 for a 20× "
        "scan; see the scanner's metadata), or, when the object also holds this section's spots and counts, call "
        "`stpred.io.adopt(sdata)` first so that they come from the spots through the image's transformation."
    )
    raise ValueError(msg)


def _check_number(value: Any, *, name: str, low: float, high: float | None = None, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not np.isfinite(value):
        msg = f"Expected `{name}` to be a finite number, found {value!r}."
        raise TypeError(msg)
    bad = value <= low if strict else value < low
    if high is not None:
        bad = bad or value > high
    if bad:
        rng = f"in ({low}, {high}]" if high is not None else f"greater than {low}"
        if not strict:
            rng = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        msg = f"Expected `{name}` to be {rng}, found {value!r}."
        raise ValueError(msg)
    return float(value)


def _check_key(value: Any, *, name: str) -> str:
    if not isinstance(value, str) or not value:
        msg = f"Expected `{name}` to be a non-empty string, found {value!r}."
        raise TypeError(msg)
    return value


# --------------------------------------------------------------------------------------------------------------------
# levels and detection


@dataclass
class _Level:
    """The low-resolution level used for tissue detection."""

    index: int  # pyramid level
    coarsen: int  # extra block-mean factor applied lazily on top of it
    data: DataArray  # (c, y, x), lazy
    scale: tuple[float, float]  # full-resolution pixels per pixel of ``data`` along (y, x)


def _choose_level(image: Any, *, size_px: float, level: int | None, image_key: str) -> _Level:
    """The coarsest level with at least :data:`TARGET_TILE_PX` pixels per tile side (or the one asked for).

    When that level still has many more pixels per tile than needed (a single-scale image, or a pyramid that stops
    early), it is block-averaged lazily (``xarray`` ``coarsen`` on its dask array), so it is never loaded whole.
    """
    levels = pyramid_levels(image)
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    scales = [(h0 / int(lv.sizes["y"]), w0 / int(lv.sizes["x"])) for lv in levels]
    if level is None:
        index = 0
        for i, (sy, sx) in enumerate(scales):
            if size_px / max(sy, sx) >= TARGET_TILE_PX:
                index = i
    else:
        if isinstance(level, bool) or not isinstance(level, int | np.integer):
            msg = f"Expected `level` to be an integer pyramid level or None, found {level!r}."
            raise TypeError(msg)
        if not 0 <= level < len(levels):
            msg = f"Image {image_key!r} has pyramid levels 0..{len(levels) - 1}; found `level={level}`."
            raise ValueError(msg)
        index = int(level)
    sy, sx = scales[index]
    data = levels[index]
    side = size_px / max(sy, sx)
    if side < MIN_TILE_PX:
        finer = " or a finer `level=`" if index > 0 else ""
        msg = (
            f"A tile of {size_px:.3g} full-resolution pixels is {side:.2f} px on level {index} of image "
            f"{image_key!r}; at least {MIN_TILE_PX} px are needed to measure its tissue fraction. Use a larger "
            f"`size_um`{finer}."
        )
        raise ValueError(msg)
    factor = 1
    if level is None and side >= 2 * TARGET_TILE_PX:
        factor = int(side // TARGET_TILE_PX)
        factor = min(factor, int(data.sizes["y"]), int(data.sizes["x"]))
        if factor > 1:
            # a block of the coarsened level covers exactly ``factor`` pixels of the level (the ragged edge is
            # trimmed), so its size in full-resolution pixels is ``factor`` times the level's
            data = data.coarsen(y=factor, x=factor, boundary="trim").mean()
            sy, sx = sy * factor, sx * factor
    return _Level(index=index, coarsen=factor, data=data, scale=(sy, sx))


@contextmanager
def _quiet_squidpy() -> Iterator[None]:
    """Silence squidpy's per-step INFO lines and a scikit-image deprecation inside it (nothing for the user to act on)."""
    sd_logger = logging.getLogger("spatialdata._logging")
    old = sd_logger.level
    sd_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"squidpy\..*")
            warnings.filterwarnings("ignore", message=r".*area_threshold.*", category=FutureWarning)
            yield
    finally:
        sd_logger.setLevel(old)


def _check_rgb(image: DataArray, image_key: str) -> None:
    """Refuse images whose saturation means nothing: tissue is told from glass by its colour."""
    n_channels = int(image.sizes.get("c", 1))
    if n_channels not in (3, 4):
        msg = (
            f"Tissue detection needs an RGB (or RGBA) H&E image; image {image_key!r} has {n_channels} channel(s). "
            "Pass the H&E image with `image_key=`, or `tissue=False` to tile the whole image."
        )
        raise ValueError(msg)


def _rgb(level: _Level) -> np.ndarray:
    """The detection level as ``(3, y, x)`` uint8 (computed from the lazy pyramid).

    Images of other types are rescaled: floats in 0–1 by 255, anything brighter than 255 (12- or 16-bit scans) by
    its own maximum. The saturation read from it does not depend on that scale, only its rounding does.
    """
    arr = level.data.data
    arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)[:3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        top = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if top <= 1.0 else (255.0 / top if top > 255.0 else 1.0)
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return arr


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of a ``(3, h, w)`` uint8 image, as ``(h, w)`` uint8 (0–255).

    Stained tissue is coloured and glass is grey or white, so the saturation separates them where the grey level
    does not (pale pink stroma is about as bright as the background).
    """
    f = rgb.astype(np.float32)
    hi, lo = f.max(axis=0), f.min(axis=0)
    return np.rint((hi - lo) / np.maximum(hi, 1.0) * 255.0).astype(np.uint8)


def detect_tissue_mask(
    rgb: np.ndarray, *, level_mpp: float, min_contrast: float, smooth_um: float = SMOOTH_UM
) -> tuple[np.ndarray, dict[str, Any]]:
    """Tissue labels of a small RGB image: squidpy's Otsu detection on its smoothed saturation, and what it found.

    Parameters
    ----------
    rgb
        ``(3, h, w)`` uint8 image (a low-resolution level).
    level_mpp
        Microns per pixel of ``rgb``.
    min_contrast
        Smallest difference between the median saturation (0–1) of the detected tissue and of the background;
        a blank slide (where Otsu only splits noise) falls below it.
    smooth_um
        Sigma in microns of the Gaussian applied to the saturation before thresholding.

    Returns
    -------
    ``(labels, info)``: int32 ``(h, w)`` labels (0 background, 1..K specimen pieces) and a dict with the number of
    pieces, the tissue area fraction and the contrast. ``labels`` is all zero when nothing passes.
    """
    from scipy.ndimage import gaussian_filter
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from squidpy.experimental.im import detect_tissue

    sat = saturation(rgb)
    sigma = smooth_um / level_mpp
    smooth = np.rint(gaussian_filter(sat.astype(np.float32), sigma)).astype(np.uint8) if sigma >= 0.5 else sat
    # squidpy takes the darker side of the Otsu threshold as tissue when no corner is declared background; the
    # inverted saturation makes glass bright, whatever the corners hold (tissue may touch them)
    inverted = (255 - smooth)[None]
    small = SpatialData(images={"image": Image2DModel.parse(inverted, dims=("c", "y", "x"))})
    with _quiet_squidpy():
        labels = detect_tissue(small, "image", scale="auto", method="otsu", corners_are_background=False, inplace=False)
    labels = np.asarray(labels, dtype=np.int32)
    tissue = labels > 0
    contrast = 0.0
    if tissue.any() and (~tissue).any():
        contrast = float(np.median(sat[tissue]) - np.median(sat[~tissue])) / 255.0
    info = {
        "pieces": int(labels.max()),
        "area_fraction": float(tissue.mean()),
        "contrast": contrast,
        "smooth_um": float(smooth_um),
    }
    if contrast < min_contrast:
        labels = np.zeros_like(labels)
    return labels, info


# --------------------------------------------------------------------------------------------------------------------
# outputs


def _shapes(xy_px: np.ndarray, *, size_px: float, layout: Layout, transformations: dict[str, Any]) -> gpd.GeoDataFrame:
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    index = pd.RangeIndex(len(xy_px), name=INSTANCE_KEY)
    if layout == "hex":
        return ShapesModel.parse(
            np.asarray(xy_px, dtype=np.float64),
            geometry=0,
            radius=np.full(len(xy_px), size_px / 2.0),
            index=index,
            transformations=transformations,
        )
    half = size_px / 2.0
    boxes = shapely.box(xy_px[:, 0] - half, xy_px[:, 1] - half, xy_px[:, 0] + half, xy_px[:, 1] + half)
    gdf = gpd.GeoDataFrame(geometry=list(boxes), index=index)
    return ShapesModel.parse(gdf, transformations=transformations)


def _table(
    *,
    key_added: str,
    section: str,
    xy_um: np.ndarray,
    xy_px: np.ndarray,
    ij: np.ndarray,
    fraction: np.ndarray,
    mpp: float,
    size_um: float,
    stride_um: float,
    provenance: dict[str, Any],
) -> AnnData:
    from anndata import AnnData
    from scipy import sparse
    from spatialdata.models import TableModel

    n = len(xy_px)
    obs = pd.DataFrame(
        {
            REGION_KEY: pd.Categorical([key_added] * n, categories=[key_added]),
            INSTANCE_KEY: np.arange(n, dtype=np.int64),
            SECTION_KEY: pd.Categorical([section] * n, categories=[section]),
            "array_x": ij[:, 0].astype(np.int64),
            "array_y": ij[:, 1].astype(np.int64),
            "x_um": xy_um[:, 0].astype(np.float64),
            "y_um": xy_um[:, 1].astype(np.float64),
            "x_px": xy_px[:, 0].astype(np.float64),
            "y_px": xy_px[:, 1].astype(np.float64),
            "tissue_fraction": fraction.astype(np.float32),
        },
        index=pd.Index([f"{key_added}_{i}" for i in range(n)], dtype=object),
    )
    adata = AnnData(X=sparse.csr_matrix((n, 0), dtype=np.float32), obs=obs)
    adata.obsm[SPATIAL_KEY] = np.asarray(xy_px, dtype=np.float64)
    adata.uns[UNS_KEY] = {
        "mpp": {section: float(mpp)},
        "spot_diameter_um": {section: float(size_um)},
        "pitch_um": {section: float(stride_um)},
        "technology": {section: TILES_TECHNOLOGY},
        TILES_KEY: plain(provenance),
    }
    return TableModel.parse(adata, region=[key_added], region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _mask_labels(labels: np.ndarray, *, scale: tuple[float, float], image_transformations: dict[str, Any]) -> Any:
    """The low-resolution mask as a labels element aligned with the image in every coordinate system."""
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale
    from spatialdata.transformations import Sequence as TSequence

    to_full = Scale([scale[0], scale[1]], axes=("y", "x"))
    transformations = {cs: TSequence([to_full, t]) for cs, t in image_transformations.items()}
    dtype = np.uint8 if labels.max() < 256 else np.uint16
    return Labels2DModel.parse(labels.astype(dtype), dims=("y", "x"), transformations=transformations)


# --------------------------------------------------------------------------------------------------------------------
# public


def tile(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    size_um: float = 100.0,
    stride_um: float | None = None,
    layout: Layout = "square",
    tissue: bool = True,
    min_tissue_fraction: float | None = None,
    min_contrast: float | None = None,
    mpp: float | None = None,
    level: int | None = None,
    section: str | None = None,
    key_added: str | None = None,
    table_key: str | None = None,
    mask_key: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> SpatialData | None:
    """Cover the tissue of an H&E image with tiles (squares, or circles on a hexagonal lattice), in microns.

    The tiles are laid out on a lattice in microns over the whole full-resolution image (the pattern centred on it),
    converted to pixels with the image's µm per pixel, and stored in the image's pixel frame with the image's own
    transformations, so they sit on the image in every coordinate system it has (a scale or translation to a
    coordinate system in microns included). With ``tissue=True`` only tiles whose footprint is at least
    ``min_tissue_fraction`` tissue are kept.

    Tissue is detected with squidpy's :func:`~squidpy.experimental.im.detect_tissue` (Otsu thresholding, oriented by
    the brighter side as glass, small holes filled, specimen-sized pieces kept), applied to the inverted HSV saturation (stain is
    coloured, glass is not; the grey level confuses pale stroma with glass), smoothed with a 10 µm Gaussian (so the
    threshold separates tissue from glass, not nuclei from stroma), of one low-resolution pyramid level: the
    coarsest level on which a tile spans at least 8 pixels, block-averaged lazily when it still has many more. The full-resolution image is never decoded, and the mask is kept at that level.

    Parameters
    ----------
    sdata
        SpatialData with at least one image (e.g. from :func:`stpred.io.read_legacy_st` or any reader).
    image_key
        Image to tile; may be omitted when ``sdata`` has only one image.
    size_um
        Side of a square tile, or diameter of a circle (``layout="hex"``), in microns.
    stride_um
        Distance between neighbouring tile centres in microns; defaults to ``size_um`` (touching tiles). Use e.g.
        ``size_um=55, stride_um=100, layout="hex"`` for a Visium-like pattern, ``size_um=100, stride_um=200``
        for a legacy-ST-like square grid, a stride below the size for overlapping tiles.
    layout
        ``"square"`` (square tiles on a square grid) or ``"hex"`` (circles on a hexagonal lattice).
    tissue
        Keep only tiles on detected tissue. ``False`` keeps the full grid (no detection, no mask).
    min_tissue_fraction
        Smallest fraction of a tile's footprint that must be tissue (default 0.5). Only with ``tissue=True``.
    min_contrast
        Smallest difference between the median saturation (0–1) of tissue and of background for the detected mask
        to count (default 0.05); below it the image counts as having no tissue. Lower it for a very faint stain. Only
        with ``tissue=True``.
    mpp
        Microns per full-resolution pixel of the image. By default found through the image's transformation when a
        table adopted by :func:`stpred.io.adopt` (or any ``pp`` function) places the image's section — so a
        spatialdata-io Visium object's hires and lowres images each get their own — else read from
        ``uns["stpred"]["mpp"][section]`` of a table (the stpred readers record it); required otherwise.
    level
        Pyramid level used for tissue detection; ``None`` chooses as described above.
    section
        Section name written to ``obs["section"]``; defaults to the adopted section the image shows (see ``mpp``),
        else the image key without its ``"_hne"`` suffix (the stpred naming), else the image key.
    key_added
        Name of the new shapes element; defaults to ``"{section}_tiles"``.
    table_key
        Name of the new table; defaults to ``"{key_added}_table"``.
    mask_key
        Name of the new labels element holding the tissue mask (``tissue=True`` only); defaults to
        ``"{key_added}_mask"``.
    overwrite
        Replace the elements of these names made by an earlier call. By default an existing element is never
        replaced, and an element not made by :func:`tile` never is.
    copy
        Return a new SpatialData object holding the elements of ``sdata`` (shared, not copied) plus the new ones,
        leaving ``sdata`` unchanged. By default ``sdata`` is modified and nothing is returned.

    Returns
    -------
    ``None`` (or the new object with ``copy=True``); adds

    - ``shapes[key_added]``: the tiles, squares (polygons) or circles (``radius``), in full-resolution pixels of
      the image with the image's transformations; index ``spot_id`` 0..n-1;
    - ``tables[table_key]``: one row per tile, no genes (``X`` is an empty ``n × 0`` sparse matrix), annotating
      ``key_added`` (``region_key="region"``, ``instance_key="spot_id"``). ``obs``: ``section``, lattice indices
      ``array_x``/``array_y`` (doubled x for ``"hex"``), centres ``x_um``/``y_um`` (µm from the image's top-left
      corner) and ``x_px``/``y_px`` (full-resolution pixels, also in ``obsm["spatial"]``), ``tissue_fraction``
      (NaN with ``tissue=False``). ``uns["stpred"]`` has ``mpp``, ``spot_diameter_um`` (= ``size_um``),
      ``pitch_um`` (= ``stride_um``) and ``technology`` (``"tiles"``) per section, like the readers' tables, and
      ``tiles``: image key, size, stride, layout, level, detection method and parameters, counts;
    - ``labels[mask_key]`` (``tissue=True``): the low-resolution tissue labels (0 background, 1..K pieces),
      aligned with the image.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=1)
    >>> stpred.pp.tile(sdata, size_um=100)
    >>> table = sdata.tables["S0_tiles_table"]
    >>> bool((table.obs["tissue_fraction"] >= 0.5).all())
    True
    """
    from spatialdata.transformations import get_transformation

    # ------------------------------------------------------------------ validate everything before any change
    if not hasattr(sdata, "images") or not hasattr(sdata, "tables"):
        msg = f"Expected a SpatialData object, found {type(sdata).__name__}."
        raise TypeError(msg)
    image_key = _resolve_image(sdata, image_key)
    if not isinstance(overwrite, bool) or not isinstance(copy, bool):
        msg = "Expected `overwrite` and `copy` to be True or False."
        raise TypeError(msg)
    check_one_of(layout, ("square", "hex"), name="layout")
    size_um = _check_number(size_um, name="size_um", low=0.0)
    stride_um = size_um if stride_um is None else _check_number(stride_um, name="stride_um", low=0.0)
    if not isinstance(tissue, bool):
        msg = f"Expected `tissue` to be True or False, found {tissue!r}."
        raise TypeError(msg)
    if not tissue:
        given = [
            n
            for n, v in (("min_tissue_fraction", min_tissue_fraction), ("min_contrast", min_contrast))
            if v is not None
        ]
        if given:
            msg = f"{given} only apply to tissue detection; drop them or set `tissue=True`."
            raise ValueError(msg)
        if mask_key is not None:
            msg = "`mask_key` names the tissue mask, which `tissue=False` does not make; drop it or set `tissue=True`."
            raise ValueError(msg)
        if level is not None:
            msg = "`level` chooses the level for tissue detection, which `tissue=False` skips; drop it."
            raise ValueError(msg)
    min_fraction = (
        0.5
        if min_tissue_fraction is None
        else _check_number(min_tissue_fraction, name="min_tissue_fraction", low=0.0, high=1.0, strict=False)
    )
    contrast_floor = (
        0.05
        if min_contrast is None
        else _check_number(min_contrast, name="min_contrast", low=0.0, high=1.0, strict=False)
    )

    image = sdata.images[image_key]
    transformations = dict(get_transformation(image, get_all=True))
    if section is not None:
        section = _check_key(section, name="section")
    placed = image_section_mpp(sdata, image_key, section)
    if section is None:
        section = placed[0] if placed is not None else _default_section(image_key)
    key_added = f"{section}_tiles" if key_added is None else _check_key(key_added, name="key_added")
    table_key = f"{key_added}_table" if table_key is None else _check_key(table_key, name="table_key")
    if tissue:
        mask_key = f"{key_added}_mask" if mask_key is None else _check_key(mask_key, name="mask_key")
    names = [key_added, table_key] + ([mask_key] if tissue else [])
    if len(set(names)) != len(names):
        msg = f"`key_added`, `table_key` and `mask_key` must differ; found {names}."
        raise ValueError(msg)
    new = dict(zip(names, ("shapes", "tables", "labels")))
    existing = _element_names(sdata)
    if image_key in new:
        msg = f"{image_key!r} is the image being tiled; choose other names for the outputs."
        raise ValueError(msg)
    ours = _tile_outputs(sdata)
    for name, kind in new.items():
        if name not in existing:
            continue
        if existing[name] != kind or name not in ours:
            msg = (
                f"`sdata.{existing[name]}` already has an element {name!r}, not made by `stpred.pp.tile`; choose "
                "another name (`key_added=`, `table_key=`, `mask_key=`)."
            )
            raise ValueError(msg)
        if not overwrite:
            msg = f"`sdata.{existing[name]}` already has an element {name!r}; pass `overwrite=True` to replace it."
            raise ValueError(msg)
    mpp, mpp_source = _resolve_mpp(sdata, section, image_key, mpp, placed)

    # ------------------------------------------------------------------ lattice over the whole image
    levels = pyramid_levels(image)
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    size_px = size_um / mpp
    xy_um, ij = lattice_centres(w0 * mpp, h0 * mpp, size_um=size_um, stride_um=stride_um, layout=layout)
    if len(xy_um) == 0:
        msg = (
            f"Image {image_key!r} ({w0 * mpp:.0f} × {h0 * mpp:.0f} µm at {mpp:g} µm/px) is smaller than one "
            f"{size_um:g} µm tile; use a smaller `size_um` (or check `mpp`)."
        )
        raise ValueError(msg)
    xy_px = xy_um / mpp
    n_grid = len(xy_px)

    provenance: dict[str, Any] = {
        "image_key": image_key,
        "size_um": size_um,
        "stride_um": stride_um,
        "layout": layout,
        "mpp": mpp,
        "mpp_source": mpp_source,
        "n_grid": n_grid,
        "tissue": tissue,
    }
    labels = chosen = None
    if tissue:
        _check_rgb(levels[0], image_key)
        chosen = _choose_level(image, size_px=size_px, level=level, image_key=image_key)
        level_mpp = mpp * float(np.sqrt(chosen.scale[0] * chosen.scale[1]))
        labels, info = detect_tissue_mask(_rgb(chosen), level_mpp=level_mpp, min_contrast=contrast_floor)
        if not (labels > 0).any():
            msg = (
                f"No tissue detected in image {image_key!r} (level {chosen.index}; saturation contrast between "
                f"candidate tissue and background {info['contrast']:.3f}, below `min_contrast={contrast_floor:g}`). "
                "Check that the image shows tissue, lower `min_contrast`, or pass `tissue=False` to tile the whole image."
            )
            raise ValueError(msg)
        fraction = tissue_fraction(labels, xy_px, size_px=size_px, layout=layout, scale=chosen.scale)
        keep = fraction >= min_fraction
        if not keep.any():
            msg = (
                f"No {size_um:g} µm tile of image {image_key!r} has at least {min_fraction:g} of its area on the "
                f"detected tissue (largest fraction {fraction.max():.2f}); lower `min_tissue_fraction` or `size_um`."
            )
            raise ValueError(msg)
        xy_um, xy_px, ij, fraction = xy_um[keep], xy_px[keep], ij[keep], fraction[keep]
        provenance.update(
            {
                "level": chosen.index,
                "coarsen": chosen.coarsen,
                "level_shape": list(labels.shape),
                "mask_scale": [float(chosen.scale[0]), float(chosen.scale[1])],
                "level_mpp": [mpp * chosen.scale[0], mpp * chosen.scale[1]],
                "detection": {
                    "function": "squidpy.experimental.im.detect_tissue",
                    "method": "otsu",
                    "channel": "saturation",
                    "min_contrast": contrast_floor,
                    **info,
                },
                "min_tissue_fraction": min_fraction,
                "mask_key": mask_key,
            }
        )
    else:
        fraction = np.full(n_grid, np.nan)
    provenance["n_tiles"] = len(xy_px)

    shapes = _shapes(xy_px, size_px=size_px, layout=layout, transformations=transformations)
    table = _table(
        key_added=key_added,
        section=section,
        xy_um=xy_um,
        xy_px=xy_px,
        ij=ij,
        fraction=fraction,
        mpp=mpp,
        size_um=size_um,
        stride_um=stride_um,
        provenance=provenance,
    )
    record(table, "tile", **{k: v for k, v in provenance.items() if k != "detection"})
    mask = None
    if labels is not None and chosen is not None:
        mask = _mask_labels(labels, scale=chosen.scale, image_transformations=transformations)
    logger.info("%s: %d of %d %g µm tiles kept on tissue", image_key, len(xy_px), n_grid, size_um)

    # ------------------------------------------------------------------ write (nothing above changed sdata)
    target = (
        sdata.subset(list(_element_names(sdata)), filter_tables=False, include_orphan_tables=True) if copy else sdata
    )
    target.shapes[key_added] = shapes
    if mask is not None:
        target.labels[mask_key] = mask
    target.tables[table_key] = table
    return target if copy else None
