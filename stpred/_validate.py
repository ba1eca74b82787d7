"""Input checks shared by every public function; each error names the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ._constants import STPRED_TABLE

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


_AUTO = "auto"


def get_table(sdata: SpatialData, key: str, *, made_by: str | None = _AUTO) -> AnnData:
    """Return ``sdata.tables[key]`` or raise a :class:`KeyError` naming the call that creates it.

    ``made_by="auto"`` names :func:`stpred.pp.select_genes` for the ``stpred`` table and nothing for others.
    """
    if made_by == _AUTO:
        made_by = "pp.select_genes" if key == STPRED_TABLE else None
    tables = getattr(sdata, "tables", None)
    if tables is None:
        msg = f"Expected a SpatialData object, found {type(sdata).__name__}."
        raise TypeError(msg)
    if key not in tables:
        msg = f"No table {key!r} in `sdata.tables`; found {sorted(tables)}."
        if made_by is not None:
            msg += f" Run `stpred.{made_by}(sdata)` first."
        raise KeyError(msg)
    return tables[key]


def check_one_of(value: Any, allowed: Iterable[Any], *, name: str) -> None:
    """Raise a :class:`ValueError` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        msg = f"Unknown {name} {value!r}; expected one of {allowed}."
        raise ValueError(msg)


def check_positive(value: float, *, name: str, strict: bool = True) -> None:
    """Raise a :class:`ValueError` unless ``value`` is positive (or non-negative when ``strict=False``)."""
    bad = value <= 0 if strict else value < 0
    if bad:
        kind = "positive" if strict else "non-negative"
        msg = f"Expected `{name}` to be {kind}, found {value!r}."
        raise ValueError(msg)


def check_sections(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Resolve a list of section names (``None`` = all) and reject unknown ones."""
    available = list(available)
    if requested is None:
        return available
    if isinstance(requested, str):
        requested = [requested]
    unknown = [s for s in requested if s not in available]
    if unknown:
        msg = f"Unknown section(s) {unknown}; the data has {available}."
        raise ValueError(msg)
    if len(requested) == 0:
        msg = "Expected at least one section, found an empty list."
        raise ValueError(msg)
    return list(requested)
