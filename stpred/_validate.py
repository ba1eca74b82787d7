"""Input checks shared by every public function; each error names the problem and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._constants import STPRED_TABLE

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

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


def check_device(device: Any) -> str:
    """Resolve ``device`` (``None``: CUDA when available, else CPU) and refuse one this torch build cannot use.

    Returns the device as a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); raises a :class:`ValueError`
    naming what is available instead of the raw error torch gives when a missing device is first used.
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str | torch.device):
        msg = f"`device` must be a string such as 'cpu' or 'cuda', or None; found {type(device).__name__}."
        raise TypeError(msg)
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        msg = f"Unknown device {str(device)!r}; expected 'cpu', 'cuda', 'cuda:<index>', 'mps' or None (automatic)."
        raise ValueError(msg) from None
    if parsed.type == "cpu":
        return str(parsed)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
            msg = (
                f"device={str(device)!r} was requested but CUDA is not available here ({build}, torch "
                f"{torch.__version__}). Pass device='cpu' (or None to choose automatically)."
            )
            raise ValueError(msg)
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            msg = f"device={str(device)!r} was requested but only {count} CUDA device(s) are visible (0..{count - 1})."
            raise ValueError(msg)
        return str(parsed)
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            msg = "device='mps' was requested but Apple MPS is not available here. Pass device='cpu' or None."
            raise ValueError(msg)
        return str(parsed)
    msg = f"Unsupported device {str(device)!r}; stpred runs on 'cpu', 'cuda' or 'mps'."
    raise ValueError(msg)


# ---------------------------------------------------------------------------------------------------- data checks
_RAW_HINT = (
    "`X` must hold raw counts: set them as `X` (e.g. `adata.X = adata.layers['counts']` or "
    "`adata = adata.raw.to_adata()`) before handing the data to stpred"
)


def check_raw_counts(X: Any, *, name: str, allow_non_integer: bool = False) -> None:
    """Raise a :class:`ValueError` unless ``X`` holds raw counts: finite, non-negative and integer-valued.

    With ``allow_non_integer=True`` non-integer values (e.g. estimated counts) are accepted with a warning; NaN,
    infinite and negative values are always refused. Log-transformed or normalised input is named as such.
    """
    import warnings

    import numpy as np
    from scipy import sparse

    values = X.data if sparse.issparse(X) else np.asarray(X)
    values = np.asarray(values).ravel()
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        msg = f"The counts of table {name!r} have dtype {values.dtype}; expected numbers (raw counts)."
        raise TypeError(msg)
    if np.issubdtype(values.dtype, np.integer):
        if (values < 0).any():
            msg = f"The counts of table {name!r} contain negative values (min {values.min()}). {_RAW_HINT}."
            raise ValueError(msg)
        return
    stats = _count_stats(values)
    if stats["nan"] or stats["inf"]:
        msg = (
            f"The counts of table {name!r} contain NaN or infinite values ({stats['nan']} NaN, {stats['inf']} inf). "
            f"{_RAW_HINT}."
        )
        raise ValueError(msg)
    if stats["negative"]:
        msg = (
            f"The counts of table {name!r} contain negative values (min {stats['min']:.4g}): they are not raw "
            f"counts (scaled or centred data?). {_RAW_HINT}."
        )
        raise ValueError(msg)
    if not stats["fractional"]:
        return
    example = stats["example"]
    values_max = stats["max"]
    kind = "log-transformed or normalised" if values_max < 50 else "normalised or estimated"
    share = f"{stats['fractional']} of {values.size} stored values are not integers, e.g. {example:.4g}"
    if not allow_non_integer:
        msg = (
            f"The counts of table {name!r} look {kind} ({share}). {_RAW_HINT}, "
            "or pass `allow_non_integer=True` if these really are counts (e.g. estimated by a deconvolution tool)."
        )
        raise ValueError(msg)
    warnings.warn(
        f"The counts of table {name!r} are not integers ({share}); used as counts because `allow_non_integer=True`.",
        UserWarning,
        stacklevel=3,
    )


def _count_stats(values: Any, chunk: int = 1 << 22) -> dict[str, Any]:
    """NaN, inf, negative and non-integer counts, min, max and a non-integer example of a float array, in chunks."""
    import numpy as np

    out: dict[str, Any] = {"nan": 0, "inf": 0, "negative": 0, "fractional": 0, "example": None}
    out["min"], out["max"] = np.inf, -np.inf
    for start in range(0, values.size, chunk):
        part = values[start : start + chunk]
        finite = np.isfinite(part)
        n_nan = int(np.isnan(part).sum())
        out["nan"] += n_nan
        out["inf"] += int(part.size - finite.sum()) - n_nan
        part = part[finite]
        if not part.size:
            continue
        out["negative"] += int((part < 0).sum())
        out["min"], out["max"] = min(out["min"], float(part.min())), max(out["max"], float(part.max()))
        fractional = part != np.floor(part)
        n_frac = int(fractional.sum())
        if n_frac and out["example"] is None:
            out["example"] = float(part[np.argmax(fractional)])
        out["fractional"] += n_frac
    return out


def check_table_shape(adata: AnnData, *, name: str) -> None:
    """Refuse a table without spots or genes, or with duplicate spot (obs) or gene (var) names, naming them."""
    if adata.n_obs == 0:
        msg = f"Table {name!r} has no spots (0 rows); select a non-empty subset of the data."
        raise ValueError(msg)
    if adata.n_vars == 0:
        msg = f"Table {name!r} has no genes (0 columns)."
        raise ValueError(msg)
    for axis, names, fix in (
        ("gene (var)", adata.var_names, "adata.var_names_make_unique()"),
        ("spot (obs)", adata.obs_names, "adata.obs_names_make_unique()"),
    ):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()
            msg = (
                f"Table {name!r} has {len(dup)} duplicate {axis} names (first: {list(map(str, dup[:5]))}); "
                f"make them unique first, e.g. `{fix}` on the table."
            )
            raise ValueError(msg)


def check_spatial(adata: AnnData, *, name: str, needed_for: str) -> Any:
    """Return the ``(n_spots, 2)`` float spot centres ``obsm["spatial"]`` or raise naming the fix."""
    import numpy as np

    from ._constants import SPATIAL_KEY

    if SPATIAL_KEY not in adata.obsm:
        msg = (
            f"Table {name!r} has no `obsm[{SPATIAL_KEY!r}]` (spot centres in pixels), needed for {needed_for}; found "
            f"{sorted(adata.obsm)}. Read the data with an `stpred.io` reader, or set `table.obsm[{SPATIAL_KEY!r}]` to "
            "an (n_spots, 2) array of x, y pixel coordinates."
        )
        raise KeyError(msg)
    xy = np.asarray(adata.obsm[SPATIAL_KEY])
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.issubdtype(xy.dtype, np.number):
        msg = f"`obsm[{SPATIAL_KEY!r}]` of table {name!r} must be an (n_spots, 2) numeric array; found {xy.shape} {xy.dtype}."
        raise ValueError(msg)
    xy = xy[:, :2].astype(np.float64)
    if not np.isfinite(xy).all():
        msg = f"`obsm[{SPATIAL_KEY!r}]` of table {name!r} has {int((~np.isfinite(xy)).any(axis=1).sum())} spots with NaN or infinite coordinates."
        raise ValueError(msg)
    return xy
