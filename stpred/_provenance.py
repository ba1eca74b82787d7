"""Record how every output was made, under ``uns["stpred"]`` of the table it lives in."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._constants import UNS_KEY

if TYPE_CHECKING:
    import os

    from anndata import AnnData


def plain(value: Any) -> Any:
    """Convert ``value`` to JSON-like types (str, int, float, bool, None, lists and dicts of those).

    Only such values survive a zarr round trip of ``uns`` unchanged.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, int | float):
        return value
    if isinstance(value, Mapping):
        # anndata cannot write None into uns: a missing key reads back as None through ``.get``.
        return {str(k): plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple | set | np.ndarray):
        items = [plain(v) for v in (sorted(value) if isinstance(value, set) else value)]
        kinds = {_kind(v) for v in items}
        if len(kinds) <= 1 and kinds <= {"str", "num", "bool"}:
            return items
        # anndata writes only homogeneous lists of scalars: anything else becomes a dict keyed by position
        return {str(i): ("None" if v is None else v) for i, v in enumerate(items)}
    if hasattr(value, "__fspath__"):
        return str(value)
    return repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "num"
    if isinstance(value, str):
        return "str"
    return "other"


def versions() -> dict[str, str]:
    """Versions of stpred and the packages that shape its results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("stpred", "torch", "lightning", "anndata", "spatialdata", "scanpy", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def stpred_uns(adata: AnnData) -> dict[str, Any]:
    """The ``uns["stpred"]`` dictionary of ``adata`` (created when missing)."""
    uns = adata.uns.get(UNS_KEY)
    if uns is None:
        uns = {}
        adata.uns[UNS_KEY] = uns
    return uns


def record(adata: AnnData, step: str, **params: Any) -> dict[str, Any]:
    """Add ``step`` with its parameters to ``uns["stpred"]["history"]`` (keyed ``"{i:03d}_{step}"``) and return it."""
    uns = stpred_uns(adata)
    entry = {
        "step": step,
        "params": plain(params),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    # a dict keyed by order, not a list: anndata cannot write lists of dicts to zarr/h5ad
    history = dict(uns.get("history", {}))
    history[f"{len(history):03d}_{step}"] = entry
    uns["history"] = history
    return entry


def finite_json(value: Any) -> Any:
    """``value`` as strict-JSON types: NaN and ±inf become ``None``.

    Numpy scalars and arrays, tuples, sets and paths become plain Python values; mapping keys become strings.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return finite_json(value.tolist())
    if isinstance(value, list | tuple | set | frozenset):
        return [finite_json(v) for v in (sorted(value, key=str) if isinstance(value, set | frozenset) else value)]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value if isinstance(value, bool | int | float | str) else repr(value)


def dumps_json(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (the one way stpred writes JSON): NaN/inf are written as ``null``."""
    return json.dumps(finite_json(value), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (see :func:`dumps_json`) to ``path`` and return the path."""
    path = Path(path)
    path.write_text(dumps_json(value, indent=indent) + "\n")
    return path
