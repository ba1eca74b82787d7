"""Xenium cells pooled into square pseudo-spots, placed on the H&E image (or the morphology image)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Element names given by :func:`spatialdata_io.xenium`.
_HE_IMAGE = "he_image"
_MORPHOLOGY = ("morphology_focus", "morphology_mip")
_CELL_SHAPES = ("cell_circles", "cell_boundaries", "nucleus_boundaries")
_CENTROID_COLUMNS = ("x_centroid", "y_centroid")
#: The coordinate system of :func:`spatialdata_io.xenium` (morphology-image pixels).
_GLOBAL = "global"


def _centroids_um(table: AnnData, table_key: str) -> np.ndarray:
    """Cell centres in microns, ``(n, 2)`` as (x, y): ``obsm["spatial"]`` or ``obs[["x_centroid", "y_centroid"]]``."""
    if "spatial" in table.obsm:
        xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
        source = "obsm['spatial']"
    elif all(c in table.obs for c in _CENTROID_COLUMNS):
        xy = table.obs[list(_CENTROID_COLUMNS)].to_numpy(dtype=np.float64)
        source = f"obs{list(_CENTROID_COLUMNS)}"
    else:
        msg = (
            f"The table {table_key!r} has no cell centroids: expected `obsm['spatial']` (microns, as "
            f"`spatialdata_io.xenium` writes it) or the columns `obs{list(_CENTROID_COLUMNS)}` (from cells.parquet); "
            f"found obsm {sorted(table.obsm)} and obs {list(table.obs.columns)[:10]}. Read the data with "
            "`spatialdata_io.xenium(..., cells_table=True)` or add the centroids."
        )
        raise ValueError(msg)
    if xy.ndim != 2 or xy.shape[1] < 2:
        msg = f"The cell centroids {source} of table {table_key!r} have shape {xy.shape}; expected (n_cells, 2)."
        raise ValueError(msg)
    xy = xy[:, :2]
    if not np.isfinite(xy).all():
        bad = int((~np.isfinite(xy)).any(axis=1).sum())
        msg = f"{bad} cell centroid(s) in {source} of table {table_key!r} are NaN or infinite; drop those cells first."
        raise ValueError(msg)
    return xy


def _pixel_size_um(sdata: SpatialData) -> float | None:
    """Microns per morphology pixel from the cell shapes' ``Scale`` to ``"global"`` (how spatialdata-io sets it)."""
    from spatialdata.transformations import get_transformation

    for name in _CELL_SHAPES:
        if name in sdata.shapes:
            transforms = get_transformation(sdata.shapes[name], get_all=True)
            if _GLOBAL in transforms:
                matrix = transforms[_GLOBAL].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
                scale = np.sqrt(abs(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:2, :2])))
                if scale > 0:
                    return float(1.0 / scale)
    return None


def _choose_image(sdata: SpatialData, image_key: str | None) -> tuple[str, bool]:
    """Name of the image to place the spots on and whether it is an H&E image."""
    if image_key is not None:
        if image_key not in sdata.images:
            msg = f"No image {image_key!r} in `sdata.images`; found {sorted(sdata.images)}."
            raise KeyError(msg)
        return image_key, True
    if _HE_IMAGE in sdata.images:
        return _HE_IMAGE, True
    for name in _MORPHOLOGY:
        if name in sdata.images:
            return name, False
    msg = (
        f"No H&E or morphology image in `sdata.images` (found {sorted(sdata.images)}); read the aligned H&E with "
        "`stpred.io.read_xenium(path, he_image_file=..., alignment_file=...)` or pass `image_key=`."
    )
    raise KeyError(msg)


def _scale0(image: Any) -> Any:
    from xarray import DataTree

    if isinstance(image, DataTree):
        return next(iter(image["scale0"].values()))
    return image


def _rgb_uint8(level: Any, name: str) -> Any:
    """The image as lazy ``uint8`` RGB ``(3, y, x)``: RGB(A) kept, other images' first channel as grey levels."""
    import dask.array as da

    data = level.data if isinstance(level.data, da.Array) else da.from_array(np.asarray(level.data))
    if data.dtype == np.uint8 and data.shape[0] in (3, 4):
        return data[:3]
    warnings.warn(
        f"The image {name!r} is not an 8-bit RGB H&E image (shape {tuple(data.shape)}, {data.dtype}); its first "
        "channel is rescaled to 8-bit grey levels (0.5–99.5 percentiles) and repeated as RGB. Models trained on H&E "
        "do not transfer to fluorescence; pass the aligned H&E image for prediction.",
        UserWarning,
        stacklevel=3,
    )
    channel = data[0]
    step = max(1, int(max(channel.shape) // 1024))
    sample = np.asarray(channel[::step, ::step].compute(), dtype=np.float64)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    span = max(hi - lo, 1e-12)
    grey = da.clip((channel.astype(np.float32) - lo) / span * 255.0, 0, 255).astype(np.uint8)
    return da.stack([grey, grey, grey])


def _image_element(data: Any, section: str) -> Any:
    """Parse lazy ``(3, y, x)`` uint8 pixels as the multiscale image element of ``section``."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    from ._legacy_st import IMAGE_CHUNKS, _scale_factors

    data = da.asarray(data)
    return Image2DModel.parse(
        data.rechunk(IMAGE_CHUNKS),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=_scale_factors(data.shape),
        chunks=IMAGE_CHUNKS,
        transformations={section: Identity()},
    )


def _to_image_matrix(image: Any, name: str) -> np.ndarray:
    """3×3 affine matrix from morphology pixels (``"global"``) to pixels of the image's full-resolution level."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(_scale0(image), get_all=True)
    if _GLOBAL not in transforms:
        msg = (
            f"The image {name!r} has no transformation to the Xenium coordinate system {_GLOBAL!r} (found "
            f"{sorted(transforms)}); read it with `spatialdata_io.xenium_aligned_image(image, alignment_csv)`."
        )
        raise ValueError(msg)
    matrix = transforms[_GLOBAL].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return np.linalg.inv(np.asarray(matrix, dtype=np.float64))


def _pool(X: Any, codes: np.ndarray, n_spots: int) -> Any:
    """Sum the rows of ``X`` (cells) into ``n_spots`` rows by ``codes``: one sparse product, CSR ``float32``."""
    from scipy import sparse

    n_cells = len(codes)
    assign = sparse.csr_matrix(
        (np.ones(n_cells, dtype=np.float32), (codes, np.arange(n_cells))), shape=(n_spots, n_cells)
    )
    X = X if sparse.issparse(X) else sparse.csr_matrix(np.asarray(X))
    return sparse.csr_matrix(assign @ X, dtype=np.float32)


def xenium_pseudospots(
    sdata: SpatialData,
    *,
    spot_size_um: float = 100.0,
    section: str = "xenium",
    patient: str | None = None,
    table_key: str = "table",
    image_key: str | None = None,
    pixel_size_um: float | None = None,
    min_cells: int = 1,
) -> SpatialData:
    """Pool the cells of a Xenium object into square pseudo-spots on its H&E image, in the stpred contract.

    The tissue is cut into a grid of squares of ``spot_size_um`` microns starting at the lowest cell centroid (the
    pseudo-spots of HEST, Jaume et al. 2024, use 100 µm); each cell goes to the square holding its centroid and the
    counts of a square are the sums over its cells (one sparse product of the cell → square assignment with the
    count matrix, so memory stays proportional to the number of non-zero counts). Squares with fewer than
    ``min_cells`` cells are dropped.

    The squares are placed on the image through the transformations spatialdata-io sets: cell centroids in microns
    → morphology pixels (``÷ pixel_size_um``, the ``"global"`` coordinate system) → image pixels through the
    inverse of the image's transformation to ``"global"`` (for the H&E read with its alignment CSV, the alignment
    matrix). Squares whose centre falls outside the image are dropped with a warning. Without an H&E image the
    morphology image is used, converted to 8-bit grey (with a warning: H&E models do not transfer to it).

    The user's object is not changed; a new SpatialData in the stpred contract is returned.

    Parameters
    ----------
    sdata
        SpatialData as :func:`spatialdata_io.xenium` returns it: the cell table (``obsm["spatial"]`` or
        ``obs["x_centroid"]``/``obs["y_centroid"]`` in microns) and the image (``"he_image"`` with its alignment,
        else ``"morphology_focus"``).
    spot_size_um
        Side of the pseudo-spots in microns.
    section
        Section name of the result (element prefix and coordinate system).
    patient
        Patient (donor) of the section; defaults to ``section``.
    table_key
        The cell table.
    image_key
        Image to place the spots on; default ``"he_image"``, else the morphology image.
    pixel_size_um
        Microns per morphology pixel (``pixel_size`` in ``experiment.xenium``, 0.2125 for Xenium); by default read
        from the scale of the cell shapes (``"cell_circles"`` or ``"cell_boundaries"``).
    min_cells
        Smallest number of cells a pseudo-spot must hold.

    Returns
    -------
    SpatialData with the image ``"{section}_hne"``, the circles ``"{section}_spots"`` (radius ``spot_size_um / 2``
    in image pixels; the spots are squares, recorded in ``uns["stpred"]["spot_shape"]``) and the raw-count table
    ``"table"`` (``obs_names`` ``"{section}_{ix}x{iy}"``, ``array_x``/``array_y`` the grid indices,
    ``obs["n_cells"]``; ``technology = "xenium"``, ``pitch_um = spot_diameter_um = spot_size_um``,
    ``uns["stpred"]["image"]`` the image used).

    Examples
    --------
    >>> import spatialdata_io, stpred
    >>> cells = spatialdata_io.xenium("outs/", cells_labels=False, nucleus_labels=False)  # doctest: +SKIP
    >>> sdata = stpred.io.xenium_pseudospots(cells, spot_size_um=100, section="X1")  # doctest: +SKIP
    """
    from .._validate import get_table
    from ._legacy_st import _section_sdata, _section_table, _spot_circles
    from ._visium import _section_name

    if isinstance(spot_size_um, bool) or not isinstance(spot_size_um, int | float | np.number) or spot_size_um <= 0:
        msg = f"Expected `spot_size_um` to be a positive number of microns, found {spot_size_um!r}."
        raise ValueError(msg)
    if isinstance(min_cells, bool) or not isinstance(min_cells, int | np.integer) or min_cells < 1:
        msg = f"Expected `min_cells` to be a positive int, found {min_cells!r}."
        raise ValueError(msg)
    section = _section_name(section)
    patient = section if patient is None else str(patient)
    table = get_table(sdata, table_key)
    xy_um = _centroids_um(table, table_key)
    if pixel_size_um is None:
        pixel_size_um = _pixel_size_um(sdata)
        if pixel_size_um is None:
            msg = (
                "Cannot tell the microns per morphology pixel: no cell shapes "
                f"{list(_CELL_SHAPES)} with a scale to {_GLOBAL!r}. Pass `pixel_size_um=` (`pixel_size` in "
                "experiment.xenium; 0.2125 for Xenium)."
            )
            raise ValueError(msg)
    elif not pixel_size_um > 0:
        msg = f"Expected `pixel_size_um` to be positive, found {pixel_size_um!r}."
        raise ValueError(msg)
    name, is_he = _choose_image(sdata, image_key)
    image = sdata.images[name]
    to_image = _to_image_matrix(image, name)
    level = _scale0(image)
    pixels = _rgb_uint8(level, name) if not is_he else level.data
    if is_he and (pixels.dtype != np.uint8 or pixels.shape[0] not in (3, 4)):
        msg = f"The image {name!r} has shape {tuple(pixels.shape)} and type {pixels.dtype}; expected RGB uint8."
        raise ValueError(msg)
    pixels = pixels[:3]

    size = float(spot_size_um)
    origin = xy_um.min(axis=0)
    grid = np.floor((xy_um - origin) / size).astype(np.int64)
    cells_grid, codes = np.unique(grid, axis=0, return_inverse=True)
    codes = codes.ravel()
    n_cells = np.bincount(codes, minlength=len(cells_grid))
    centres_um = origin + (cells_grid + 0.5) * size
    centres_px = (centres_um / pixel_size_um) @ to_image[:2, :2].T + to_image[:2, 2]
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    inside = (centres_px[:, 0] >= 0) & (centres_px[:, 0] < width) & (centres_px[:, 1] >= 0) & (centres_px[:, 1] < height)
    keep = (n_cells >= min_cells) & inside
    if (~inside).any():
        warnings.warn(
            f"{int((~inside).sum())} of {len(inside)} pseudo-spots lie outside the image {name!r} "
            f"({width}×{height} px) and are dropped; check the alignment if that is unexpected.",
            UserWarning,
            stacklevel=2,
        )
    if not keep.any():
        msg = (
            f"No pseudo-spot is left: {len(cells_grid)} squares of {size:g} µm, none inside the image {name!r} "
            f"with at least {min_cells} cell(s). Check the alignment of the image and `min_cells`."
        )
        raise ValueError(msg)
    remap = np.full(len(cells_grid), -1, dtype=np.int64)
    remap[keep] = np.arange(int(keep.sum()))
    kept_cells = remap[codes] >= 0
    X = table.X if kept_cells.all() else table.X[kept_cells]
    counts = _pool(X, remap[codes][kept_cells], int(keep.sum()))

    # microns per image pixel: morphology pixel size times the image pixel's size in morphology pixels
    mpp = pixel_size_um / np.sqrt(abs(np.linalg.det(to_image[:2, :2])))
    array_xy = cells_grid[keep]
    pixel_xy = centres_px[keep]
    out = _section_table(
        counts,
        table.var_names.astype(str).tolist(),
        spots=[f"{x}x{y}" for x, y in array_xy],
        array_xy=array_xy,
        pixel_xy=pixel_xy,
        section=section,
        patient=patient,
        mpp=mpp,
        spot_diameter_um=size,
        pitch_um=size,
        technology="xenium",
    )
    for column in table.var.columns:
        out.var[column] = table.var[column].to_numpy()
    out.obs["n_cells"] = n_cells[keep].astype(np.int64)
    out.uns["stpred"]["image"] = {section: name}
    out.uns["stpred"]["spot_shape"] = {section: "square"}
    circles = _spot_circles(pixel_xy, size / mpp / 2.0, section)
    logger.info("Pooled %d cells into %d pseudo-spots of %g µm.", int(kept_cells.sum()), int(keep.sum()), size)
    return _section_sdata(section, _image_element(pixels, section), circles, out)


def _spatialdata_io_xenium(spatialdata_io: Any, root: Path, *, aligned_images: bool) -> SpatialData:
    """The cell table, the morphology image and (optionally) the aligned images, nothing else."""
    return spatialdata_io.xenium(
        root,
        cells_boundaries=False,
        nucleus_boundaries=False,
        cells_as_circles=False,
        cells_labels=False,
        nucleus_labels=False,
        transcripts=False,
        morphology_mip=False,
        morphology_focus=True,
        aligned_images=aligned_images,
        cells_table=True,
    )


def read_xenium(
    path: str | os.PathLike,
    *,
    spot_size_um: float = 100.0,
    section: str | None = None,
    patient: str | None = None,
    he_image_file: str | os.PathLike | None = None,
    alignment_file: str | os.PathLike | None = None,
    min_cells: int = 1,
) -> SpatialData:
    """Read a Xenium output folder and pool its cells into square pseudo-spots on the H&E image.

    The cell table is read by :func:`spatialdata_io.xenium` (without transcripts, boundaries or label rasters);
    the aligned H&E image is ``he_image_file`` with its ``alignment_file`` (the CSV that Xenium Explorer's image
    alignment writes, mapping H&E pixels to morphology pixels), read by :func:`spatialdata_io.xenium_aligned_image`;
    without them, an ``*he_image.ome.tif`` (and its ``*he_imagealignment.csv``, the names 10x uses) in ``path`` is
    found by spatialdata-io, else the morphology image is used. The pooling is :func:`stpred.io.xenium_pseudospots`.

    Parameters
    ----------
    path
        Xenium output folder (``experiment.xenium``, ``cell_feature_matrix.h5``, ``cells.parquet``,
        ``cells.zarr.zip``, ``morphology_focus/``).
    spot_size_um
        Side of the pseudo-spots in microns (100 as in HEST).
    section
        Section name; defaults to the folder name.
    patient
        Patient (donor) of the section; defaults to ``section``.
    he_image_file
        H&E image of the same section (OME-TIFF or TIFF); a relative path is taken relative to ``path``.
    alignment_file
        3×3 alignment matrix CSV of ``he_image_file`` (H&E pixels → morphology pixels); without it the H&E is
        assumed to be registered to the morphology image already.
    min_cells
        Smallest number of cells a pseudo-spot must hold.

    Returns
    -------
    SpatialData in the stpred contract; see :func:`stpred.io.xenium_pseudospots`.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.io.read_xenium(
    ...     "outs/", he_image_file="he.ome.tif", alignment_file="he_alignment.csv", spot_size_um=100
    ... )  # doctest: +SKIP
    """
    import spatialdata_io

    from ._legacy_st import _check_file
    from ._visium import _section_name

    root = Path(path)
    if not root.is_dir():
        msg = f"The Xenium folder {str(root)!r} does not exist; pass the Xenium output folder."
        raise FileNotFoundError(msg)
    specs_path = root / "experiment.xenium"
    if not specs_path.is_file():
        msg = f"No 'experiment.xenium' in {str(root)!r}; is it a Xenium output folder?"
        raise FileNotFoundError(msg)
    section = _section_name(section, root=root)
    specs = json.loads(specs_path.read_text())
    if "pixel_size" not in specs:
        msg = f"{str(specs_path)!r} lacks 'pixel_size'; found {sorted(specs)}."
        raise ValueError(msg)

    def resolve(file: str | os.PathLike, what: str) -> Path:
        p = Path(file)
        return _check_file(p if p.is_absolute() else root / p, what)

    he_path = None if he_image_file is None else resolve(he_image_file, "H&E image")
    alignment_path = None if alignment_file is None else resolve(alignment_file, "alignment")
    if alignment_path is not None and he_path is None:
        msg = "`alignment_file` aligns `he_image_file`; pass both."
        raise ValueError(msg)
    with warnings.catch_warnings():
        # the table names the cell labels as its region; stpred does not read them (it needs the centroids only)
        warnings.filterwarnings("ignore", message="The table is annotating 'cell_labels'", category=UserWarning)
        sdata = _spatialdata_io_xenium(spatialdata_io, root, aligned_images=he_path is None)
    if he_path is not None:
        sdata.images[_HE_IMAGE] = spatialdata_io.xenium_aligned_image(he_path, alignment_path)
    elif _HE_IMAGE in sdata.images and not any(root.glob("*he_image*alignment*.csv")):
        warnings.warn(
            f"Found an H&E image in {str(root)!r} but no alignment CSV ('*he_imagealignment.csv'); the H&E is assumed "
            "to be registered to the morphology image. Pass `alignment_file=` if it is not.",
            UserWarning,
            stacklevel=2,
        )
    return xenium_pseudospots(
        sdata,
        spot_size_um=spot_size_um,
        section=section,
        patient=patient,
        pixel_size_um=float(specs["pixel_size"]),
        min_cells=min_cells,
    )
