"""Section names, codes and rows of a table: one definition of "the sections, in order" for every module."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._constants import SECTION_KEY

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData


def _section_column(table: AnnData) -> pd.Series:
    if SECTION_KEY not in table.obs:
        msg = (
            f"The table has no `obs[{SECTION_KEY!r}]` column; found {list(table.obs.columns)}. "
            "Read the data with an `stpred.io` reader."
        )
        raise KeyError(msg)
    return table.obs[SECTION_KEY]


def section_names(table: AnnData) -> list[str]:
    """Sections of ``table`` in a stable order: category order when categorical, else first appearance.

    Only sections with at least one row are listed.
    """
    col = _section_column(table)
    present = pd.unique(col.astype(str))
    if isinstance(col.dtype, pd.CategoricalDtype):
        kept = set(present)
        return [str(c) for c in col.cat.categories if str(c) in kept]
    return [str(s) for s in present]


def section_codes(table: AnnData) -> tuple[np.ndarray, list[str]]:
    """Integer section index of every row (position in :func:`section_names`), and those names."""
    names = section_names(table)
    lookup = {s: i for i, s in enumerate(names)}
    labels = _section_column(table).astype(str).to_numpy()
    return np.array([lookup[s] for s in labels], dtype=np.int64), names


def rows_of(table: AnnData, sections: Sequence[str]) -> dict[str, np.ndarray]:
    """Row indices of each of ``sections``, in table order."""
    labels = _section_column(table).astype(str).to_numpy()
    return {s: np.flatnonzero(labels == s) for s in sections}
