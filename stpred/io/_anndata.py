"""Public functions on an AnnData in scanpy's Visium layout: a SpatialData view of it, and results written back."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from .._constants import PATIENT_KEY, RAW_TABLE, SECTION_KEY, SPATIAL_KEY, STPRED_TABLE, UNS_KEY
from .._provenance import plain
from ._adopt import LAYOUT_KEY, Layout, resolve, stpred_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

F = TypeVar("F", bound=Callable[..., Any])

#: Key under an AnnData's ``uns["stpred"]`` of the obs column naming each spot's library.
LIBRARY_KEY = "library_key"
#: Key under an AnnData's ``uns["stpred"]`` of the stpred table's own ``uns["stpred"]``.
ANNDATA_TABLE_KEY = "table"
#: Key under an AnnData's ``uns["stpred"]`` mapping ``obsm`` keys to the stpred table's layers.
ANNDATA_LAYERS_KEY = "obsm_layers"
#: Images of a scanpy/squidpy AnnData, in order of preference.
_LEGACY_IMAGES = ("hires", "lowres")

# view SpatialData -> the AnnData it was made from (identity only: lets caches follow the user's object); the
# view is a key (hashable), the AnnData a weak value
_ORIGIN: weakref.WeakKeyDictionary[Any, weakref.ref] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------------------------------
# AnnData in scanpy's Visium layout


def _legacy_libraries(adata: AnnData) -> dict[str, dict[str, Any]]:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, Mapping) or not spatial:
        msg = (
            "The AnnData has no `uns['spatial'][library]` entry (images and scale factors, as `scanpy.read_visium` "
            "writes them); stpred needs the H&E image. Build a SpatialData object with the image instead."
        )
        raise ValueError(msg)
    return {str(k): dict(v) for k, v in spatial.items()}


def anndata_view(adata: AnnData, *, section_key: str | None = None) -> SpatialData:
    """A SpatialData over an AnnData in scanpy's Visium layout, sharing its counts; ``adata`` is not modified.

    One image per library (hires, else lowres, as ``uns["spatial"][library]["images"]`` holds it) in the
    coordinate system ``library``; one circles element ``library`` with the spots of that library in
    full-resolution pixels, mapped onto the image by ``scalefactors["tissue_<image>_scalef"]``; the table
    ``"table"`` (a new AnnData sharing ``X``, ``var`` and ``obsm``) annotating those circles.
    """
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    libraries = _legacy_libraries(adata)
    if SPATIAL_KEY not in adata.obsm:
        msg = f"The AnnData has no `obsm[{SPATIAL_KEY!r}]`: the spots have no coordinates. Add the spot centres (full-resolution pixels)."
        raise ValueError(msg)
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        msg = f"`obsm[{SPATIAL_KEY!r}]` must be (n_spots, 2); found shape {xy.shape}."
        raise ValueError(msg)
    xy = xy[:, :2]
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        msg = (
            f"{int(bad.sum())} spots have no coordinates (NaN in `obsm[{SPATIAL_KEY!r}]`; first: "
            f"{adata.obs_names[bad][:3].tolist()}). Drop them, e.g. `adata = adata[np.isfinite(adata.obsm['spatial']).all(1)].copy()`."
        )
        raise ValueError(msg)
    if section_key is not None:
        if section_key not in adata.obs:
            msg = f"No column {section_key!r} in the AnnData's `obs`; found {list(adata.obs.columns)}. Pass `section_key=`."
            raise KeyError(msg)
        labels = adata.obs[section_key].astype(str).to_numpy()
        unknown = sorted(set(labels) - set(libraries))
        if unknown:
            msg = (
                f"`obs[{section_key!r}]` names libraries {unknown} that are not in `uns['spatial']` "
                f"({sorted(libraries)}); `section_key` must name the library column."
            )
            raise ValueError(msg)
    elif len(libraries) == 1:
        labels = np.full(adata.n_obs, next(iter(libraries)), dtype=object)
    else:
        msg = (
            f"The AnnData holds {len(libraries)} libraries {sorted(libraries)}; pass `section_key=` naming the obs "
            "column that says which library each spot belongs to (squidpy's `library_key`)."
        )
        raise ValueError(msg)
    images, shapes = {}, {}
    region = np.empty(adata.n_obs, dtype=object)
    instance = np.zeros(adata.n_obs, dtype=np.int64)
    for lib in [str(s) for s in pd.unique(labels)]:
        entry = libraries[lib]
        found = dict(entry.get("images", {}))
        scalefactors = dict(entry.get("scalefactors", {}))
        name = next((n for n in _LEGACY_IMAGES if n in found), None)
        if name is None:
            msg = f"`uns['spatial'][{lib!r}]['images']` holds no 'hires' or 'lowres' image (found {sorted(found)})."
            raise ValueError(msg)
        scalef = scalefactors.get(f"tissue_{name}_scalef")
        if scalef is None:
            msg = f"`uns['spatial'][{lib!r}]['scalefactors']` lacks 'tissue_{name}_scalef' (found {sorted(scalefactors)})."
            raise ValueError(msg)
        pixels = np.asarray(found[name])
        if pixels.ndim != 3 or pixels.shape[2] < 3:
            msg = f"The {name} image of library {lib!r} has shape {pixels.shape}; expected (y, x, 3) RGB."
            raise ValueError(msg)
        pixels = pixels[..., :3]
        if pixels.dtype != np.uint8:  # scanpy reads PNGs as float in [0, 1]
            scaled = pixels.astype(np.float64) * (255.0 if float(np.nanmax(pixels)) <= 1.0 else 1.0)
            pixels = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        images[f"{lib}_{name}"] = Image2DModel.parse(
            np.ascontiguousarray(np.moveaxis(pixels, -1, 0)), dims=("c", "y", "x"), transformations={lib: Identity()}
        )
        rows = np.flatnonzero(labels == lib)
        diameter = float(scalefactors.get("spot_diameter_fullres", np.nan))
        radius = np.full(len(rows), diameter / 2.0)
        shapes[lib] = ShapesModel.parse(
            xy[rows],
            geometry=0,
            radius=radius,
            index=np.arange(len(rows)),
            transformations={lib: Scale([float(scalef), float(scalef)], axes=("x", "y"))},
        )
        region[rows] = lib
        instance[rows] = np.arange(len(rows))
    obs = adata.obs.copy()
    obs["region"] = pd.Categorical(region)
    obs["spot_id"] = instance
    uns = {k: v for k, v in adata.uns.items() if k not in ("spatial", UNS_KEY, TableModel.ATTRS_KEY)}
    recorded = dict(adata.uns.get(UNS_KEY, {})).get(LAYOUT_KEY)
    if recorded:
        uns[UNS_KEY] = {LAYOUT_KEY: recorded}
    table = AnnData(X=adata.X, obs=obs, var=adata.var, obsm=dict(adata.obsm), layers=dict(adata.layers), uns=uns)
    table = TableModel.parse(table, region=sorted(shapes), region_key="region", instance_key="spot_id")
    view = SpatialData(images=images, shapes=shapes, tables={RAW_TABLE: table})
    _ORIGIN[view] = weakref.ref(adata)
    return view


def cache_owner(sdata: Any) -> Any:
    """The user's object behind ``sdata`` (the AnnData behind a view), for caches that follow it."""
    ref = _ORIGIN.get(sdata)
    owner = ref() if ref is not None else None
    return sdata if owner is None else owner





# --------------------------------------------------------------------------------------------------------------------
# public functions on an AnnData: run on a view, write the results back


def _view_with_state(adata: AnnData) -> SpatialData:
    """The view of ``adata`` plus the ``stpred`` table rebuilt from what earlier calls wrote into ``adata``."""
    import copy

    from spatialdata.models import TableModel

    entry = dict(adata.uns.get(UNS_KEY, {}))
    view = anndata_view(adata, section_key=entry.get(LIBRARY_KEY))
    state = entry.get(ANNDATA_TABLE_KEY)
    if not state:
        return view
    state = copy.deepcopy(dict(state))
    layout = Layout.from_uns(state[LAYOUT_KEY]) if LAYOUT_KEY in state else resolve(view, table_key=RAW_TABLE)
    genes = np.asarray(state["genes"], dtype=str)
    table = stpred_table(view, layout, genes)
    table.uns[UNS_KEY] = state
    for obsm_key, layer in dict(entry.get(ANNDATA_LAYERS_KEY, {})).items():
        if obsm_key in adata.obsm:
            table.layers[str(layer)] = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
    for key in state.get("obsm_keys", []):
        if key in adata.obsm:
            table.obsm[key] = np.asarray(adata.obsm[key])
    raw = view.tables[RAW_TABLE]
    attrs = raw.uns[TableModel.ATTRS_KEY]
    view.tables[STPRED_TABLE] = TableModel.parse(
        table,
        region=attrs[TableModel.REGION_KEY],
        region_key=attrs[TableModel.REGION_KEY_KEY],
        instance_key=attrs[TableModel.INSTANCE_KEY],
    )
    return view


def _write_back(view: SpatialData, adata: AnnData) -> None:
    """Copy what a call wrote into the view's ``stpred`` table into ``adata`` (``uns``/``obsm``), adding only."""
    import copy

    raw_entry = dict(view.tables[RAW_TABLE].uns.get(UNS_KEY, {}))
    entry = dict(adata.uns.get(UNS_KEY, {}))
    if LAYOUT_KEY in raw_entry:
        entry[LAYOUT_KEY] = raw_entry[LAYOUT_KEY]
    table = view.tables.get(STPRED_TABLE)
    if table is not None:
        genes = table.var_names.astype(str)
        state = copy.deepcopy(dict(table.uns.get(UNS_KEY, {})))
        layers = {}
        for layer in table.layers:
            key = layer if layer.startswith("stpred_") else f"stpred_{layer}"
            values = table.layers[layer]
            values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
            adata.obsm[key] = pd.DataFrame(values, index=adata.obs_names, columns=genes)
            layers[key] = layer
        # obs columns the call added (e.g. tl.domains labels), as squidpy adds its results to obs
        raw_obs = view.tables[RAW_TABLE].obs
        for column in table.obs.columns:
            if column not in raw_obs.columns and column not in (SECTION_KEY, PATIENT_KEY):
                adata.obs[column] = table.obs[column].to_numpy()
        obsm_keys = [k for k in table.obsm if k != SPATIAL_KEY]
        for key in obsm_keys:
            adata.obsm[key] = np.asarray(table.obsm[key])
        state["obsm_keys"] = obsm_keys
        entry[ANNDATA_TABLE_KEY] = plain(state)
        entry[ANNDATA_LAYERS_KEY] = layers
    adata.uns[UNS_KEY] = entry


def accepts_anndata(func: F | None = None, *, table_ok: bool = False) -> Any:
    """Let a public function taking ``sdata`` take an AnnData in scanpy's Visium layout too.

    The function runs on a SpatialData view of the AnnData (:func:`anndata_view`, with the ``stpred`` table
    rebuilt from earlier results); on success its results are written back into the AnnData: the ``stpred``
    table's layers as ``obsm["stpred_<layer>"]`` DataFrames (genes as columns), its embeddings under their own
    ``obsm`` keys, ``obs`` columns it added (domain labels) as ``obs`` columns, and its ``uns["stpred"]`` under
    ``uns["stpred"]["table"]``. A failed call writes nothing.
    ``copy=True`` runs on ``adata.copy()`` and returns that AnnData. With ``table_ok=True`` an AnnData without
    ``uns["spatial"]`` is handed to the function as it is (functions that also take the ``stpred`` table itself).
    """
    if func is None:
        return functools.partial(accepts_anndata, table_ok=table_ok)

    @functools.wraps(func)
    def wrapper(sdata: Any, *args: Any, **kwargs: Any) -> Any:
        from anndata import AnnData

        if not isinstance(sdata, AnnData) or (table_ok and "spatial" not in sdata.uns):
            return func(sdata, *args, **kwargs)
        target = sdata
        if kwargs.get("copy") is True:
            target = sdata.copy()
            kwargs["copy"] = False
        view = _view_with_state(target)
        out = func(view, *args, **kwargs)
        if kwargs.get("inplace", True) is not False:
            _write_back(view, target)
        return target if target is not sdata else out

    return wrapper  # type: ignore[return-value]


__all__ = ["accepts_anndata", "anndata_view"]
