"""scanpy's ``copy=`` / ``inplace=`` convention for the ``pp`` functions that write into a SpatialData object."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spatialdata import SpatialData


def check_copy_inplace(*, copy: bool, inplace: bool) -> None:
    """Refuse ``copy=True`` together with ``inplace=False`` (as :func:`scanpy.pp.normalize_total` does)."""
    for name, value in (("copy", copy), ("inplace", inplace)):
        if not isinstance(value, bool):
            msg = f"Expected `{name}` to be True or False, found {value!r}."
            raise TypeError(msg)
    if copy and not inplace:
        msg = "`copy=True` cannot be combined with `inplace=False`: pass one of them."
        raise ValueError(msg)


def table_copy(sdata: SpatialData) -> SpatialData:
    """A new SpatialData with copies of the tables of ``sdata`` and the same (shared, unmodified) other elements.

    Images, labels, points and shapes are not copied: stpred's ``pp`` functions only add or replace tables and
    table layers, so sharing them keeps the user's object unchanged while avoiding a copy of the images.
    """
    from spatialdata import SpatialData

    return SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes=dict(sdata.shapes),
        tables={k: v.copy() for k, v in sdata.tables.items()},
        attrs=dict(sdata.attrs),
    )
