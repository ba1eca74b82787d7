"""Predict on tiles (``tl.predict(..., region=<shapes key>)``): crops at the training geometry around tile centres.

The tiles come from :func:`stpred.pp.tile` (or any shapes element annotated by a table with ``region`` /
``instance_key``, a ``section`` column and ``uns["stpred"]["mpp"]``). Each model crop is cut around a tile's
centre with the patch extractor of :func:`stpred.pp.extract_patches`, at the microns per crop pixel the model was
trained with (recorded by :func:`stpred.tl.fit` as ``info["geometry"]``), so a tile centred on a training spot gets
exactly that spot's prediction. HiST's embeddings are recomputed from such crops with the encoder recorded in the
training embedding's recipe, and its lattice is built from the tile centres at the training lattice unit. The crop
size is the model's, whatever the tile size: tiles smaller than the
training spots give a denser map of predictions whose inputs overlap (see :doc:`/he_only`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, REGION_KEY, SECTION_KEY, UNS_KEY, BatchKeys
from .._provenance import plain, record, stpred_uns

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models import StpredModel
    from ..pp._patches import PatchBank
    from ._infer import Prepared

#: Batch keys that region prediction can supply (crops, embeddings of crops, lattice, section index).
_CROP_INPUTS = {BatchKeys.SPOT, BatchKeys.CONTEXT, BatchKeys.SLIDE, BatchKeys.EMBEDDING, BatchKeys.COORDS}


def training_geometry(
    sdata: SpatialData,
    model: StpredModel,
    *,
    patches: PatchBank | None,
    train_sections: list[str],
    table: AnnData | None = None,
    embedding_key: str | None = None,
) -> dict[str, Any] | None:
    """Crop sizes and microns per crop pixel of the model's inputs (``None`` when they cannot be rebuilt).

    Crop models: the patch bank's geometry. Embedding + lattice models (HiST): the recipe of the embedding
    (encoder, weights, crop size and µm per pixel, normalisation) and the lattice unit of the training sections.
    """
    from ..pp._patches import get_patch_bank

    if BatchKeys.EMBEDDING in model.inputs:
        if table is None:
            return None
        from ._inputs import _embedding_key

        return _embedding_geometry(table, _embedding_key(table, embedding_key), train_sections)
    if not set(model.inputs) & {BatchKeys.SPOT, BatchKeys.CONTEXT}:
        return None
    size, context = model.crop_sizes
    if BatchKeys.CONTEXT not in model.inputs:
        context = None
    bank = patches if patches is not None else get_patch_bank(sdata, size=size, context_size=context)
    mpp = bank.mpp
    if mpp is None:  # native crops: their scale is the sections' own µm per pixel, when it is known and shared
        native = {float(bank.native_mpp[s]) for s in train_sections if s in bank.native_mpp}
        mpp = native.pop() if len(native) == 1 and all(s in bank.native_mpp for s in train_sections) else None
    return {
        "spot_size": int(bank.size),
        "context_size": None if context is None else int(bank.context_size),
        "mpp": None if mpp is None else float(mpp),
        "spot_um": None if mpp is None else float(bank.size * mpp),
        "native": bank.mpp is None,
    }


def _embedding_geometry(table: AnnData, embedding_key: str | None, train_sections: list[str]) -> dict[str, Any] | None:
    from ..pp._lattice import compute_lattice

    uns = table.uns.get(UNS_KEY, {})
    recipe = dict(uns.get("embeddings", {}).get(embedding_key, {})) if embedding_key else {}
    if not recipe:
        return None  # an embedding not made by pp.embed cannot be rebuilt on tiles
    mpp = recipe.get("mpp")
    if mpp is None:
        native = {float(uns.get("mpp", {}).get(s, float("nan"))) for s in train_sections}
        mpp = native.pop() if len(native) == 1 else None
        mpp = None if mpp is None or not np.isfinite(mpp) else mpp
    units = dict(uns.get("lattice", {}).get("unit_um", {}))
    if not all(s in units for s in train_sections):
        try:
            units = compute_lattice(table)[1]
        except (KeyError, ValueError):
            units = {}
    unit = {float(units[s]) for s in train_sections if s in units}
    return {
        "spot_size": int(recipe["size"]),
        "context_size": None,
        "mpp": None if mpp is None else float(mpp),
        "spot_um": None if mpp is None else float(recipe["size"] * mpp),
        "native": recipe.get("mpp") is None,
        "embedding": plain(recipe),
        "lattice_unit_um": unit.pop() if len(unit) == 1 else None,
    }


def find_region_table(sdata: SpatialData, region: str) -> str:
    """The key of the one table annotating the shapes ``region``."""
    if not isinstance(region, str) or region not in sdata.shapes:
        found = sorted(sdata.shapes) if hasattr(sdata, "shapes") else []
        msg = f"`region` must name a shapes element (e.g. from `stpred.pp.tile`); found {region!r}, shapes: {found}."
        raise KeyError(msg)
    keys = []
    for key, table in sdata.tables.items():
        attrs = table.uns.get("spatialdata_attrs", {})
        regions = attrs.get("region", [])
        regions = [regions] if isinstance(regions, str) else list(regions)
        if region in regions:
            keys.append(key)
    if len(keys) != 1:
        msg = (
            f"Expected one table annotating shapes {region!r}, found {keys}. Make the tiles with "
            "`stpred.pp.tile(sdata, ...)`, which writes the shapes and their table together."
        )
        raise KeyError(msg)
    return keys[0]


def check_region_model(predictor: Any) -> None:
    """Refuse models whose inputs cannot be built from crops around tile centres, naming the way out."""
    from ._ensemble import EnsemblePredictor

    members = predictor.members if isinstance(predictor, EnsemblePredictor) else [predictor]
    for member in members:
        extra = sorted(set(member.model.inputs) - _CROP_INPUTS)
        if extra:
            msg = (
                f"Region prediction cuts crops around tile centres; the {member.name!r} model reads {extra}, which "
                "it cannot build from tiles yet. For HiST, run `stpred.pp.extract_patches` and `stpred.pp.embed` "
                "on a table of the tiles and predict through it; or use a crop-based model (HiFusion, MMAP)."
            )
            raise ValueError(msg)
        geometry = member.info.get("geometry")
        if BatchKeys.EMBEDDING in member.model.inputs and (not geometry or "embedding" not in geometry):
            msg = (
                f"The {member.name!r} predictor reads embeddings but does not record how they were made "
                "(`stpred.pp.embed` recipe), so the tiles cannot be embedded the same way. Refit it with "
                "`stpred.tl.fit` on embeddings from `stpred.pp.embed`."
            )
            raise ValueError(msg)
        if BatchKeys.COORDS in member.model.inputs and (not geometry or geometry.get("lattice_unit_um") is None):
            msg = (
                f"The {member.name!r} predictor does not record the lattice unit of its training sections; refit "
                "it with `stpred.tl.fit` after `stpred.pp.lattice(sdata)`."
            )
            raise ValueError(msg)
        if not geometry or geometry.get("mpp") is None:
            msg = (
                f"The {member.name!r} predictor does not record the microns per pixel of its training crops "
                "(trained before stpred recorded it, or on sections without `uns['stpred']['mpp']`), so the tiles "
                "cannot be cropped at the same scale. Refit it with `stpred.tl.fit` on sections with a known mpp."
            )
            raise ValueError(msg)


def _tile_sections(table: AnnData) -> tuple[np.ndarray, dict[str, float]]:
    missing = [k for k in (REGION_KEY, INSTANCE_KEY, SECTION_KEY) if k not in table.obs]
    if missing:
        msg = f"The tiles table needs `obs` columns {missing}; make the tiles with `stpred.pp.tile`."
        raise KeyError(msg)
    sections = table.obs[SECTION_KEY].astype(str).to_numpy()
    mpps = {str(k): float(v) for k, v in dict(table.uns.get(UNS_KEY, {}).get("mpp", {})).items()}
    unknown = sorted(set(sections) - set(mpps))
    if unknown:
        msg = (
            f"The microns per pixel of section(s) {unknown} are unknown (`uns['stpred']['mpp']` of the tiles "
            "table), so crops cannot be cut at the model's training scale. Pass `mpp=` to `stpred.pp.tile`."
        )
        raise ValueError(msg)
    return sections, mpps


def tile_crops(sdata: SpatialData, table: AnnData, geometry: dict[str, Any], inputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Spot (and context) crops around every tile centre, at the training geometry, in table order."""
    from ..pp._patches import _cut_section, _plan_section

    sections, mpps = _tile_sections(table)
    sizes = {"spot": int(geometry["spot_size"])}
    if BatchKeys.CONTEXT in inputs:
        sizes["context"] = int(geometry["context_size"])
    outputs = {k: np.zeros((table.n_obs, 3, s, s), dtype=np.uint8) for k, s in sizes.items()}

    class _NoBar:
        def update(self, n: int) -> None:
            pass

    for section in pd.unique(sections):
        rows = np.flatnonzero(sections == section)
        plan = _plan_section(
            sdata, table, section, rows, sizes=sizes, mpp=float(geometry["mpp"]), native_mpp=mpps[section]
        )
        _cut_section(plan, outputs, sizes, _NoBar())
    arrays = {BatchKeys.SPOT: outputs["spot"]}
    if "context" in outputs:
        arrays[BatchKeys.CONTEXT] = outputs["context"]
    codes = pd.Categorical(sections, categories=list(pd.unique(sections))).codes.astype(np.int64)
    arrays[BatchKeys.SLIDE] = codes
    if BatchKeys.EMBEDDING in inputs:
        arrays[BatchKeys.EMBEDDING] = _embed_crops(arrays.pop(BatchKeys.SPOT), geometry["embedding"])
    if BatchKeys.COORDS in inputs:
        from ..pp._lattice import compute_lattice

        unit = float(geometry["lattice_unit_um"])
        try:
            arrays[BatchKeys.COORDS] = compute_lattice(table, unit_um=unit)[0]
        except ValueError as err:
            msg = (
                f"The tiles do not fit on HiST's training lattice (unit {unit:g} µm): {err} HiST places each tile on "
                f"the lattice of its training spots, so tile at a stride of at least {unit:g} µm "
                f"(`stpred.pp.tile(..., stride_um={unit:g})`), or predict these tiles with HiFusion or MMAP."
            )
            raise ValueError(msg) from None
    return arrays


def _embed_crops(crops: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    """Embed crops with the encoder of a :func:`stpred.pp.embed` recipe, checking that it is the same encoder."""
    from ..pp._embed import _build, _device, _Encoder, _input_size, _resolve_name, _run, _sha256_file, _sha256_state

    kwargs = dict(recipe.get("encoder_kwargs") or {})
    name, spec = _resolve_name(recipe["encoder"], weights=None, encoder_kwargs={})
    if spec is None:
        msg = f"The training embedding came from a user module ({name!r}); embed the tiles with it yourself."
        raise ValueError(msg)
    weights = recipe.get("weights")
    path = None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            msg = f"The encoder weights of the training embedding, {weights!r}, are not on this machine; copy them there."
            raise FileNotFoundError(msg)
    seed = int(recipe.get("seed") or 0)
    module = _build(name, spec, path, kwargs, seed=seed)
    sha = _sha256_file(path) if path is not None else _sha256_state(module)
    if recipe.get("weights_sha256") and sha != recipe["weights_sha256"]:
        msg = (
            f"The encoder {name!r} built here differs from the one that made the training embedding (weights "
            f"sha256 {sha[:12]}… vs {str(recipe['weights_sha256'])[:12]}…); use the same weights and versions."
        )
        raise ValueError(msg)
    enc = _Encoder(module, name, spec.family, sha, seed if path is None else None, _input_size(module))
    emb, _ = _run(enc, crops, device=_device(None), batch_size=64, normalize=recipe.get("normalize", "imagenet"), progress=False)
    return np.asarray(emb, dtype=np.float32)


def prepare_tiles(member: Any, arrays: dict[str, np.ndarray], *, batch_size: int | None) -> Prepared:
    """A :class:`~stpred.tl._infer.Prepared` store over the tile crops for one predictor."""
    from ..train import TensorStore
    from ._infer import Prepared

    needed = {k: v for k, v in arrays.items() if k in member.model.inputs}
    store = TensorStore(needed)
    codes = arrays[BatchKeys.SLIDE]
    groups = [np.flatnonzero(codes == c) for c in np.unique(codes)]
    member.model.prepare_slides(store, groups)
    rows = np.concatenate(groups)
    train_bs = int(member.info.get("batch_size") or 32)
    order = np.arange(len(member.genes))
    return Prepared(store, groups, np.argsort(rows, kind="stable"), order, batch_size or max(64, train_bs))


def predict_region(
    sdata: SpatialData,
    predictor: Any,
    region: str,
    *,
    key_added: str | None,
    overwrite: bool,
    uncertainty: str | None,
    n_samples: int,
    ood: bool | None,
    seed: int,
    batch_size: int | None,
    device: str | None,
    progress: bool,
) -> None:
    """Predict every tile of ``region`` and write the tiles table with the genes, the layers and the provenance."""
    from anndata import AnnData
    from scipy import sparse
    from spatialdata.models import TableModel

    from .._constants import prediction_layer
    from ._uncertainty import check_options, predict_extras

    table_key = find_region_table(sdata, region)
    table = sdata.tables[table_key]
    check_region_model(predictor)
    with_ood = check_options(predictor, uncertainty=uncertainty, n_samples=n_samples, ood=ood)
    key = key_added or prediction_layer(predictor.name)
    std_key, ood_key, flag_key = f"{key}_std", f"{key}_ood", f"{key}_ood_flag"
    genes = list(predictor.genes)
    same_genes = table.n_vars == len(genes) and list(map(str, table.var_names)) == genes
    if table.n_vars and not same_genes:
        msg = (
            f"The tiles table {table_key!r} already holds {table.n_vars} genes that differ from the predictor's "
            f"{len(genes)}; predict into fresh tiles (`stpred.pp.tile(..., key_added=...)`)."
        )
        raise ValueError(msg)
    written = [(table.layers, key), *([(table.layers, std_key)] if uncertainty else [])]
    written += [(table.obs, ood_key), (table.obs, flag_key)] if with_ood else []
    taken = [k for where, k in written if k in where]
    if taken and not overwrite:
        msg = f"{taken} already exist in table {table_key!r}; pass `overwrite=True` or choose another `key_added`."
        raise ValueError(msg)
    first = predictor.members[0] if hasattr(predictor, "members") else predictor
    geometry = dict(first.info["geometry"])
    arrays = tile_crops(sdata, table, geometry, tuple(first.model.inputs))
    sections = sorted(set(table.obs[SECTION_KEY].astype(str)))
    extras = predict_extras(
        predictor, sdata, sections, uncertainty=uncertainty, n_samples=n_samples, ood=with_ood, seed=seed,
        batch_size=batch_size, device=device, progress=progress,
        prepare_member=lambda member: prepare_tiles(member, arrays, batch_size=batch_size),
    )  # fmt: skip

    # ------------------------------------------------------------------ write (nothing changed before this point)
    if not same_genes:
        attrs = dict(table.uns.get("spatialdata_attrs", {}))
        new = AnnData(
            X=sparse.csr_matrix((table.n_obs, len(genes)), dtype=np.float32),
            obs=table.obs.copy(),
            var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
            obsm={k: np.asarray(v).copy() for k, v in table.obsm.items()},
            uns={k: v for k, v in table.uns.items() if k != "spatialdata_attrs"},
        )
        table = TableModel.parse(
            new, region=attrs.get("region"), region_key=attrs.get("region_key"), instance_key=attrs.get("instance_key")
        )
    table.layers[key] = extras.mean.astype(np.float32)
    if extras.std is None:
        table.layers.pop(std_key, None)
    if extras.ood_score is None:
        table.obs.drop(columns=[c for c in (ood_key, flag_key) if c in table.obs], inplace=True)
    if extras.std is not None:
        table.layers[std_key] = extras.std.astype(np.float32)
    if extras.ood_score is not None:
        table.obs[ood_key], table.obs[flag_key] = extras.ood_score, extras.ood_flag
    uns = stpred_uns(table)
    uns.setdefault("normalize", dict(predictor.normalize))
    entry = {
        "model": predictor.name,
        "region": region,
        "sections": sections,
        "genes": genes,
        "normalize": predictor.normalize,
        "geometry": geometry,
        "seed": predictor.info.get("seed"),
        "train_sections": predictor.info.get("train_sections"),
        "config": predictor.info.get("config"),
        "checkpoint": predictor.info.get("checkpoint"),
        "versions": predictor.info.get("versions"),
        **({"ensemble": predictor.info["ensemble"]} if "ensemble" in predictor.info else {}),
        **extras.provenance,
    }
    predictions = dict(uns.get("predictions", {}))
    predictions[key] = plain(entry)
    uns["predictions"] = predictions
    record(
        table, "tl.predict", model=predictor.name, key_added=key, region=region,
        **({"uncertainty": uncertainty, "n_samples": n_samples} if uncertainty else {}),
        **({"ood": True} if with_ood else {}),
    )  # fmt: skip
    sdata.tables[table_key] = table
