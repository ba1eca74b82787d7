"""Data sets: the real HER2+ legacy-ST sections and a small synthetic tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import attach

_NAMES = {"her2st": "_her2st", "synthetic": "_synthetic"}
__getattr__, __dir__, __all__ = attach(__name__, _NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from ._her2st import her2st
    from ._synthetic import synthetic
