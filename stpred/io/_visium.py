"""Thin adapter from :func:`spatialdata_io.visium` to the stpred contract."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM

if TYPE_CHECKING:
    from spatialdata import SpatialData

_VALID_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SCALEFACTORS = "spatial/scalefactors_json.json"


def read_visium(
    path: str | os.PathLike,
    *,
    section: str | None = None,
    patient: str | None = None,
    fullres_image_file: str | os.PathLike | None = None,
) -> SpatialData:
    """Read one 10x Visium section (Space Ranger output) into the stpred contract.

    Counts, spot positions and the hires image are read by :func:`spatialdata_io.visium`; this function renames
    the elements, adds the stpred annotations and keeps one image per section:

    - with ``fullres_image_file`` (the microscope image given to Space Ranger), that image becomes
      ``"{section}_hne"`` and spot positions are in its pixels, as Space Ranger writes them;
    - without it, the **hires** image becomes ``"{section}_hne"`` and the spot centres, radii and the microns per
      pixel are rescaled to hires pixels (``× tissue_hires_scalef``), so that, as for every stpred section, the
      image has an ``Identity`` transform and ``obsm["spatial"]`` is in the pixels of the section's image. Patch
      sizes in pixels then refer to the (coarser) hires image; use ``pp.extract_patches(..., mpp=...)`` to crop at a
      fixed physical resolution.

    The microns per pixel are ``55 / spot_diameter_fullres`` (Visium spots are 55 µm wide, 100 µm apart).
    Duplicated gene symbols are made unique by :mod:`spatialdata_io` (``"GENE"``, ``"GENE-1"``).

    Parameters
    ----------
    path
        Space Ranger output folder with ``filtered_feature_bc_matrix.h5`` and ``spatial/``
        (``tissue_positions.csv`` or ``tissue_positions_list.csv``, ``scalefactors_json.json``,
        ``tissue_hires_image.png``, ``tissue_lowres_image.png``).
    section
        Section name (letters, digits, ``_``, ``-``, ``.``); defaults to the folder name.
    patient
        Patient (donor) of the section; defaults to ``section``.
    fullres_image_file
        Full-resolution H&E image (JPEG, PNG or TIFF, 8-bit RGB); a relative path is taken relative to ``path``.

    Returns
    -------
    SpatialData with the image ``"{section}_hne"``, the circles ``"{section}_spots"`` and the raw-count table
    ``"table"`` (``obs_names`` ``"{section}_{barcode}"``; ``array_x`` = ``array_col``, ``array_y`` = ``array_row``;
    ``technology = "visium"``).

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.io.read_visium("outs/", section="V1", fullres_image_file="image.tif")  # doctest: +SKIP
    """
    import spatialdata_io
    from scipy import sparse

    from ._legacy_st import (
        _check_file,
        _check_image,
        _hne_image,
        _read_rgb,
        _section_sdata,
        _section_table,
        _spot_circles,
    )

    root = Path(path)
    if not root.is_dir():
        msg = f"The Visium folder {str(root)!r} does not exist; pass the Space Ranger output folder (`outs/`)."
        raise FileNotFoundError(msg)
    section = root.resolve().name if section is None else section
    if not isinstance(section, str) or not _VALID_NAME.match(section):
        msg = f"Invalid section name {section!r}: use letters, digits, '_', '-' or '.' only (pass `section=`)."
        raise ValueError(msg)
    patient = section if patient is None else str(patient)
    scalefactors_path = _check_file(root / _SCALEFACTORS, "scale factors")
    scalefactors = json.loads(scalefactors_path.read_text())
    missing = [k for k in ("spot_diameter_fullres", "tissue_hires_scalef") if k not in scalefactors]
    if missing:
        msg = f"{str(scalefactors_path)!r} lacks {missing}; found {sorted(scalefactors)}. Is it Space Ranger output?"
        raise ValueError(msg)
    image_path = None
    if fullres_image_file is not None:
        image_path = Path(fullres_image_file)
        image_path = _check_file(image_path if image_path.is_absolute() else root / image_path, "image")

    with warnings.catch_warnings():
        # spatialdata-io makes duplicated gene names unique itself; anndata warns first
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        raw = spatialdata_io.visium(root, dataset_id=section)
    table = raw.tables["table"]
    pixel_xy = np.asarray(table.obsm["spatial"], dtype=np.float64)  # full-resolution pixels (x, y)
    barcodes = table.obs_names.astype(str)
    diameter_px = float(scalefactors["spot_diameter_fullres"])
    if image_path is not None:
        _check_image(image_path, pixel_xy, barcodes)
        pixels = _read_rgb(image_path)
        scale = 1.0
    else:
        scale = float(scalefactors["tissue_hires_scalef"])
        hires = raw.images[f"{section}_hires_image"]
        pixels = np.asarray(hires.data.compute() if hasattr(hires.data, "compute") else hires.data)
        if pixels.dtype != np.uint8 or pixels.shape[0] < 3:
            msg = f"The hires image of {str(root)!r} has shape {pixels.shape} and type {pixels.dtype}; expected RGB uint8."
            raise ValueError(msg)
        pixels = pixels[:3]
        pixel_xy = pixel_xy * scale
    obs = table.obs
    counts = sparse.csr_matrix(table.X, dtype=np.float32)
    out = _section_table(
        counts,
        table.var_names.tolist(),
        spots=barcodes,
        array_xy=np.c_[obs["array_col"].to_numpy(), obs["array_row"].to_numpy()],
        pixel_xy=pixel_xy,
        section=section,
        patient=patient,
        mpp=VISIUM_SPOT_DIAMETER_UM / (diameter_px * scale),
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        pitch_um=VISIUM_PITCH_UM,
        technology="visium",
    )
    for column in table.var.columns:
        out.var[column] = table.var[column].to_numpy()
    out.obs["in_tissue"] = obs["in_tissue"].to_numpy()
    circles = _spot_circles(pixel_xy, diameter_px * scale / 2.0, section)
    return _section_sdata(section, _hne_image(pixels, section), circles, out)
