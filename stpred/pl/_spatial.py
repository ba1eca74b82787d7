"""Measured vs predicted expression maps over the H&E image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import SECTION_KEY, STPRED_TABLE, TARGET_LAYER, image_key
from .._docs import doc_params, doc_sdata
from .._sections import section_names
from .._validate import check_sections, check_spatial, get_table
from ._utils import (
    check_axes,
    doc_show_save,
    draw_spots,
    finish,
    frame_section,
    section_frames,
    section_image,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


@dataclass
class SpatialRow:
    """What one row of :func:`spatial` shows: one gene of one section in several layers.

    Attributes
    ----------
    section
        Section name.
    gene
        Gene name.
    xy
        ``(n, 2)`` spot centres (x, y) in full-resolution pixels.
    values
        Layer name → ``(n,)`` values of the gene (NaN where a layer has no value).
    vmin, vmax
        Colour limits shared by every panel of the row (and by every row of the same gene).
    """

    section: str
    gene: str
    xy: np.ndarray
    values: dict[str, np.ndarray]
    vmin: float
    vmax: float


def _as_list(value: str | Sequence[str], *, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(dict.fromkeys(str(v) for v in value))
    if not items:
        msg = f"Expected at least one entry in `{name}`, found an empty list."
        raise ValueError(msg)
    return items


def check_genes(table: AnnData, genes: str | Sequence[str], *, table_key: str) -> list[str]:
    """Resolve ``genes`` against ``table.var_names``; raise a :class:`KeyError` listing the available genes."""
    genes = _as_list(genes, name="genes")
    names = list(map(str, table.var_names))
    missing = [g for g in genes if g not in set(names)]
    if missing:
        shown = names if len(names) <= 30 else [*names[:30], "…"]
        msg = f"Gene(s) {missing} not in table {table_key!r}; available genes: {shown}."
        raise KeyError(msg)
    return genes


def check_layers(table: AnnData, layers: str | Sequence[str], *, table_key: str) -> list[str]:
    """Resolve ``layers`` against ``table.layers``; raise a :class:`KeyError` listing the available layers."""
    layers = _as_list(layers, name="layers")
    missing = [layer for layer in layers if layer not in table.layers]
    if missing:
        msg = (
            f"Layer(s) {missing} not in table {table_key!r}; available layers: {sorted(table.layers)}. "
            "Predictions come from `stpred.tl.predict(sdata, model=...)`, the target from `stpred.pp.normalize(sdata)`."
        )
        raise KeyError(msg)
    return layers


def _column(table: AnnData, layer: str, j: int) -> np.ndarray:
    values = table.layers[layer]
    col = values[:, j]
    if hasattr(col, "toarray"):
        col = col.toarray()
    return np.asarray(col, dtype=np.float64).ravel()


def spatial_data(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    layers: str | Sequence[str] = (TARGET_LAYER, "stpred_hifusion"),
    sections: str | Sequence[str] | None = None,
    table_key: str = STPRED_TABLE,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> list[SpatialRow]:
    """Data behind :func:`spatial`: one :class:`SpatialRow` per (section, gene), sections first.

    The colour limits of a gene are the ``percentiles`` of its finite values over every displayed layer and
    section, so that measured and predicted maps (and sections) share one scale.

    Parameters
    ----------
    sdata, genes, layers, sections, table_key
        As in :func:`spatial`.
    percentiles
        Lower and upper percentile of the colour limits.

    Returns
    -------
    The rows, in display order.
    """
    table = get_table(sdata, table_key)
    genes = check_genes(table, genes, table_key=table_key)
    layers = check_layers(table, layers, table_key=table_key)
    sections = check_sections(sections, section_names(table))
    lo, hi = percentiles
    if not 0 <= lo < hi <= 100:
        msg = f"Expected `percentiles` (low, high) with 0 <= low < high <= 100, found {percentiles!r}."
        raise ValueError(msg)
    labels = table.obs[SECTION_KEY].astype(str).to_numpy()
    xy_all = check_spatial(table, name=table_key, needed_for="spatial plots")
    rows = []
    limits: dict[str, tuple[float, float]] = {}
    for gene in genes:
        j = int(table.var_names.get_loc(gene))
        shown = np.isin(labels, sections)
        pooled = np.concatenate([_column(table, layer, j)[shown] for layer in layers])
        pooled = pooled[np.isfinite(pooled)]
        if pooled.size:
            vmin, vmax = (float(v) for v in np.percentile(pooled, [lo, hi]))
        else:
            vmin, vmax = 0.0, 1.0
        if vmax <= vmin:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        limits[gene] = (vmin, vmax)
    for section in sections:
        mask = labels == section
        for gene in genes:
            j = int(table.var_names.get_loc(gene))
            values = {layer: _column(table, layer, j)[mask] for layer in layers}
            rows.append(SpatialRow(section, gene, xy_all[mask], values, *limits[gene]))
    return rows


def layer_label(layer: str, labels: Mapping[str, str] | None = None) -> str:
    """Display name of a layer: ``labels[layer]``, ``"measured"`` for the target, else the layer name."""
    if labels is not None and layer in labels:
        return labels[layer]
    return "measured" if layer == TARGET_LAYER else layer


def _scale_label(table: AnnData) -> str:
    method = dict(dict(table.uns.get("stpred", {}) or {}).get("normalize", {}) or {}).get("method")
    return {
        "log_share": "ln share (log_share)",
        "log1p": "log1p(counts)",
        "log10_cp10k": "log10(1 + 10^4 share)",
    }.get(str(method), "expression")


@doc_params(sdata=doc_sdata, show_save=doc_show_save)
def spatial(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    layers: str | Sequence[str] = (TARGET_LAYER, "stpred_hifusion"),
    sections: str | Sequence[str] | None = None,
    img: bool = True,
    table_key: str = STPRED_TABLE,
    cmap: str = "viridis",
    percentiles: tuple[float, float] = (1.0, 99.0),
    spot_scale: float = 1.0,
    layer_labels: Mapping[str, str] | None = None,
    panel_size: float = 3.0,
    alpha: float = 1.0,
    vmax: Literal["p99"] | None = None,
    ood: Literal["hatch", "mask"] | None = None,
    axes: Sequence[Axes] | np.ndarray | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure | None:
    """Measured and predicted expression maps side by side over the H&E image.

    One row per (section, gene), one column per layer. All panels of a gene share one colour scale (the 1st–99th
    percentile of its values over the displayed layers and sections) with one colorbar per row, so a prediction
    that is too flat looks too flat. Spots are drawn at their true radius; spots without a value (e.g. sections
    that were not predicted) are grey. The image is read from a coarse pyramid level of ``"{{section}}_hne"``.

    Parameters
    ----------
    {sdata}
    genes
        Gene name(s) from ``var_names`` of the table.
    layers
        Layers to show, one column each, e.g. ``("target", "stpred_hifusion", "stpred_hist")``.
    sections
        Sections to show (``None``: all).
    img
        Draw the H&E image under the spots.
    table_key
        Table with the layers.
    cmap
        Colormap name.
    percentiles
        Percentiles of the shared colour limits.
    spot_scale
        Multiplies the drawn spot radius (e.g. 1.5 to fill more of the gaps of legacy ST).
    layer_labels
        Display names of layers (default: ``"measured"`` for ``"target"``, the layer name otherwise).
    panel_size
        Size of one panel in inches.
    alpha
        Opacity of the spots (0–1), to see the H&E through them.
    vmax
        ``None``: one colour scale per gene, shared by its panels (above). ``"p99"``: each panel its own scale
        (1st–99th percentile of its values) and colorbar, so that an offset between patients or models does not
        hide the pattern. A standard-deviation layer (``"<key>_std"`` from ``tl.predict(..., uncertainty=...)``)
        always gets its own scale.
    ood
        Out-of-distribution spots of a prediction layer ``L`` (``obs["L_ood_flag"]`` from
        :func:`stpred.tl.predict`; also used for ``"L_std"``): ``"hatch"`` draws hatched outlines over them,
        ``"mask"`` greys them out; ``None`` ignores the flag.
    axes
        Existing axes to draw on, one per panel (rows x columns, row-major); ``None`` creates a figure.
    {show_save}

    Returns
    -------
    The figure, or ``None`` when it was shown.

    Examples
    --------
    >>> stpred.pl.spatial(sdata, ["ERBB2", "KRT19"], layers=("target", "stpred_hifusion"), sections="C3")  # doctest: +SKIP
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        msg = f"Expected `alpha` in [0, 1], found {alpha!r}."
        raise ValueError(msg)
    if vmax not in (None, "p99"):
        msg = f"Expected `vmax` to be None (shared scale per gene) or 'p99' (one scale per panel), found {vmax!r}."
        raise ValueError(msg)
    if ood not in (None, "hatch", "mask"):
        msg = f"Expected `ood` to be None, 'hatch' or 'mask', found {ood!r}."
        raise ValueError(msg)
    rows = spatial_data(sdata, genes, layers=layers, sections=sections, table_key=table_key, percentiles=percentiles)
    layers = list(rows[0].values)
    table = sdata.tables[table_key]
    flags = _ood_flags(table, layers, sections=[r.section for r in rows]) if ood is not None else {}
    if ood is not None and not flags:
        msg = (
            f"`ood={ood!r}` needs `obs['<layer>_ood_flag']` for one of {layers}; run "
            "`stpred.tl.predict(..., ood=True)` first, or pass `ood=None`."
        )
        raise KeyError(msg)
    own_scale = {layer: vmax == "p99" or layer.endswith("_std") for layer in layers}
    n_rows, n_cols = len(rows), len(layers)
    frames, aspect = section_frames(sdata, {r.section: r.xy for r in rows}, spot_scale=spot_scale)
    if axes is None:
        fig, grid = plt.subplots(
            n_rows,
            n_cols,
            figsize=(panel_size * n_cols + 1.0, (panel_size * aspect + 0.35) * n_rows),
            squeeze=False,
            layout="constrained",
        )
        grid = np.asarray(grid)
    else:
        grid = check_axes(axes, n_rows * n_cols).reshape(n_rows, n_cols)
        fig = grid[0, 0].figure
    scale = _scale_label(table)
    multi_section = len({r.section for r in rows}) > 1
    images: dict[str, Any] = {}
    for r, row in enumerate(rows):
        radius, bbox = frames[row.section]
        if img and row.section not in images:
            images[row.section] = section_image(sdata, image_key(row.section), bbox=bbox)
        norm = mpl.colors.Normalize(vmin=row.vmin, vmax=row.vmax)
        coll = None
        shared = []
        for c, layer in enumerate(layers):
            ax = grid[r, c]
            if img and images.get(row.section) is not None:
                rgb, extent = images[row.section]
                ax.imshow(rgb, extent=extent, interpolation="antialiased")
            values = row.values[layer]
            flag = flags.get(layer, {}).get(row.section)
            if ood == "mask" and flag is not None:
                values = np.where(flag, np.nan, values)
            panel_norm = _panel_norm(values, percentiles) if own_scale[layer] else norm
            panel = draw_spots(ax, row.xy, radius, values=values, cmap=cmap, norm=panel_norm)
            panel.set_alpha(alpha)
            if ood == "hatch" and flag is not None and flag.any():
                _hatch(ax, row.xy[flag], radius)
            if own_scale[layer]:
                bar = fig.colorbar(panel, ax=ax, shrink=0.85, pad=0.02, aspect=25)
                bar.ax.tick_params(labelsize="small")
            else:
                coll = panel
                shared.append(ax)
            frame_section(ax, bbox)
            title = f"{row.gene} — {layer_label(layer, layer_labels)}"
            if not np.isfinite(row.values[layer]).any():
                title += "\n(no values in this section)"
            ax.set_title(title, fontsize="medium")
            if c == 0 and multi_section:
                ax.set_ylabel(row.section, fontsize="medium")
        if coll is not None:
            cbar = fig.colorbar(coll, ax=shared, shrink=0.85, pad=0.02, aspect=25)
            cbar.set_label(scale, fontsize="small")
            cbar.ax.tick_params(labelsize="small")
    return finish(fig, fig, show=show, save=save)


def _panel_norm(values: np.ndarray, percentiles: tuple[float, float]) -> Any:
    """Colour limits of one panel: the ``percentiles`` of its finite values."""
    import matplotlib as mpl

    finite = values[np.isfinite(values)]
    lo, hi = (float(v) for v in np.percentile(finite, percentiles)) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return mpl.colors.Normalize(vmin=lo, vmax=hi)


def _ood_flags(table: AnnData, layers: list[str], *, sections: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Layer → section → boolean OOD flag of its spots (a ``_std`` layer uses its prediction's flag)."""
    labels = table.obs[SECTION_KEY].astype(str).to_numpy()
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer in layers:
        base = layer.removesuffix("_std")
        column = f"{base}_ood_flag"
        if column in table.obs:
            flag = table.obs[column].to_numpy().astype(bool)
            out[layer] = {s: flag[labels == s] for s in dict.fromkeys(sections)}
    return out


def _hatch(ax: Axes, xy: np.ndarray, radius: float) -> None:
    """Hatched, unfilled circles over flagged spots."""
    from matplotlib.collections import EllipseCollection

    d = np.full(len(xy), 2.0 * radius)
    coll = EllipseCollection(
        d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData,
        facecolors="none", edgecolors="black", linewidths=0.6, hatch="xxx",
    )  # fmt: skip
    ax.add_collection(coll)
