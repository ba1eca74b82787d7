"""The tiles of :func:`stpred.pp.tile` on the H&E image, with the outline of the detected tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import SPATIAL_KEY, TILES_KEY, UNS_KEY
from .._docs import doc_params
from .._pyramid import pyramid_levels
from ._utils import doc_show_save, finish, frame_section, new_axes, section_image

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _tile_tables(sdata: SpatialData) -> dict[str, tuple[str, AnnData]]:
    """``{shapes key: (table key, table)}`` of every table written by :func:`stpred.pp.tile`."""
    out = {}
    for name, table in sdata.tables.items():
        meta = table.uns.get(UNS_KEY, {})
        if TILES_KEY not in meta:
            continue
        regions = table.uns.get("spatialdata_attrs", {}).get("region")
        for region in np.atleast_1d(regions):
            out[str(region)] = (name, table)
    return out


def tissue_data(sdata: SpatialData, key: str | None = None) -> dict[str, Any]:
    """Data behind :func:`tissue`: where the tiles, the mask and the image are, in full-resolution pixels.

    Parameters
    ----------
    sdata
        SpatialData on which :func:`stpred.pp.tile` ran.
    key
        Shapes key of the tiles (``key_added`` of :func:`stpred.pp.tile`); may be omitted when there is one set.

    Returns
    -------
    A dict with ``key``, ``table_key``, ``image_key``, ``section``, ``layout``, ``size_um``, ``stride_um``,
    ``size_px`` (tile side or circle diameter in full-resolution pixels), ``xy`` (``(n, 2)`` centres),
    ``fraction`` (tissue fraction per tile, NaN without detection), ``n_grid`` (tiles before the tissue filter),
    ``mask`` (the low-resolution labels as an array, or ``None``), ``mask_scale`` (full-resolution pixels per mask
    pixel along y, x) and ``bbox`` (the whole image, ``(x0, y0, x1, y1)``).
    """
    tables = _tile_tables(sdata)
    if key is None:
        if len(tables) != 1:
            what = f"several tile sets {sorted(tables)}" if tables else "no tiles"
            msg = f"`sdata` has {what}; " + (
                "pass `key=` to choose one." if tables else "run `stpred.pp.tile(sdata)` first."
            )
            raise ValueError(msg)
        key = next(iter(tables))
    if key not in tables:
        msg = f"No tiles {key!r} made by `stpred.pp.tile`; found {sorted(tables)}. Run `stpred.pp.tile(sdata)` first."
        raise KeyError(msg)
    table_key, table = tables[key]
    meta = table.uns[UNS_KEY][TILES_KEY]
    image_key = meta["image_key"]
    if image_key not in sdata.images:
        msg = f"The image {image_key!r} that tiles {key!r} were laid on is no longer in `sdata.images`."
        raise KeyError(msg)
    levels = pyramid_levels(sdata.images[image_key])
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    mask = None
    mask_scale = (1.0, 1.0)
    mask_key = meta.get("mask_key")
    if mask_key is not None and mask_key in sdata.labels:
        labels = sdata.labels[mask_key]
        mask = np.asarray(labels.data)
        scale = meta.get("mask_scale")
        mask_scale = (
            (float(scale[0]), float(scale[1])) if scale is not None else (h0 / mask.shape[0], w0 / mask.shape[1])
        )
    section = str(table.obs["section"].iloc[0]) if table.n_obs else ""
    return {
        "key": key,
        "table_key": table_key,
        "image_key": image_key,
        "section": section,
        "layout": meta["layout"],
        "size_um": float(meta["size_um"]),
        "stride_um": float(meta["stride_um"]),
        "size_px": float(meta["size_um"]) / float(meta["mpp"]),
        "xy": np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64),
        "fraction": np.asarray(table.obs["tissue_fraction"], dtype=np.float64),
        "n_grid": int(meta["n_grid"]),
        "mask": mask,
        "mask_scale": mask_scale,
        "bbox": (0.0, 0.0, float(w0), float(h0)),
    }


def _draw_tiles(ax: Axes, data: dict[str, Any], *, color: str, linewidth: float) -> Any:
    from matplotlib.collections import EllipseCollection, PolyCollection

    xy, side = data["xy"], data["size_px"]
    if data["layout"] == "hex":
        d = np.full(len(xy), side)
        coll = EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData)
    else:
        h = side / 2.0
        corners = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
        coll = PolyCollection(xy[:, None, :] + corners[None, :, :])
    coll.set_facecolor("none")
    coll.set_edgecolor(color)
    coll.set_linewidth(linewidth)
    ax.add_collection(coll)
    return coll


@doc_params(show_save=doc_show_save)
def tissue(
    sdata: SpatialData,
    key: str | None = None,
    *,
    img: bool = True,
    mask: bool = True,
    tile_color: str = "#17becf",
    mask_color: str = "#ff7f0e",
    linewidth: float = 0.6,
    max_px: int = 1200,
    figsize: tuple[float, float] = (6.0, 6.0),
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure | None:
    """The tiles of :func:`stpred.pp.tile` over the H&E image, with the outline of the detected tissue.

    The image is drawn from a low-resolution pyramid level (at most ``max_px`` pixels per side), the tissue mask
    as its outline, and each tile as an outline (a square, or a circle for ``layout="hex"``).

    Parameters
    ----------
    sdata
        SpatialData on which :func:`stpred.pp.tile` ran.
    key
        Shapes key of the tiles (``key_added`` of :func:`stpred.pp.tile`); may be omitted when there is one set.
    img
        Draw the H&E image.
    mask
        Draw the outline of the tissue mask (when the tiles were made with ``tissue=True``).
    tile_color, mask_color
        Colours of the tile outlines and of the mask outline.
    linewidth
        Width of the tile outlines in points.
    max_px
        Largest number of image pixels shown along a side.
    figsize
        Size of a new figure in inches.
    ax
        Existing axes to draw into; ``None`` creates a figure.
    {show_save}

    Returns
    -------
    The figure, or ``None`` when it was shown.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=1)
    >>> stpred.pp.tile(sdata, size_um=100)
    >>> fig = stpred.pl.tissue(sdata, show=False)
    """
    from matplotlib.lines import Line2D

    data = tissue_data(sdata, key)
    fig, ax = new_axes(ax, figsize=figsize)
    bbox = data["bbox"]
    if img:
        shown = section_image(sdata, data["image_key"], bbox=bbox, max_px=max_px)
        if shown is not None:
            rgb, extent = shown
            ax.imshow(rgb, extent=extent, interpolation="antialiased")
    handles = []
    _draw_tiles(ax, data, color=tile_color, linewidth=linewidth)
    shape = "circles" if data["layout"] == "hex" else "squares"
    handles.append(Line2D([], [], color=tile_color, lw=1.2, label=f"{len(data['xy'])} tiles ({shape})"))
    if mask and data["mask"] is not None:
        m = data["mask"] > 0
        sy, sx = data["mask_scale"]
        gx = (np.arange(m.shape[1]) + 0.5) * sx
        gy = (np.arange(m.shape[0]) + 0.5) * sy
        ax.contour(gx, gy, m.astype(np.float32), levels=[0.5], colors=[mask_color], linewidths=1.2)
        handles.append(Line2D([], [], color=mask_color, lw=1.2, label="tissue mask"))
    frame_section(ax, bbox)
    stride = f", stride {data['stride_um']:g} µm" if data["stride_um"] != data["size_um"] else ""
    ax.set_title(
        f"{data['section']}: {len(data['xy'])} of {data['n_grid']} tiles of {data['size_um']:g} µm{stride}",
        fontsize="medium",
    )
    ax.legend(handles=handles, loc="lower left", fontsize="small", framealpha=0.8)
    return finish(fig, fig, show=show, save=save)
