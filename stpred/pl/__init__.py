"""Plots (matplotlib): measured vs predicted maps, scores, loss curves, domains, tiles over tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import attach

_NAMES = {
    "spatial": "_spatial",
    "scores": "_scores",
    "gene_scores": "_scores",
    "history": "_history",
    "domains": "_domains",
    "tissue": "_tissue",
}
__getattr__, __dir__, __all__ = attach(__name__, _NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from ._domains import domains
    from ._history import history
    from ._scores import gene_scores, scores
    from ._spatial import spatial
    from ._tissue import tissue
