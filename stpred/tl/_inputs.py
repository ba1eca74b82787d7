"""Turn a SpatialData object into what a model reads: per-spot arrays keyed by batch key, and model sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import SPATIAL_KEY, STPRED_TABLE, TARGET_LAYER, UNS_KEY, BatchKeys
from .._sections import section_codes

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models import StpredModel
    from ..pp._patches import PatchBank


def target_matrix(table: AnnData) -> np.ndarray:
    """``layers["target"]`` as dense float32, or a KeyError naming :func:`stpred.pp.normalize`."""
    if TARGET_LAYER not in table.layers:
        msg = f"The `stpred` table has no layer {TARGET_LAYER!r}. Run `stpred.pp.normalize(sdata)` first."
        raise KeyError(msg)
    return _dense32(table.layers[TARGET_LAYER])


def _dense32(x: Any) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def model_sizes(cls: type[StpredModel], table: AnnData, *, embedding_key: str | None) -> dict[str, int]:
    """The data-derived sizes a model class declares in ``data_sizes`` (``n_genes``, ``in_dim``)."""
    sizes = {"n_genes": int(table.n_vars)}
    if "in_dim" in cls.data_sizes:
        key = _embedding_key(table, embedding_key)
        sizes["in_dim"] = int(np.asarray(table.obsm[key]).shape[1])
    return sizes


def _embedding_key(table: AnnData, embedding_key: str | None) -> str:
    if embedding_key is None:
        candidates = [k for k in table.obsm if k.startswith("X_emb")]
        if len(candidates) == 1:
            return candidates[0]
        msg = (
            "This model reads patch embeddings: pass `embedding_key=` naming an entry of `obsm` "
            f"(found {sorted(table.obsm)}), or run `stpred.pp.embed(sdata, encoder=...)` first."
        )
        raise KeyError(msg)
    if embedding_key not in table.obsm:
        msg = (
            f"No embedding {embedding_key!r} in `obsm` of the `stpred` table; found {sorted(table.obsm)}. "
            "Run `stpred.pp.embed(sdata, encoder=..., key_added=...)` first."
        )
        raise KeyError(msg)
    return embedding_key


def model_arrays(
    sdata: SpatialData,
    table: AnnData,
    model: StpredModel,
    *,
    embedding_key: str | None = None,
    patches: PatchBank | None = None,
    with_target: bool = True,
    table_key: str = STPRED_TABLE,
) -> dict[str, np.ndarray]:
    """Per-row arrays for every batch key the model reads (all rows of ``table``); writes nothing to ``sdata``."""
    needed = set(model.inputs)
    arrays: dict[str, np.ndarray] = {}
    if needed & {BatchKeys.SPOT, BatchKeys.CONTEXT}:
        bank = _patch_bank(sdata, table, model, patches)
        arrays[BatchKeys.SPOT] = bank.spot
        if BatchKeys.CONTEXT in needed:
            if bank.context is None:
                msg = "The patch bank has no context crops; run `stpred.pp.extract_patches(sdata, context_size=...)`."
                raise KeyError(msg)
            arrays[BatchKeys.CONTEXT] = bank.context
    if BatchKeys.EMBEDDING in needed:
        key = _embedding_key(table, embedding_key)
        emb = np.asarray(table.obsm[key], dtype=np.float32)
        expected = model.sizes().get("in_dim", emb.shape[1])
        if emb.shape[1] != expected:
            msg = f"Embedding {key!r} has {emb.shape[1]} dimensions; the model expects {expected}."
            raise ValueError(msg)
        if not np.isfinite(emb).all():
            msg = f"Embedding {key!r} contains NaN or infinite values; recompute it with `stpred.pp.embed`."
            raise ValueError(msg)
        arrays[BatchKeys.EMBEDDING] = emb
    if BatchKeys.COORDS in needed:
        arrays[BatchKeys.COORDS] = _lattice(table, table_key)
    if BatchKeys.SLIDE in needed:
        arrays[BatchKeys.SLIDE] = section_codes(table)[0]
    if with_target:
        arrays[BatchKeys.TARGET] = target_matrix(table)
    return arrays


def _lattice(table: AnnData, table_key: str) -> np.ndarray:
    """``obsm["lattice"]`` when :func:`stpred.pp.lattice` wrote it, else the default lattice, computed in memory."""
    from ..pp._lattice import compute_lattice

    key = table.uns.get(UNS_KEY, {}).get("lattice", {}).get("key", "lattice")
    if key in table.obsm:
        return np.asarray(table.obsm[key], dtype=np.int64)
    if SPATIAL_KEY not in table.obsm:
        msg = "This model reads lattice coordinates: run `stpred.pp.lattice(sdata)` first."
        raise KeyError(msg)
    return compute_lattice(table, table_key=table_key)[0]


def _patch_bank(sdata: SpatialData, table: AnnData, model: StpredModel, patches: PatchBank | None) -> PatchBank:
    from ..pp._patches import get_patch_bank

    size, context = model.crop_sizes
    if BatchKeys.CONTEXT not in model.inputs:
        context = None
    bank = patches if patches is not None else get_patch_bank(sdata, size=size, context_size=context)
    if size is not None and bank.size != size:
        msg = (
            f"The model needs {size} px spot crops but the patch bank holds {bank.size} px ones; run "
            f"`stpred.pp.extract_patches(sdata, size={size}, context_size={context})`."
        )
        raise ValueError(msg)
    if context is not None and bank.context_size != context:
        msg = (
            f"The model needs {context} px context crops but the patch bank holds {bank.context_size} px ones; run "
            f"`stpred.pp.extract_patches(sdata, size={size}, context_size={context})`."
        )
        raise ValueError(msg)
    bank.check_aligned(table)
    return bank
