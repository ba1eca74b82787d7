"""Reader for the legacy Spatial Transcriptomics format, plus the element builders every stpred reader shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, PATIENT_KEY, REGION_KEY, SECTION_KEY, SPATIAL_KEY, UNS_KEY, image_key, shapes_key

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr
    from anndata import AnnData
    from scipy import sparse
    from spatialdata import SpatialData

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


def _hne_image(image: np.ndarray, section: str) -> xr.DataTree:
    """Parse an RGB ``uint8`` array ``(c, y, x)`` as the multiscale image element of ``section``."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    return Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=_scale_factors(image.shape),
        chunks=IMAGE_CHUNKS,
        transformations={section: Identity()},
    )


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
