"""Helpers shared by the plots: ``show``/``save`` handling, images of a section, panel grids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._pyramid import pyramid_levels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

doc_show_save = """\
show
    Show the figure with :func:`matplotlib.pyplot.show`. ``None`` shows it only in an interactive session (IPython
    or Jupyter with an interactive or inline backend), never under a non-interactive backend such as Agg.
save
    Write the figure to this path (the format follows the suffix, e.g. ``.png``, ``.pdf``); parent folders are
    created."""

#: Backends that cannot show a window (``plt.show()`` would only warn).
_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def should_show(*, show: bool | None) -> bool:
    """Resolve ``show=None``: show only in an interactive session with an interactive backend."""
    if show is not None:
        return bool(show)
    import matplotlib as mpl

    backend = str(mpl.get_backend()).lower()
    if backend in _NON_INTERACTIVE:
        return False
    return bool(mpl.is_interactive() or _in_ipython())


def finish(fig: Figure, result: Any, *, show: bool | None, save: str | Path | None) -> Any:
    """Save and/or show ``fig``; return ``result`` unless the figure was shown (then ``None``, as scanpy does)."""
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        logger.info("Saved figure to %s", path)
    if should_show(show=show):
        import matplotlib.pyplot as plt

        plt.show()
        return None
    return result


def new_axes(ax: Axes | None, *, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Return ``(figure, ax)``, creating a figure when ``ax`` is ``None``."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def check_axes(axes: Any, n: int, *, name: str = "axes") -> np.ndarray:
    """Flatten user-supplied ``axes`` and check that there are exactly ``n`` of them."""
    flat = np.asarray(axes, dtype=object).ravel()
    if flat.size != n:
        msg = f"Expected {n} axes in `{name}` for this plot, found {flat.size}."
        raise ValueError(msg)
    return flat


# --------------------------------------------------------------------------------------------------- images
def choose_level(shapes: list[tuple[int, int]], region: tuple[float, float], *, max_px: int) -> int:
    """Index of the finest level on which ``region`` (height, width in full-resolution pixels) fits in ``max_px``.

    Parameters
    ----------
    shapes
        ``(height, width)`` of each level, finest first.
    region
        Size of the region to show in full-resolution pixels.
    max_px
        Largest number of pixels wanted along either side of the displayed region.

    Returns
    -------
    The level index (the coarsest when none fits).
    """
    full_h, full_w = shapes[0]
    for i, (h, w) in enumerate(shapes):
        if max(region[0] * h / full_h, region[1] * w / full_w) <= max_px:
            return i
    return len(shapes) - 1


def section_image(
    sdata: SpatialData,
    key: str,
    *,
    bbox: tuple[float, float, float, float],
    max_px: int = 800,
    scale: float = 1.0,
) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
    """Crop of an RGB image element at a coarse level, for display under full-resolution coordinates.

    Parameters
    ----------
    sdata
        SpatialData holding the image.
    key
        Image element name (``"{section}_hne"``).
    bbox
        ``(x0, y0, x1, y1)`` region in full-resolution pixels.
    max_px
        Pick the finest pyramid level on which the region is at most this many pixels wide and high.
    scale
        Pixels of the image's finest level per unit of ``bbox`` (spot coordinates); the extent is returned in
        spot coordinates.

    Returns
    -------
    ``(rgb, extent)``: an ``(h, w, 3)`` uint8 array and its ``extent`` ``(left, right, bottom, top)`` in
    full-resolution pixels for :meth:`matplotlib.axes.Axes.imshow`; ``None`` when ``sdata`` has no image ``key``.
    """
    if key not in sdata.images:
        return None
    levels = pyramid_levels(sdata.images[key])
    shapes = [(int(lv.sizes["y"]), int(lv.sizes["x"])) for lv in levels]
    x0, y0, x1, y1 = (v * scale for v in bbox)
    i = choose_level(shapes, (y1 - y0, x1 - x0), max_px=max_px)
    level = levels[i]
    full_h, full_w = shapes[0]
    h, w = shapes[i]
    sy, sx = full_h / h, full_w / w
    r0, r1 = max(int(np.floor(y0 / sy)), 0), min(int(np.ceil(y1 / sy)), h)
    c0, c1 = max(int(np.floor(x0 / sx)), 0), min(int(np.ceil(x1 / sx)), w)
    if r1 <= r0 or c1 <= c0:
        return None
    crop = np.asarray(level.isel(y=slice(r0, r1), x=slice(c0, c1)).data)
    if crop.shape[0] == 1:
        crop = np.repeat(crop, 3, axis=0)
    rgb = np.moveaxis(crop[:3], 0, -1)
    if rgb.dtype != np.uint8:
        lo, hi = float(rgb.min()), float(rgb.max())
        rgb = ((rgb - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
    extent = (c0 * sx / scale, c1 * sx / scale, r1 * sy / scale, r0 * sy / scale)
    return rgb, extent


def spot_radius(sdata: SpatialData, section: str, xy: np.ndarray) -> float:
    """Spot radius of ``section`` in full-resolution pixels: the shapes' radius, else a quarter of the pitch."""
    from .._constants import STPRED_TABLE, shapes_key
    from ..io._adopt import recorded_layout

    table = sdata.tables.get(STPRED_TABLE)
    layout = recorded_layout(table) if table is not None else None
    if layout is not None and section in layout.sections:
        if layout.sections[section].spot_radius is not None:
            return float(layout.sections[section].spot_radius)
        return nearest_distance(xy) / 4.0
    key = shapes_key(section)
    if key in sdata.shapes and "radius" in sdata.shapes[key]:
        return float(np.median(np.asarray(sdata.shapes[key]["radius"], dtype=float)))
    return nearest_distance(xy) / 4.0


def nearest_distance(xy: np.ndarray) -> float:
    """Median distance from each point to its nearest neighbour (1.0 for fewer than two points)."""
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1])) or 1.0


def draw_spots(
    ax: Axes,
    xy: np.ndarray,
    radius: float,
    *,
    values: np.ndarray | None = None,
    colors: Any = None,
    cmap: Any = None,
    norm: Any = None,
    nan_color: str = "#d9d9d9",
) -> Any:
    """Draw circles of ``radius`` (data units) at ``xy``, coloured by ``values`` or ``colors``; return the collection."""
    from matplotlib.collections import EllipseCollection

    d = np.full(len(xy), 2.0 * radius)
    coll = EllipseCollection(
        d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData, linewidths=0
    )
    if values is not None:
        import matplotlib as mpl

        cmap = mpl.colormaps[cmap] if isinstance(cmap, str) or cmap is None else cmap
        cmap = cmap.with_extremes(bad=nan_color) if cmap is not None else None
        coll.set_array(np.ma.masked_invalid(values))
        coll.set_cmap(cmap)
        coll.set_norm(norm)
    elif colors is not None:
        coll.set_facecolor(colors)
    ax.add_collection(coll)
    return coll


def frame_section(ax: Axes, bbox: tuple[float, float, float, float]) -> None:
    """Limits on ``bbox`` ``(x0, y0, x1, y1)`` with y pointing down (image convention), equal aspect, no ticks."""
    x0, y0, x1, y1 = bbox
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def spots_bbox(xy: np.ndarray, radius: float, *, margin: float) -> tuple[float, float, float, float]:
    """Bounding box ``(x0, y0, x1, y1)`` of circles at ``xy`` with a margin (full-resolution pixels)."""
    pad = radius + margin
    return (
        float(xy[:, 0].min() - pad),
        float(xy[:, 1].min() - pad),
        float(xy[:, 0].max() + pad),
        float(xy[:, 1].max() + pad),
    )


def section_frames(
    sdata: SpatialData, xy_by_section: dict[str, np.ndarray], *, spot_scale: float = 1.0
) -> tuple[dict[str, tuple[float, tuple[float, float, float, float]]], float]:
    """Drawn spot radius and view box of each section, and the height/width ratio to give a panel.

    Parameters
    ----------
    sdata
        SpatialData with the shapes (for the radius).
    xy_by_section
        Spot centres of each section.
    spot_scale
        Multiplies the radius.

    Returns
    -------
    ``{section: (radius, bbox)}`` and the largest ``height / width`` of the boxes, clipped to [0.4, 2.5].
    """
    frames = {}
    for section, xy in xy_by_section.items():
        radius = spot_radius(sdata, section, xy) * spot_scale
        frames[section] = (radius, spots_bbox(xy, radius, margin=0.5 * nearest_distance(xy)))
    ratios = [(b[3] - b[1]) / max(b[2] - b[0], 1e-9) for _, b in frames.values()]
    return frames, float(np.clip(max(ratios), 0.4, 2.5))
