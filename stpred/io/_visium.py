"""Thin adapter from :func:`spatialdata_io.visium` to the stpred contract."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM

if TYPE_CHECKING:
    import os

    from spatialdata import SpatialData

_VALID_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _section_name(section: object, *, root: Path | None = None) -> str:
    """``section``, or the name of the instrument folder ``root`` when ``section`` is None, checked as an element-name part."""
    if section is None and root is not None:
        section = root.resolve().name
    if not isinstance(section, str) or not _VALID_NAME.match(section):
        msg = f"Invalid section name {section!r}: use letters, digits, '_', '-' or '.' only (pass `section=`)."
        raise ValueError(msg)
    return section
_SCALEFACTORS = "spatial/scalefactors_json.json"
_H5 = "filtered_feature_bc_matrix.h5"
_MTX_DIR = "filtered_feature_bc_matrix"
_MTX_FILES = ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz")
_POSITIONS = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv")
#: Space Ranger's downsampled images, finest first, with the scale factor that maps full-resolution pixels to them.
_DOWNSAMPLED = (
    ("hires", "spatial/tissue_hires_image.png", "tissue_hires_scalef"),
    ("lowres", "spatial/tissue_lowres_image.png", "tissue_lowres_scalef"),
)


def _counts_file(root: Path) -> str:
    """The counts file to read: ``(<prefix>_)filtered_feature_bc_matrix.h5``, else the mtx folder."""
    h5 = sorted(root.glob(f"*{_H5}"))
    if h5:
        return _H5  # spatialdata-io finds a ``<library_id>_`` prefix itself
    folder = root / _MTX_DIR
    if folder.is_dir():
        missing = [f for f in _MTX_FILES if not (folder / f).is_file()]
        if missing:
            msg = (
                f"The Visium matrix folder {str(folder)!r} lacks {missing}; Space Ranger writes {list(_MTX_FILES)} "
                f"there (or use the single file {_H5!r})."
            )
            raise FileNotFoundError(msg)
        return f"{_MTX_DIR}/{_MTX_FILES[0]}"
    msg = (
        f"No counts found in the Visium folder {str(root)!r}: looked for {_H5!r} (optionally prefixed "
        f"'<sample>_') and the folder '{_MTX_DIR}/' with {list(_MTX_FILES)}. Pass the Space Ranger `outs/` folder."
    )
    raise FileNotFoundError(msg)


def _check_positions(root: Path) -> None:
    if not any((root / name).is_file() for name in _POSITIONS):
        msg = f"No spot positions in the Visium folder {str(root)!r}: looked for {list(_POSITIONS)}."
        raise FileNotFoundError(msg)


def read_visium(
    path: str | os.PathLike,
    *,
    section: str | None = None,
    patient: str | None = None,
    fullres_image_file: str | os.PathLike | None = None,
) -> SpatialData:
    """Read one 10x Visium section (Space Ranger output) into the stpred contract.

    Counts, spot positions and the downsampled images are read by :func:`spatialdata_io.visium`; this function
    renames the elements, adds the stpred annotations and keeps one image per section:

    - with ``fullres_image_file`` (the microscope image given to Space Ranger), that image becomes
      ``"{section}_hne"`` and spot positions are in its pixels, as Space Ranger writes them;
    - without it, the **hires** image (``spatial/tissue_hires_image.png``), or when that is missing the **lowres**
      one, becomes ``"{section}_hne"`` and the spot centres, radii and the microns per pixel are rescaled to its
      pixels (``× tissue_hires_scalef`` or ``× tissue_lowres_scalef`` from ``scalefactors_json.json``), so that,
      as for every stpred section, the image has an ``Identity`` transform and ``obsm["spatial"]`` is in the pixels
      of the section's image. Patch sizes in pixels then refer to that (coarser) image; use
      ``pp.extract_patches(..., mpp=...)`` to crop at a fixed physical resolution. The image used is recorded in
      ``uns["stpred"]["image"][section]`` (``"fullres"``, ``"hires"`` or ``"lowres"``).

    The counts come from ``filtered_feature_bc_matrix.h5`` (optionally prefixed ``<sample>_``) or, when there is
    none, from the ``filtered_feature_bc_matrix/`` folder (``matrix.mtx.gz``, ``features.tsv.gz``,
    ``barcodes.tsv.gz``); only "Gene Expression" features are kept. Gene **symbols** are the ``var_names`` and
    the Ensembl ids are kept in ``var["gene_ids"]``; symbols shared by several ids are made unique
    deterministically in file order (``"GENE"``, ``"GENE-1"``, ...; :meth:`anndata.AnnData.var_names_make_unique`).

    The microns per pixel are ``55 / spot_diameter_fullres`` (Visium spots are 55 µm wide, 100 µm apart).

    Parameters
    ----------
    path
        Space Ranger output folder (``outs/``) with ``filtered_feature_bc_matrix.h5`` or
        ``filtered_feature_bc_matrix/`` and ``spatial/`` (``tissue_positions.csv`` or
        ``tissue_positions_list.csv``, ``scalefactors_json.json``, ``tissue_hires_image.png`` and/or
        ``tissue_lowres_image.png``).
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
    section = _section_name(section, root=root)
    patient = section if patient is None else str(patient)
    counts_file = _counts_file(root)
    _check_positions(root)
    scalefactors_path = root / _SCALEFACTORS
    if not scalefactors_path.is_file():
        msg = f"No scale factors in the Visium folder {str(root)!r}: looked for {_SCALEFACTORS!r}."
        raise FileNotFoundError(msg)
    scalefactors = json.loads(scalefactors_path.read_text())
    if "spot_diameter_fullres" not in scalefactors:
        msg = f"{str(scalefactors_path)!r} lacks ['spot_diameter_fullres']; found {sorted(scalefactors)}. Is it Space Ranger output?"
        raise ValueError(msg)
    image_path = None
    downsampled = None
    if fullres_image_file is not None:
        image_path = Path(fullres_image_file)
        image_path = _check_file(image_path if image_path.is_absolute() else root / image_path, "image")
    else:
        present = [d for d in _DOWNSAMPLED if (root / d[1]).is_file()]
        if not present:
            msg = (
                f"No image in the Visium folder {str(root)!r}: looked for {[d[1] for d in _DOWNSAMPLED]}; pass the "
                "full-resolution microscope image as `fullres_image_file=`."
            )
            raise FileNotFoundError(msg)
        downsampled = present[0]
        if downsampled[2] not in scalefactors:
            msg = (
                f"{str(scalefactors_path)!r} lacks [{downsampled[2]!r}] needed to place the spots on "
                f"{downsampled[1]!r}; found {sorted(scalefactors)}. Is it Space Ranger output?"
            )
            raise ValueError(msg)

    with warnings.catch_warnings():
        # spatialdata-io makes duplicated gene names unique itself; anndata warns first
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        raw = spatialdata_io.visium(root, dataset_id=section, counts_file=counts_file)
    table = raw.tables["table"]
    pixel_xy = np.asarray(table.obsm["spatial"], dtype=np.float64)  # full-resolution pixels (x, y)
    barcodes = table.obs_names.astype(str)
    diameter_px = float(scalefactors["spot_diameter_fullres"])
    if image_path is not None:
        _check_image(image_path, pixel_xy, barcodes)
        pixels = _read_rgb(image_path)
        scale = 1.0
        image_used = "fullres"
    else:
        image_used, _, scale_key = downsampled
        scale = float(scalefactors[scale_key])
        element = raw.images[f"{section}_{image_used}_image"]
        pixels = np.asarray(element.data.compute() if hasattr(element.data, "compute") else element.data)
        if pixels.dtype != np.uint8 or pixels.shape[0] < 3:
            msg = (
                f"The {image_used} image of {str(root)!r} has shape {pixels.shape} and type {pixels.dtype}; "
                "expected RGB uint8."
            )
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
    out.uns["stpred"]["image"] = {section: image_used}
    circles = _spot_circles(pixel_xy, diameter_px * scale / 2.0, section)
    return _section_sdata(section, _hne_image(pixels, section), circles, out)
