"""Readers that return a SpatialData object in the stpred contract."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import attach

_NAMES = {
    "adopt": "_adopt",
    "Layout": "_adopt",
    "SectionLayout": "_adopt",
    "read_legacy_st": "_legacy_st",
    "concat": "_concat",
    "read_visium": "_visium",
    "read_visium_hd": "_visium_hd",
    "read_xenium": "_xenium",
    "xenium_pseudospots": "_xenium",
}
__getattr__, __dir__, __all__ = attach(__name__, _NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from ._adopt import Layout, SectionLayout, adopt
    from ._concat import concat
    from ._legacy_st import read_legacy_st
    from ._visium import read_visium
    from ._visium_hd import read_visium_hd
    from ._xenium import read_xenium, xenium_pseudospots
