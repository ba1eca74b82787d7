"""The resolution levels of a SpatialData image element: one definition for io, pp and pl."""

from __future__ import annotations

from typing import Any


def pyramid_levels(image: Any) -> list[Any]:
    """The levels of an image element, finest first, as ``(c, y, x)`` :class:`xarray.DataArray`.

    A multiscale image (:class:`xarray.DataTree`) gives its pyramid; a single-scale image is its only level.
    """
    from xarray import DataTree

    if isinstance(image, DataTree):
        from spatialdata import get_pyramid_levels

        return list(get_pyramid_levels(image))
    return [image]
