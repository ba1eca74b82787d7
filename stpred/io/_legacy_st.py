"""Reader for the legacy Spatial Transcriptomics format, plus the element builders every stpred reader shares."""

from __future__ import annotations

import gzip
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, PATIENT_KEY, REGION_KEY, SECTION_KEY, SPATIAL_KEY, UNS_KEY, image_key, shapes_key

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator, Sequence

    import geopandas as gpd
    import xarray as xr
    from anndata import AnnData
    from scipy import sparse
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Chunk shape of every H&E image stpred writes (channels, y, x).
IMAGE_CHUNKS = (3, 1024, 1024)


# --------------------------------------------------------------------------------------------------------------------
# element builders shared by all readers and data sets
# --------------------------------------------------------------------------------------------------------------------
def _scale_factors(shape: Sequence[int], *, coarsest: int = 1024) -> list[int]:
    """Factors of 2 that halve the image until its longer side is at most ``coarsest`` pixels (at least one level)."""
    side = max(shape[-2:])
    factors = [2]
    side //= 2
    while side > coarsest:
        factors.append(2)
        side //= 2
    return factors


def _halve(image: np.ndarray) -> np.ndarray:
    """Downsample ``(c, y, x)`` uint8 by 2 along y and x (mean of each 2×2 block, odd edges trimmed)."""
    h, w = image.shape[1] // 2 * 2, image.shape[2] // 2 * 2
    total = image[:, 0:h:2, 0:w:2].astype(np.uint16)
    total += image[:, 1:h:2, 0:w:2]
    total += image[:, 0:h:2, 1:w:2]
    total += image[:, 1:h:2, 1:w:2]
    total += 2
    total >>= 2
    return total.astype(np.uint8)


def _hne_image(image: np.ndarray, section: str) -> xr.DataTree:
    """Parse an RGB ``uint8`` array ``(c, y, x)`` as the multiscale image element of ``section``.

    The coarser levels are computed here, once, in numpy (2×2 block means) and stored in memory: about a third more
    memory than the full-resolution image, in exchange for fast plotting and writing (a lazy dask pyramid recomputes
    every coarser level from full resolution on each access).
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    tree = Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=_scale_factors(image.shape),
        chunks=IMAGE_CHUNKS,
        transformations={section: Identity()},
    )
    level = image
    for key in list(tree)[1:]:
        level = _halve(level)
        node = tree[key]["image"]
        if node.shape != level.shape:  # pragma: no cover - both trim odd edges
            msg = f"Pyramid level {key} has shape {node.shape}, expected {level.shape}."
            raise RuntimeError(msg)
        tree[key]["image"].data = da.from_array(level, chunks=IMAGE_CHUNKS)
    return tree


def _spot_circles(xy: np.ndarray, radius: float, section: str) -> gpd.GeoDataFrame:
    """Parse spot centres ``(n, 2)`` (x, y full-resolution pixels) as circles indexed ``0..n-1``."""
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    n = len(xy)
    index = pd.RangeIndex(n, name=INSTANCE_KEY)
    return ShapesModel.parse(
        np.asarray(xy, dtype=np.float64),
        geometry=0,
        radius=np.full(n, float(radius)),
        index=index,
        transformations={section: Identity()},
    )


def _section_table(
    counts: sparse.csr_matrix,
    genes: Sequence[str],
    *,
    spots: Sequence[str],
    array_xy: np.ndarray,
    pixel_xy: np.ndarray,
    section: str,
    patient: str,
    mpp: float,
    spot_diameter_um: float,
    pitch_um: float,
    technology: str,
) -> AnnData:
    """Build the (not yet parsed) raw-count table of one section in the stpred contract."""
    from anndata import AnnData
    from scipy import sparse

    n = counts.shape[0]
    region = shapes_key(section)
    obs = pd.DataFrame(
        {
            REGION_KEY: pd.Categorical([region] * n),
            INSTANCE_KEY: np.arange(n, dtype=np.int64),
            SECTION_KEY: pd.Categorical([section] * n),
            PATIENT_KEY: pd.Categorical([patient] * n),
            "array_x": np.asarray(array_xy[:, 0], dtype=np.int64),
            "array_y": np.asarray(array_xy[:, 1], dtype=np.int64),
        },
        index=pd.Index([f"{section}_{s}" for s in spots], dtype=object),
    )
    var = pd.DataFrame({f"present_{section}": np.ones(len(genes), dtype=bool)}, index=pd.Index(genes, dtype=object))
    adata = AnnData(X=sparse.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = np.asarray(pixel_xy, dtype=np.float64)
    adata.uns[UNS_KEY] = {
        "mpp": {section: float(mpp)},
        "spot_diameter_um": {section: float(spot_diameter_um)},
        "pitch_um": {section: float(pitch_um)},
        "technology": {section: technology},
    }
    return adata


def _parse_table(adata: AnnData, regions: Sequence[str]) -> AnnData:
    """Annotate ``regions`` (shapes names) with ``adata`` through :class:`~spatialdata.models.TableModel`."""
    from spatialdata.models import TableModel

    return TableModel.parse(adata, region=list(regions), region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _section_sdata(section: str, image: Any, circles: Any, table: AnnData) -> SpatialData:
    """Assemble one section's elements into a SpatialData object."""
    from spatialdata import SpatialData

    from .._constants import RAW_TABLE

    return SpatialData(
        images={image_key(section): image},
        shapes={shapes_key(section): circles},
        tables={RAW_TABLE: _parse_table(table, [shapes_key(section)])},
    )


# --------------------------------------------------------------------------------------------------------------------
# legacy ST reader
# --------------------------------------------------------------------------------------------------------------------
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
_TIFF_SUFFIXES = (".tif", ".tiff")
_RGB_HINT = "Convert it to 8-bit RGB first, e.g. `PIL.Image.open(path).convert('RGB').save('image_rgb.png')`."


def _check_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`, or a :class:`FileNotFoundError` naming the missing ``what`` file."""
    path = Path(path)
    if not path.is_file():
        msg = f"The {what} file {str(path)!r} does not exist; check the path."
        raise FileNotFoundError(msg)
    return path


def _open_text(path: Path) -> Any:
    """Open a text file, decompressing ``.gz``."""
    return gzip.open(path, "rt") if path.suffix == ".gz" else path.open()


def _read_spots(path: Path) -> pd.DataFrame:
    """Spot-selection table indexed by ``"{x}x{y}"``: selected spots only, with integer array coordinates."""
    spots = pd.read_csv(path, sep="\t")
    missing = [c for c in _SPOT_COLUMNS if c not in spots.columns]
    if missing:
        msg = (
            f"The spot file {str(path)!r} lacks the column(s) {missing}; found {list(spots.columns)}. It needs "
            "`x`, `y` (array grid position) and `pixel_x`, `pixel_y` (spot centre in full-resolution image pixels), "
            "as written by the ST spot detector (`*_selection.tsv`)."
        )
        raise ValueError(msg)
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    coords = spots[list(_SPOT_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    if coords.isna().to_numpy().any():
        bad = coords.columns[coords.isna().any()].tolist()
        msg = f"The spot file {str(path)!r} has missing or non-numeric values in {bad}; fix or drop those rows."
        raise ValueError(msg)
    grid = coords[["x", "y"]].to_numpy()
    if not np.allclose(grid, np.round(grid)):
        msg = f"The spot file {str(path)!r} has non-integer `x`/`y` array coordinates; use the integer grid columns."
        raise ValueError(msg)
    coords[["x", "y"]] = np.round(grid).astype(np.int64)
    coords.index = pd.Index([f"{x}x{y}" for x, y in grid.round().astype(np.int64)], dtype=object)
    if coords.index.has_duplicates:
        dup = coords.index[coords.index.duplicated()].unique()[:5].tolist()
        msg = f"The spot file {str(path)!r} lists the array position(s) {dup} more than once; keep one row per spot."
        raise ValueError(msg)
    return coords


def _read_counts(path: Path) -> tuple[sparse.csr_matrix, pd.Index, pd.Index]:
    """Counts TSV (spots × genes) as CSR float32, its spot ids and gene names (duplicates summed, with a warning)."""
    from scipy import sparse

    with _open_text(path) as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
        first = fh.readline().rstrip("\r\n").split("\t")
    if len(first) < 2:
        msg = f"The counts file {str(path)!r} has no data rows (or is not tab-separated); expected spots × genes."
        raise ValueError(msg)
    # header with or without a leading field for the spot-id column
    genes = header[1:] if len(header) == len(first) else header
    if len(genes) != len(first) - 1:
        msg = (
            f"The counts file {str(path)!r} has {len(header)} header fields but {len(first)} fields in its first row; "
            "expected one spot-id column followed by one column per gene."
        )
        raise ValueError(msg)
    table = pd.read_csv(path, sep="\t", header=None, skiprows=1, index_col=0)
    table.index = table.index.astype(str).str.strip()
    if table.index.has_duplicates:
        dup = table.index[table.index.duplicated()].unique()[:5].tolist()
        msg = f"The counts file {str(path)!r} has duplicate spot ids {dup}; each spot must appear in one row."
        raise ValueError(msg)
    non_numeric = [genes[i] for i, dt in enumerate(table.dtypes) if not np.issubdtype(dt, np.number)]
    if non_numeric:
        msg = f"The counts file {str(path)!r} has non-numeric values in gene column(s) {non_numeric[:5]}."
        raise ValueError(msg)
    values = table.to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        rows, cols = np.nonzero(np.isnan(values))
        msg = (
            f"The counts file {str(path)!r} has {len(rows)} missing (NaN) count(s), e.g. spot {table.index[rows[0]]!r}, "
            f"gene {genes[cols[0]]!r}. Raw counts must be complete; fill missing counts with 0 if that is what they mean."
        )
        raise ValueError(msg)
    if (values < 0).any():
        rows, cols = np.nonzero(values < 0)
        msg = (
            f"The counts file {str(path)!r} has {len(rows)} negative count(s), e.g. spot {table.index[rows[0]]!r}, "
            f"gene {genes[cols[0]]!r}. Pass raw (non-negative) counts, not normalised values."
        )
        raise ValueError(msg)
    counts = sparse.csr_matrix(values, dtype=np.float32)
    names = pd.Index(genes, dtype=object)
    if names.has_duplicates:
        codes, unique = pd.factorize(names)  # first-appearance order
        summer = sparse.csr_matrix(
            (np.ones(len(names), dtype=np.float32), (np.arange(len(names)), codes)),
            shape=(len(names), len(unique)),
        )
        dup = names[names.duplicated()].unique()
        warnings.warn(
            f"The counts file {str(path)!r} has {len(dup)} duplicated gene name(s) (first: {dup[:5].tolist()}); "
            "their counts are summed into one column each.",
            UserWarning,
            stacklevel=3,
        )
        counts = sparse.csr_matrix(counts @ summer, dtype=np.float32)
        names = pd.Index(unique, dtype=object)
    return counts, pd.Index(table.index, dtype=object), names


@contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Let PIL open very large H&E images (its decompression-bomb guard stops at ~179 Mpx)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _image_size(path: Path) -> tuple[int, int, str]:
    """Width, height and colour mode of an image, read from its header without decoding the pixels."""
    if path.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape, dtype = page.shape, page.dtype
        if dtype != np.uint8:
            msg = f"The image {str(path)!r} has {dtype} pixels; expected 8-bit RGB. {_RGB_HINT}"
            raise ValueError(msg)
        if len(shape) == 3 and shape[-1] in (3, 4):
            return shape[1], shape[0], "RGB" if shape[-1] == 3 else "RGBA"
        if len(shape) == 3 and shape[0] in (3, 4):
            return shape[2], shape[1], "RGB" if shape[0] == 3 else "RGBA"
        msg = f"The image {str(path)!r} has shape {shape}; expected an RGB image (height, width, 3). {_RGB_HINT}"
        raise ValueError(msg)
    from PIL import Image, UnidentifiedImageError

    try:
        with _no_pixel_limit(), Image.open(path) as im:
            return im.size[0], im.size[1], im.mode
    except UnidentifiedImageError:
        msg = f"Cannot read the image {str(path)!r}; expected a JPEG, PNG or TIFF H&E image."
        raise ValueError(msg) from None


def _check_mode(path: Path, mode: str) -> None:
    if mode not in ("RGB", "RGBA"):
        kind = {"L": " (grey)", "LA": " (grey + alpha)", "P": " (palette)", "1": " (binary)", "I;16": " (16-bit)"}
        msg = f"The image {str(path)!r} has mode {mode!r}{kind.get(mode, '')}; expected RGB. {_RGB_HINT}"
        raise ValueError(msg)


def _check_image(path: Path, pixel_xy: np.ndarray, ids: Sequence[str]) -> None:
    """Refuse a non-RGB image, or spot centres outside it, before decoding it."""
    width, height, mode = _image_size(path)
    _check_mode(path, mode)
    outside = (pixel_xy[:, 0] < 0) | (pixel_xy[:, 0] >= width) | (pixel_xy[:, 1] < 0) | (pixel_xy[:, 1] >= height)
    if outside.any():
        first = np.flatnonzero(outside)[0]
        where = tuple(round(float(v), 1) for v in pixel_xy[first])
        msg = (
            f"{outside.sum()} spot centre(s) lie outside the {width}×{height} image {str(path)!r} (e.g. spot "
            f"{ids[first]!r} at {where}). Spot positions must be full-resolution pixels of this image: check that "
            "the image is the full-resolution one of the same section."
        )
        raise ValueError(msg)


def _read_rgb(path: Path) -> np.ndarray:
    """Decode the image once into a ``(c, y, x)`` uint8 array (a view on the decoded ``(y, x, c)`` pixels)."""
    if path.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        pixels = tifffile.imread(path, key=0)
        if pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
            pixels = np.moveaxis(pixels, 0, -1)
    else:
        from PIL import Image

        with _no_pixel_limit(), Image.open(path) as im:
            pixels = np.asarray(im)
    if pixels.shape[-1] == 4:
        warnings.warn(
            f"The image {str(path)!r} has an alpha channel; it is dropped (the RGB channels are kept).",
            UserWarning,
            stacklevel=3,
        )
        pixels = pixels[..., :3]
    return np.moveaxis(pixels, -1, 0)


#: Plausible microns per full-resolution pixel of an H&E scan; outside this range the fit is probably wrong.
_MPP_RANGE = (0.1, 10.0)


def _affine_steps(array_xy: np.ndarray, pixel_xy: np.ndarray) -> np.ndarray:
    """``2×2`` matrix whose rows are the pixel displacements of one step along array x and along array y.

    Fitted as ``pixel ~ array`` by least squares, then refitted once without gross outliers (mis-registered spots).
    """
    design = np.c_[array_xy.astype(np.float64), np.ones(len(array_xy))]
    if len(array_xy) < 3 or np.linalg.matrix_rank(design) < 3:
        msg = (
            f"Cannot estimate the spot pitch from {len(array_xy)} spot(s) on one line; legacy ST sections need at "
            "least 3 spots spanning both array directions."
        )
        raise ValueError(msg)
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    residual = np.linalg.norm(design @ coef - pixel_xy, axis=1)
    step = np.sqrt(np.abs(np.linalg.det(coef[:2])))
    inliers = residual < 0.5 * step
    if inliers.sum() >= 3 and np.linalg.matrix_rank(design[inliers]) == 3:
        coef, *_ = np.linalg.lstsq(design[inliers], pixel_xy[inliers], rcond=None)
    return coef[:2]


def _array_geometry(array_xy: np.ndarray) -> tuple[str, np.ndarray]:
    """Layout of the occupied array positions and the two independent nearest-neighbour offsets (array units).

    ``"square"``: nearest neighbours are axis-aligned (offsets ``(d, 0)`` and ``(0, d)``). ``"checkerboard"``:
    only positions of one parity of ``x + y`` are occupied (spacing ``d`` along each axis) and the nearest
    neighbours are diagonal (offsets ``(d, d)`` and ``(d, -d)``). The spacing ``d`` is the most common distance
    from a spot to its nearest neighbour.
    """
    from scipy.spatial import cKDTree

    xy = np.unique(np.asarray(array_xy, dtype=np.int64), axis=0)
    dist, idx = cKDTree(xy).query(xy, k=2)
    offsets = np.abs(xy[idx[:, 1]] - xy)
    nearest = dist[:, 1]
    values, counts = np.unique(np.round(nearest, 6), return_counts=True)
    d_min = values[np.argmax(counts)]
    at_min = offsets[np.isclose(nearest, d_min)]
    diagonal = (at_min[:, 0] == at_min[:, 1]) & (at_min[:, 0] > 0)
    if diagonal.mean() > 0.5:
        step = int(at_min[diagonal][0, 0])
        return "checkerboard", np.array([[step, step], [step, -step]], dtype=np.float64)
    axis = at_min[(at_min == 0).any(axis=1)]
    step = int(axis.max()) if len(axis) else max(1, round(float(d_min)))
    return "square", np.array([[step, 0], [0, step]], dtype=np.float64)


def _grid_pitch(array_xy: np.ndarray, pixel_xy: np.ndarray) -> tuple[float, str]:
    """Pixels between nearest-neighbour spots and the array layout (``"square"`` or ``"checkerboard"``).

    The pixel distance of each nearest-neighbour offset comes from an affine fit ``pixel ~ array`` (robust to
    missing neighbours); the pitch is the geometric mean over the two independent offsets.
    """
    steps = _affine_steps(array_xy, pixel_xy)
    layout, neighbours = _array_geometry(array_xy)
    lengths = np.linalg.norm(neighbours @ steps, axis=1)
    return float(np.sqrt(lengths[0] * lengths[1])), layout


def read_legacy_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike,
    *,
    section: str,
    patient: str | None = None,
    spot_pitch_um: float | None = None,
) -> SpatialData:
    """Read one section in the legacy Spatial Transcriptomics format (Ståhl et al. 2016).

    Spots are matched between the counts and the spot file on their array position ``"{x}x{y}"``; spots marked
    ``selected != 1`` (outside the tissue) and spots missing from either file are dropped. The microns per pixel are
    estimated from the spot grid: legacy ST spots are 100 µm wide on a 200 µm grid, and the grid step in pixels is
    fitted from the spots' array and pixel positions, so ``mpp = 200 / pitch_px`` and the circles' radius is
    ``pitch_px / 4``.

    Parameters
    ----------
    counts
        Tab-separated counts (optionally ``.gz``): one row per spot, first column the spot id ``"{x}x{y}"``,
        then one column per gene, header row with the gene symbols. Duplicated gene names are summed into one
        column (with a warning).
    spots
        Tab-separated spot file with columns ``x``, ``y`` (array position), ``pixel_x``, ``pixel_y`` (spot centre in
        full-resolution image pixels) and optionally ``selected`` (1 = under tissue; only those are kept).
    image
        Full-resolution H&E image (JPEG, PNG or TIFF), 8-bit RGB. An alpha channel is dropped with a warning; grey
        or palette images are refused (convert them to RGB first).
    section
        Section name: the coordinate system, the prefix of the element names (``{section}_hne``,
        ``{section}_spots``) and of the spot names (``{section}_{x}x{y}``).
    patient
        Patient (donor) of the section, used to group sections in cross-validation; defaults to ``section``.
    spot_pitch_um
        Centre-to-centre distance of nearest-neighbour spots in microns; default 200 (the legacy ST array). Pass it
        for arrays with another spacing.

    Returns
    -------
    SpatialData with the image ``"{section}_hne"`` (multiscale RGB uint8), the circles ``"{section}_spots"`` and
    the raw-count table ``"table"`` (see :func:`stpred.io.concat` to combine sections). ``uns["stpred"]`` records
    ``mpp``, ``spot_diameter_um`` (100), ``pitch_um`` (``spot_pitch_um``), ``geometry`` and ``technology``
    (``"legacy_st"``).

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.io.read_legacy_st(
    ...     "ST-cnts/C2.tsv.gz", "ST-spotfiles/C2_selection.tsv", "ST-imgs/C/C2/5714_HE_BT_C2.jpg", section="C2"
    ... )  # doctest: +SKIP
    """
    from .._constants import LEGACY_ST_PITCH_UM, LEGACY_ST_SPOT_DIAMETER_UM

    counts_path = _check_file(counts, "counts")
    spots_path = _check_file(spots, "spot")
    image_path = _check_file(image, "image")
    if not isinstance(section, str) or not section:
        msg = f"Expected `section` to be a non-empty string, found {section!r}."
        raise ValueError(msg)
    patient = section if patient is None else str(patient)
    if spot_pitch_um is None:
        spot_pitch_um = LEGACY_ST_PITCH_UM
    if isinstance(spot_pitch_um, bool) or not isinstance(spot_pitch_um, int | float | np.number) or spot_pitch_um <= 0:
        msg = f"Expected `spot_pitch_um` to be a positive number of microns, found {spot_pitch_um!r}."
        raise ValueError(msg)
    spot_pitch_um = float(spot_pitch_um)

    spot_table = _read_spots(spots_path)
    matrix, spot_ids, genes = _read_counts(counts_path)
    keep = spot_ids.isin(spot_table.index)
    if not keep.any():
        msg = (
            f"No spot of section {section!r} is left after matching the counts ({len(spot_ids)} spots, e.g. "
            f"{spot_ids[:3].tolist()}) with the selected spots of the spot file ({len(spot_table)}, e.g. "
            f"{spot_table.index[:3].tolist()}). Check that both files belong to the same section and that the "
            "count rows are named '{x}x{y}'."
        )
        raise ValueError(msg)
    if not keep.all():
        logger.info(
            "section %s: %d of %d count rows have no selected spot and are dropped", section, (~keep).sum(), len(keep)
        )
    ids = spot_ids[keep]
    matrix = matrix[np.flatnonzero(keep)]
    located = spot_table.loc[ids]
    pixel_xy = located[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    array_xy = located[["x", "y"]].to_numpy(dtype=np.int64)

    _check_image(image_path, pixel_xy, ids)
    pitch_px, layout = _grid_pitch(array_xy, pixel_xy)
    mpp = spot_pitch_um / pitch_px
    if not _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
        warnings.warn(
            f"Section {section!r}: the estimated {mpp:.3g} µm/px (nearest spots {pitch_px:.3g} px apart, "
            f"{layout} array, {spot_pitch_um:g} µm pitch) is outside the plausible {_MPP_RANGE[0]}–{_MPP_RANGE[1]} "
            "µm/px of an H&E scan. Check that `pixel_x`/`pixel_y` are full-resolution pixels of this image, or pass "
            "the array's true `spot_pitch_um=`.",
            UserWarning,
            stacklevel=2,
        )

    pixels = _read_rgb(image_path)
    table = _section_table(
        matrix,
        genes,
        spots=ids,
        array_xy=array_xy,
        pixel_xy=pixel_xy,
        section=section,
        patient=patient,
        mpp=mpp,
        spot_diameter_um=LEGACY_ST_SPOT_DIAMETER_UM,
        pitch_um=spot_pitch_um,
        technology="legacy_st",
    )
    table.uns[UNS_KEY]["geometry"] = {section: layout}
    radius = LEGACY_ST_SPOT_DIAMETER_UM / mpp / 2.0
    return _section_sdata(section, _hne_image(pixels, section), _spot_circles(pixel_xy, radius, section), table)
