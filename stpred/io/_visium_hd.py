"""Visium HD square bins as prediction units, from :func:`spatialdata_io.visium_hd`."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import os

    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_BIN_DIR = re.compile(r"^square_(\d{3})um$")
_BINNED = "binned_outputs"


def _bin_folders(root: Path) -> dict[int, Path]:
    """Bin size (µm) → its folder, under ``binned_outputs/`` or directly in ``root``."""
    base = root / _BINNED if (root / _BINNED).is_dir() else root
    found = {}
    for child in sorted(base.iterdir()):
        match = _BIN_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return found


def _check_bin_folder(folder: Path) -> dict[str, Any]:
    """Scale factors of one bin folder; a :class:`FileNotFoundError` naming what is missing."""
    needed = ("filtered_feature_bc_matrix.h5", "spatial/tissue_positions.parquet", "spatial/scalefactors_json.json")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        msg = f"The Visium HD bin folder {str(folder)!r} lacks {missing}; Space Ranger writes {list(needed)} there."
        raise FileNotFoundError(msg)
    scalefactors = json.loads((folder / "spatial/scalefactors_json.json").read_text())
    keys = ("microns_per_pixel", "bin_size_um")
    absent = [k for k in keys if k not in scalefactors]
    if absent:
        msg = f"{str(folder / 'spatial/scalefactors_json.json')!r} lacks {absent}; found {sorted(scalefactors)}."
        raise ValueError(msg)
    return scalefactors


def read_visium_hd(
    path: str | os.PathLike,
    *,
    bin_size: int = 8,
    section: str | None = None,
    patient: str | None = None,
    fullres_image_file: str | os.PathLike | None = None,
) -> SpatialData:
    """Read the bins of one size of a Visium HD run as the spots of an stpred section.

    Counts and bin positions are read by :func:`spatialdata_io.visium_hd` (only the requested bin size). Each bin
    becomes one prediction unit: a square of ``bin_size`` µm, stored as a circle of radius ``bin_size / 2`` µm (in
    image pixels) around the bin centre, with ``spot_diameter_um = pitch_um = bin_size`` and
    ``uns["stpred"]["spot_shape"] = "square"``. Patch sizes are chosen in :func:`stpred.pp.extract_patches`
    (``mpp=`` crops a fixed physical field whatever the image); a 224 px crop at 0.5 µm/px covers 112 µm around
    an 8 µm bin, i.e. its neighbourhood, as for Visium spots.

    The image is the full-resolution microscope image when spatialdata-io finds one (``microscope_image/`` or
    ``fullres_image_file``), kept lazy (never loaded whole), else the hires, else the lowres image with the bin
    centres rescaled to it (as :func:`stpred.io.read_visium`); ``uns["stpred"]["image"]`` records which.
    Microns per pixel come from ``microns_per_pixel`` of the bin folder's ``scalefactors_json.json``.

    Counts stay sparse (CSR ``float32``); a whole slide of 8 µm bins (~500,000 bins × 18,000 genes) takes a few
    GB, dominated by the non-zero counts. Gene symbols are the ``var_names`` (``var["gene_ids"]`` keeps the ids;
    repeated symbols are made unique in file order, ``"GENE-1"``).

    Parameters
    ----------
    path
        Space Ranger output folder of a Visium HD run (``binned_outputs/square_008um/``, ``spatial/``,
        ``feature_slice.h5``, optionally ``microscope_image/``).
    bin_size
        Bin side in µm; one of the ``square_XXXum`` folders (usually 2, 8 and 16).
    section
        Section name; defaults to the folder name.
    patient
        Patient (donor) of the section; defaults to ``section``.
    fullres_image_file
        Full-resolution H&E image, when it is not in ``microscope_image/``; a relative path is taken relative
        to ``path``.

    Returns
    -------
    SpatialData with the image ``"{section}_hne"``, the circles ``"{section}_spots"`` and the raw-count table
    ``"table"`` (``obs_names`` ``"{section}_{barcode}"``, ``array_x`` = ``array_col``, ``array_y`` = ``array_row``,
    ``technology = "visium_hd"``).

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.io.read_visium_hd("outs/", bin_size=16, section="HD1")  # doctest: +SKIP
    """
    import spatialdata_io

    from ._legacy_st import _check_file
    from ._visium import _section_name

    root = Path(path)
    if not root.is_dir():
        msg = f"The Visium HD folder {str(root)!r} does not exist; pass the Space Ranger output folder (`outs/`)."
        raise FileNotFoundError(msg)
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | np.integer):
        msg = f"Expected `bin_size` to be an int (µm), found {bin_size!r}."
        raise TypeError(msg)
    section = _section_name(section, root=root)
    patient = section if patient is None else str(patient)
    folders = _bin_folders(root)
    if not folders:
        msg = f"No bin folders (`binned_outputs/square_XXXum/`) in {str(root)!r}; is it Visium HD output?"
        raise FileNotFoundError(msg)
    if int(bin_size) not in folders:
        msg = (
            f"No {int(bin_size)} µm bins in {str(root)!r}: the run has bin sizes {sorted(folders)} µm. "
            f"Pass one of them as `bin_size=`."
        )
        raise ValueError(msg)
    scalefactors = _check_bin_folder(folders[int(bin_size)])
    fullres = None
    if fullres_image_file is not None:
        fullres = Path(fullres_image_file)
        fullres = _check_file(fullres if fullres.is_absolute() else root / fullres, "image")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No full resolution image found", category=UserWarning)
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        raw = spatialdata_io.visium_hd(
            root,
            dataset_id=section,
            bin_size=int(bin_size),
            load_segmentations_only=False,
            bins_as_squares=False,
            fullres_image_file=fullres,
        )
    return hd_section(raw, bin_size=int(bin_size), section=section, patient=patient, scalefactors=scalefactors)


def hd_section(
    raw: SpatialData, *, bin_size: int, section: str, patient: str, scalefactors: dict[str, Any]
) -> SpatialData:
    """Convert the ``spatialdata_io.visium_hd`` elements of one bin size into an stpred section."""
    from scipy import sparse

    from ._legacy_st import _section_sdata, _section_table, _spot_circles
    from ._xenium import _image_element, _scale0

    table_name = f"square_{bin_size:03d}um"
    table = raw.tables[table_name]
    pixel_xy = np.asarray(table.obsm["spatial"], dtype=np.float64)  # full-resolution pixels (x, y)
    choices = (
        ("fullres", f"{section}_full_image", 1.0),
        ("hires", f"{section}_hires_image", scalefactors.get("tissue_hires_scalef")),
        ("lowres", f"{section}_lowres_image", scalefactors.get("tissue_lowres_scalef")),
    )
    available = [(kind, name, scale) for kind, name, scale in choices if name in raw.images and scale is not None]
    if not available:
        msg = (
            f"No image for the Visium HD section {section!r}: looked for the microscope image "
            "(`microscope_image/` or `fullres_image_file=`) and `spatial/tissue_hires_image.png`, "
            "`spatial/tissue_lowres_image.png` with their scale factors."
        )
        raise FileNotFoundError(msg)
    kind, name, scale = available[0]
    pixels = _scale0(raw.images[name]).data
    if pixels.dtype != np.uint8 or pixels.shape[0] not in (3, 4):
        msg = f"The {kind} image of {section!r} has shape {tuple(pixels.shape)} and type {pixels.dtype}; expected RGB uint8."
        raise ValueError(msg)
    pixels = pixels[:3]
    scale = float(scale)
    pixel_xy = pixel_xy * scale
    mpp = float(scalefactors["microns_per_pixel"]) / scale
    obs = table.obs
    counts = table.X if sparse.isspmatrix_csr(table.X) and table.X.dtype == np.float32 else sparse.csr_matrix(table.X, dtype=np.float32)
    out = _section_table(
        counts,
        table.var_names.tolist(),
        spots=table.obs_names.astype(str),
        array_xy=np.c_[obs["array_col"].to_numpy(), obs["array_row"].to_numpy()],
        pixel_xy=pixel_xy,
        section=section,
        patient=patient,
        mpp=mpp,
        spot_diameter_um=float(bin_size),
        pitch_um=float(bin_size),
        technology="visium_hd",
    )
    for column in table.var.columns:
        out.var[column] = table.var[column].to_numpy()
    out.obs["in_tissue"] = obs["in_tissue"].to_numpy()
    out.uns["stpred"]["image"] = {section: kind}
    out.uns["stpred"]["spot_shape"] = {section: "square"}
    out.uns["stpred"]["bin_size_um"] = {section: int(bin_size)}
    circles = _spot_circles(pixel_xy, bin_size / mpp / 2.0, section)
    logger.info("Read %d bins of %d µm (%s image, %.3g µm/px).", out.n_obs, bin_size, kind, mpp)
    return _section_sdata(section, _image_element(pixels, section), circles, out)
