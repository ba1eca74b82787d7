"""Domain maps on the tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import SECTION_KEY, STPRED_TABLE
from .._docs import doc_params, doc_sdata_any
from .._sections import section_names
from .._validate import check_sections, check_spatial, get_table
from ..io._anndata import accepts_anndata
from ._spatial import _as_list
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
    from collections.abc import Sequence
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_NA_COLOR = "#d9d9d9"


def default_palette(n: int) -> list[str]:
    """``n`` distinct colours (hex): tab10 up to 10, tab20 up to 20, then tab20 + tab20b + tab20c, cycled."""
    import matplotlib as mpl
    from matplotlib.colors import to_hex

    if n <= 10:
        base = list(mpl.colormaps["tab10"].colors)
    elif n <= 20:
        base = list(mpl.colormaps["tab20"].colors)
    else:
        base = [c for name in ("tab20", "tab20b", "tab20c") for c in mpl.colormaps[name].colors]
    return [to_hex(base[i % len(base)]) for i in range(n)]


def _categories(table: AnnData, key: str) -> list[str]:
    col = table.obs[key]
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.categories]
    return sorted(map(str, col.dropna().unique()))


def _base_colors(table: AnnData, key: str, categories: list[str]) -> dict[str, str]:
    stored = table.uns.get(f"{key}_colors")
    if stored is not None and len(stored) == len(categories):
        return dict(zip(categories, map(str, stored)))
    return dict(zip(categories, default_palette(len(categories))))


def _matched_colors(
    ref: np.ndarray, ref_colors: dict[str, str], other: np.ndarray, categories: list[str]
) -> dict[str, str]:
    """Colours for ``other``'s categories: each takes the colour of the reference domain it overlaps most.

    The matching is one-to-one (Hungarian algorithm on the contingency table); unmatched categories get colours
    the reference does not use.
    """
    from scipy.optimize import linear_sum_assignment

    ref_cats = list(ref_colors)
    ok = pd.notna(ref) & pd.notna(other)
    table = pd.crosstab(pd.Categorical(other[ok], categories=categories), pd.Categorical(ref[ok], categories=ref_cats))
    table = table.reindex(index=categories, columns=ref_cats, fill_value=0)
    rows, cols = linear_sum_assignment(-table.to_numpy())
    colors: dict[str, str] = {}
    for r, c in zip(rows, cols):
        if table.iat[r, c] > 0:
            colors[categories[r]] = ref_colors[ref_cats[c]]
    used = set(colors.values()) | set(ref_colors.values())
    spare = (c for c in default_palette(len(used) + len(categories) + 10) if c not in used)
    for cat in categories:
        if cat not in colors:
            colors[cat] = next(spare)
    return colors


def domains_data(
    sdata: SpatialData,
    key: str | Sequence[str],
    *,
    sections: str | Sequence[str] | None = None,
    table_key: str = STPRED_TABLE,
    align: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """Data behind :func:`domains`.

    Parameters
    ----------
    sdata, key, sections, table_key, align
        As in :func:`domains`.

    Returns
    -------
    panels
        One dict per (section, key), sections first: ``section``, ``key``, ``xy`` ``(n, 2)``, ``labels`` (object
        array, ``None`` for missing).
    colors
        ``{key: {category: colour}}``: one palette per key, shared by every section. The first key uses
        ``uns[f"{key}_colors"]`` when it fits, else a default palette; with ``align=True`` each further key takes
        the colours of the first key's domains it overlaps most.
    """
    table = get_table(sdata, table_key)
    keys = _as_list(key, name="key")
    missing = [k for k in keys if k not in table.obs]
    if missing:
        msg = (
            f"No column(s) {missing} in `obs` of table {table_key!r}; found {list(table.obs.columns)}. "
            "Domains come from `stpred.tl.domains(sdata, layer=...)`."
        )
        raise KeyError(msg)
    sections = check_sections(sections, section_names(table))
    labels_all = table.obs[SECTION_KEY].astype(str).to_numpy()
    xy_all = check_spatial(table, name=table_key, needed_for="domain plots")
    values: dict[str, np.ndarray] = {}
    for k in keys:
        col = table.obs[k]
        arr = col.astype(str).to_numpy().astype(object)
        arr[col.isna().to_numpy()] = None
        values[k] = arr
    colors: dict[str, dict[str, str]] = {}
    for i, k in enumerate(keys):
        cats = _categories(table, k)
        if i == 0 or not align:
            colors[k] = _base_colors(table, k, cats)
        else:
            colors[k] = _matched_colors(values[keys[0]], colors[keys[0]], values[k], cats)
    panels = []
    for section in sections:
        mask = labels_all == section
        for k in keys:
            panels.append({"section": section, "key": k, "xy": xy_all[mask], "labels": values[k][mask]})
    return panels, colors


@accepts_anndata
@doc_params(sdata=doc_sdata_any, show_save=doc_show_save)
def domains(
    sdata: SpatialData,
    key: str | Sequence[str],
    *,
    sections: str | Sequence[str] | None = None,
    img: bool = True,
    table_key: str = STPRED_TABLE,
    align: bool = True,
    spot_scale: float = 1.0,
    panel_size: float = 3.2,
    axes: Sequence[Axes] | np.ndarray | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure | None:
    """Spatial domains drawn on the tissue, one panel per section (and per labeling).

    Each labeling keeps one palette across sections, so a domain has the same colour everywhere. When several
    labelings are given (e.g. ``["domains_target", "domains_stpred_hifusion"]``) they are shown side by side and,
    with ``align=True``, each domain of the later ones takes the colour of the first labeling's domain it overlaps
    most, so that matching domains look alike. Spots without a label are grey.

    Parameters
    ----------
    {sdata}
    key
        ``obs`` column(s) with domain labels (from :func:`stpred.tl.domains` or an annotation).
    sections
        Sections to show (``None``: all).
    img
        Draw the H&E image under the spots.
    table_key
        Table with the labels.
    align
        Match colours of later labelings to the first one.
    spot_scale
        Multiplies the drawn spot radius.
    panel_size
        Size of one panel in inches.
    axes
        Existing axes, one per panel (sections x keys, row-major); ``None`` creates a figure.
    {show_save}

    Returns
    -------
    The figure, or ``None`` when it was shown.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels, colors = domains_data(sdata, key, sections=sections, table_key=table_key, align=align)
    keys = list(colors)
    n_rows, n_cols = len(panels) // len(keys), len(keys)
    frames, aspect = section_frames(sdata, {p["section"]: p["xy"] for p in panels}, spot_scale=spot_scale)
    if axes is None:
        fig, grid = plt.subplots(
            n_rows,
            n_cols,
            figsize=(panel_size * n_cols + 0.6, (panel_size * aspect + 0.35) * n_rows + 0.8),
            squeeze=False,
            layout="constrained",
        )
        grid = np.asarray(grid)
    else:
        grid = check_axes(axes, n_rows * n_cols).reshape(n_rows, n_cols)
        fig = grid[0, 0].figure
    images: dict[str, Any] = {}
    for i, panel in enumerate(panels):
        ax = grid[i // n_cols, i % n_cols]
        section, k, xy, labels = panel["section"], panel["key"], panel["xy"], panel["labels"]
        radius, bbox = frames[section]
        if img and section not in images:
            images[section] = _section_image(sdata, table_key, section, bbox)
        if img and images.get(section) is not None:
            rgb, extent = images[section]
            ax.imshow(rgb, extent=extent, interpolation="antialiased")
        face = [colors[k].get(lab, _NA_COLOR) if lab is not None else _NA_COLOR for lab in labels]
        draw_spots(ax, xy, radius, colors=face)
        frame_section(ax, bbox)
        ax.set_title(f"{section} — {k}" if n_cols > 1 or n_rows > 1 else k, fontsize="medium")
    for c, k in enumerate(keys):
        handles = [Patch(facecolor=col, label=cat) for cat, col in colors[k].items()]
        if any(p["key"] == k and any(lab is None for lab in p["labels"]) for p in panels):
            handles.append(Patch(facecolor=_NA_COLOR, label="no label"))
        grid[-1, c].legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.02),
            ncol=min(len(handles), 5),
            fontsize="small",
            frameon=False,
            title=k if n_cols > 1 else None,
            title_fontsize="small",
            handlelength=1.0,
            columnspacing=1.0,
        )
    return finish(fig, fig, show=show, save=save)


def _section_image(sdata: SpatialData, table_key: str, section: str, bbox: tuple[float, float, float, float]) -> Any:
    """The H&E of ``section`` under ``bbox`` (spot coordinates), found through the recorded layout."""
    from ..io._adopt import section_image_key, section_image_scale

    table = sdata.tables[table_key]
    return section_image(
        sdata, section_image_key(table, section), bbox=bbox, scale=section_image_scale(table, section)
    )
