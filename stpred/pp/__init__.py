"""Preprocessing: gene selection, normalisation, patches, embeddings, lattice, tiles over tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import attach

_NAMES = {
    "select_genes": "_genes",
    "normalize": "_normalize",
    "extract_patches": "_patches",
    "PatchBank": "_patches",
    "embed": "_embed",
    "list_encoders": "_embed",
    "lattice": "_lattice",
    "tile": "_tile",
}
__getattr__, __dir__, __all__ = attach(__name__, _NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from ._embed import embed, list_encoders
    from ._genes import select_genes
    from ._lattice import lattice
    from ._normalize import normalize
    from ._patches import PatchBank, extract_patches
    from ._tile import tile
