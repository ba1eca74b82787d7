"""One embedding per spot from its spot crop, with a named or user-supplied image encoder, cached in the table."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import IMAGENET_MEAN, IMAGENET_STD, STPRED_TABLE
from .._docs import doc_params, doc_sdata_any
from .._provenance import plain, record, stpred_uns
from .._validate import check_one_of, get_table
from ..io._anndata import accepts_anndata

if TYPE_CHECKING:
    import os

    import torch
    from anndata import AnnData
    from spatialdata import SpatialData
    from torch import nn

    from ._patches import PatchBank

logger = logging.getLogger(__name__)

__all__ = ["embed", "list_encoders"]

_NORMALIZE = ("imagenet", "standardize", "none")
#: Prefix of hub references accepted by ``weights=`` (downloaded with ``huggingface_hub`` when online).
_HUB_PREFIX = "hf-hub:"
#: Key under ``uns["stpred"]`` where embedding recipes (and their cache keys) are kept.
_UNS_EMBEDDINGS = "embeddings"
#: Embeddings kept on the accelerator before one copy to the host (bounds device memory on large slides).
_FLUSH_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class _Spec:
    """How to build a named encoder: its family, the constructor name, default options and published weights."""

    family: Literal["resnet", "vit"]
    arch: str
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the published checkpoint (:mod:`stpred.models.encoders.pretrained`); ``None``: random init by default
    pretrained: Any = None


def _pretrained_specs() -> dict[str, _Spec]:
    from ..models.encoders.pretrained import PRETRAINED

    return {name: _Spec(p.family, p.arch, {}, p) for name, p in PRETRAINED.items()}


#: Canonical encoder name → how to build it (sizes can be overridden through ``**encoder_kwargs``). The published
#: encoders (UNI, UNI2-h, H-optimus-0, Virchow, CONCH's vision trunk, ResNet-50 ImageNet) load their checkpoints.
_ENCODERS: dict[str, _Spec] = {
    "resnet10": _Spec("resnet", "resnet10"),
    "resnet18": _Spec("resnet", "resnet18"),
    "resnet34": _Spec("resnet", "resnet34"),
    "resnet50": _Spec("resnet", "resnet50"),
    "vit_tiny": _Spec("vit", "vit_tiny_patch16_224"),
    "vit_small": _Spec("vit", "vit_small_patch16_224"),
    "vit_base": _Spec("vit", "vit_base_patch16_224"),
    "vit_large": _Spec("vit", "vit_large_patch16_224"),
    **_pretrained_specs(),
}
#: Other accepted spellings (timm's full names, the model cards' names) → canonical name.
_ALIASES = {
    "vit_tiny_patch16_224": "vit_tiny",
    "vit_small_patch16_224": "vit_small",
    "vit_base_patch16_224": "vit_base",
    "vit_large_patch16_224": "vit_large",
    "uni2-h": "uni2_h",
    "uni2": "uni2_h",
    "h-optimus-0": "h_optimus_0",
    "hoptimus0": "h_optimus_0",
    "resnet50-imagenet": "resnet50_imagenet",
}
# file (resolved path, size, mtime) -> sha256, so a large checkpoint is hashed once per session
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def list_encoders() -> list[str]:
    """Names accepted by ``stpred.pp.embed(encoder=...)``.

    Returns
    -------
    Sorted canonical names and aliases (``"resnet18"``, ``"uni"``, ``"virchow"``, ``"vit_large_patch16_224"``,
    ...). The published encoders among them are the keys of
    :data:`stpred.models.encoders.pretrained.PRETRAINED`.

    Examples
    --------
    >>> import stpred
    >>> "uni2_h" in stpred.pp.list_encoders()
    True
    """
    return sorted([*_ENCODERS, *_ALIASES])


@dataclass
class _Encoder:
    """A resolved encoder: the module and everything that identifies its output."""

    module: nn.Module
    name: str
    family: str  # "resnet", "vit" or "user"
    weights_sha256: str
    seed: int | None
    input_size: tuple[int, int] | None
    #: channel statistics of ``normalize="imagenet"`` (the published ones for a named pretrained encoder)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# --------------------------------------------------------------------------------------------------------------------
# checks


def _check_int(value: Any, *, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = "a positive int or None" if allow_none else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        msg = f"Expected `{name}` to be {kind}, found {value!r}."
        raise TypeError(msg)
    if value <= 0:
        msg = f"Expected `{name}` to be {kind}, found {value!r}."
        raise ValueError(msg)


def _resolve_name(encoder: Any, *, weights: Any, encoder_kwargs: dict[str, Any]) -> tuple[str, _Spec | None]:
    """Canonical name and build spec of ``encoder`` (``None`` spec for a user module)."""
    from torch import nn

    if isinstance(encoder, nn.Module):
        if weights is not None or encoder_kwargs:
            given = (["weights"] if weights is not None else []) + sorted(encoder_kwargs)
            msg = (
                f"{given} only apply to named encoders; encoder is a {type(encoder).__name__} module. Build and load "
                "your module yourself before passing it."
            )
            raise ValueError(msg)
        return type(encoder).__name__, None
    if not isinstance(encoder, str):
        msg = f"Expected `encoder` to be an encoder name or a torch.nn.Module, found {type(encoder).__name__}."
        raise TypeError(msg)
    name = _ALIASES.get(encoder.lower(), encoder.lower())
    if name not in _ENCODERS:
        msg = f"Unknown encoder {encoder!r}; available: {list_encoders()}, or pass a torch.nn.Module."
        raise ValueError(msg)
    return name, _ENCODERS[name]


def _resolve_weights(weights: Any) -> str | Path | None:
    """Check ``weights`` without any download: a local file that exists, or an ``hf-hub:`` reference."""
    if weights is None:
        return None
    if isinstance(weights, str) and weights.startswith(_HUB_PREFIX):
        ref = weights.removeprefix(_HUB_PREFIX)
        if len([p for p in ref.split("/") if p]) < 2:
            msg = (
                f"Expected a hub reference 'hf-hub:<owner>/<repo>[/<file>]', found {weights!r} "
                "(e.g. 'hf-hub:MahmoodLab/UNI')."
            )
            raise ValueError(msg)
        if importlib.util.find_spec("huggingface_hub") is None:
            msg = (
                f"weights={weights!r} needs the optional package `huggingface_hub` (and internet access): "
                "`pip install huggingface_hub`. Or download the file on a machine with internet access and pass "
                "its local path as `weights=`."
            )
            raise ImportError(msg)
        return weights
    if not isinstance(weights, str) and not hasattr(weights, "__fspath__"):
        msg = f"Expected `weights` to be a file path, an 'hf-hub:' reference or None, found {type(weights).__name__}."
        raise TypeError(msg)
    path = Path(weights).expanduser()
    if not path.is_file():
        msg = f"No weights file at {str(path)!r}. Pass the path of a local state dict saved with `torch.save`."
        raise FileNotFoundError(msg)
    return path


def _weights_path(name: str, spec: _Spec | None, weights_ref: str | Path | None) -> Path | None:
    """Local weights file of a named encoder: as given, the published checkpoint (local copy or download), or none."""
    from ..models.encoders.pretrained import fetch_weights, hub_download

    if spec is not None and spec.pretrained is not None:
        return fetch_weights(name, weights=weights_ref)
    if isinstance(weights_ref, str):
        return hub_download(weights_ref)
    return weights_ref


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        msg = f"Expected `device` to be a torch device such as 'cpu' or 'cuda', found {device!r}."
        raise ValueError(msg) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={device!r} was asked for but CUDA is not available; pass device='cpu' or device=None."
        raise ValueError(msg)
    return dev


# --------------------------------------------------------------------------------------------------------------------
# checksums and cache key


def _sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        with path.open("rb") as fh:
            _FILE_HASHES[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _FILE_HASHES[key]


def _sha256_state(module: nn.Module) -> str:
    """sha256 over a module's state dict: every entry's name, dtype, shape and raw bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# building


def _vit_img_size(spec: _Spec, kwargs: dict[str, Any]) -> int:
    from ..models.encoders.vit import VisionTransformer

    if spec.pretrained is not None and spec.pretrained.img_size is not None:
        default = spec.pretrained.img_size
    else:
        default = inspect.signature(VisionTransformer).parameters["img_size"].default
    return int(kwargs.get("img_size", default))


def _construct(name: str, spec: _Spec, weights: Path | None, kwargs: dict[str, Any]) -> nn.Module:
    from ..models.encoders import resnet, vit

    try:
        if spec.family == "resnet":
            return getattr(resnet, spec.arch)(weights=weights, **kwargs)
        if weights is not None:
            return vit.from_checkpoint(weights, arch=spec.arch, **kwargs)
        return vit.create_vit(spec.arch, **kwargs)
    except TypeError as err:
        msg = f"Encoder {name!r} does not accept the options {sorted(kwargs)}: {err}"
        raise TypeError(msg) from err


def _build(name: str, spec: _Spec, weights: Path | None, kwargs: dict[str, Any], *, seed: int) -> nn.Module:
    """Build a named encoder: load ``weights`` strictly, or initialise it randomly with ``seed``."""
    import torch

    if weights is not None:
        return _construct(name, spec, weights, kwargs)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        return _construct(name, spec, None, kwargs)


def _input_size(module: nn.Module) -> tuple[int, int] | None:
    """Image size a module expects (``img_size``, or ``patch_embed.img_size`` as in timm), or ``None`` for any."""
    for owner in (module, getattr(module, "patch_embed", None)):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int | np.integer) and not isinstance(size, bool):
            return int(size), int(size)
        if isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(s, int | np.integer) for s in size):
            return int(size[0]), int(size[1])
    return None


# --------------------------------------------------------------------------------------------------------------------
# running


def _prepare(
    x: torch.Tensor,
    *,
    normalize: str,
    size: tuple[int, int] | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """``uint8`` crops ``(B, 3, S, S)`` on the device → float32 encoder input (resized, then normalised)."""
    import torch.nn.functional as F

    from .._imaging import imagenet_normalize, standardize

    x = x.float()
    if size is not None and tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if normalize == "standardize":
        return standardize(x)
    x = x / 255.0
    return imagenet_normalize(x, mean=mean, std=std) if normalize == "imagenet" else x


def _check_output(y: Any, *, n: int, name: str, shape: tuple[int, ...]) -> None:
    import torch

    if not isinstance(y, torch.Tensor):
        msg = f"Encoder {name!r} must return a tensor of shape (B, D), found a {type(y).__name__}."
        raise TypeError(msg)
    if y.ndim != 2 or y.shape[0] != n:
        msg = (
            f"Encoder {name!r} must map images (B, 3, H, W) to 2-D embeddings (B, D); for input shape {shape} it "
            f"returned shape {tuple(y.shape)}. Pool or flatten its output (e.g. wrap it in a module that returns "
            "`features.mean((-2, -1))`)."
        )
        raise ValueError(msg)


def _run(
    enc: _Encoder,
    crops: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    normalize: str,
    progress: bool,
) -> tuple[np.ndarray, str]:
    """Embed ``crops`` batch by batch; only one batch is ever converted to float. Returns ``(N, D)`` and precision."""
    import torch
    from tqdm.auto import tqdm

    n = len(crops)
    cuda = device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    precision = "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    channels_last = enc.family == "resnet"  # a user module may `view` its input: keep it contiguous
    module = enc.module.to(device).eval()
    if enc.family == "resnet":
        module = module.to(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )

    out: np.ndarray | None = None
    pending: list[torch.Tensor] = []  # device outputs not yet copied to ``out``
    done = 0  # rows of ``out`` written

    def flush() -> None:
        nonlocal done
        if pending:
            block = torch.cat(pending).cpu().numpy()
            out[done : done + len(block)] = block  # type: ignore[index]
            done += len(block)
            pending.clear()

    with (
        torch.inference_mode(),
        tqdm(total=n, desc=f"embed ({enc.name})", unit="spot", disable=not progress) as pbar,
    ):
        for lo in range(0, n, batch_size):
            chunk = crops[lo : lo + batch_size]
            if not chunk.flags.writeable or not chunk.flags.c_contiguous:
                chunk = np.array(chunk, copy=True, order="C")
            x = torch.from_numpy(chunk)
            if cuda:
                x = x.pin_memory()  # asynchronous copy: the host prepares the next batch while the GPU works
            x = x.to(device, non_blocking=cuda)
            x = _prepare(x, normalize=normalize, size=enc.input_size, mean=tuple(enc.mean), std=tuple(enc.std))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                y = module(x)
            _check_output(y, n=len(chunk), name=enc.name, shape=tuple(x.shape))
            y = y.float()
            if out is None:
                out = np.empty((n, y.shape[1]), dtype=np.float32)
            pending.append(y)
            if device.type == "cpu" or sum(t.numel() for t in pending) * 4 >= _FLUSH_BYTES:
                flush()
            pbar.update(len(chunk))
        flush()
    if out is None:  # no crops
        out = np.empty((0, 0), dtype=np.float32)
    return out, precision


# --------------------------------------------------------------------------------------------------------------------
# public


def _existing(table: AnnData, key: str) -> dict[str, Any] | None:
    entries = stpred_uns(table).get(_UNS_EMBEDDINGS, {})
    entry = entries.get(key) if hasattr(entries, "get") else None
    return dict(entry) if entry is not None else None


def _describe(fields: dict[str, Any]) -> str:
    weights = fields.get("weights_sha256", "")[:12]
    return (
        f"encoder={fields.get('encoder')!r}, weights sha256 {weights}…, options {fields.get('encoder_kwargs')}, "
        f"size={fields.get('size')}, mpp={fields.get('mpp')}, normalize={fields.get('normalize')!r}"
    )


@accepts_anndata
@doc_params(sdata=doc_sdata_any)
def embed(
    sdata: SpatialData,
    *,
    encoder: str | nn.Module,
    key_added: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    weights: str | os.PathLike | None = None,
    size: int | None = None,
    table_key: str = STPRED_TABLE,
    normalize: Literal["imagenet", "standardize", "none"] = "imagenet",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **encoder_kwargs: Any,
) -> None:
    """Embed every spot's crop with an image encoder and store one vector per spot in ``obsm``.

    The spot crops come from the patch bank of :func:`stpred.pp.extract_patches`. They are handled one batch at a
    time (only the current batch is converted from ``uint8`` to float), on the GPU when one is present (bf16
    autocast, channels_last for CNNs), under :func:`torch.inference_mode`.

    Each input batch is converted to float, resized to the encoder's input size when it has one and the crops
    differ (a ViT's ``img_size``, e.g. 224; antialiased bilinear :func:`torch.nn.functional.interpolate` on the
    device; CNNs take the crops as they are), then normalised.

    The result is cached: the recipe (encoder name, sha256 of the weights, encoder options, patch geometry,
    normalisation) is stored with the embedding, and a second call with the same ``key_added`` and the same recipe
    returns at once without running the encoder. The weights checksum is the sha256 of the weights file, or, for a
    randomly initialised or user-supplied module, of its state-dict tensors.

    Parameters
    ----------
    {sdata}
    encoder
        A name from :func:`stpred.pp.list_encoders`. Architectures, randomly initialised unless ``weights`` is
        given: ``"resnet10"``, ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` (:mod:`stpred.models.encoders.resnet`,
        pooled features), ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"``, ``"vit_large"`` (also as timm's
        ``"vit_large_patch16_224"`` etc.; the CLS token). Published encoders, which always load their checkpoint
        (see ``weights``; :data:`stpred.models.encoders.pretrained.PRETRAINED`): ``"uni"`` (ViT-L/16, 1024-d),
        ``"uni2_h"`` (1536-d), ``"h_optimus_0"`` (1536-d), ``"virchow"`` (CLS token and mean patch token, 2560-d),
        ``"conch"`` (CONCH's ViT-B/16 vision trunk at 448 px, 768-d CLS token) and ``"resnet50_imagenet"``
        (torchvision's ImageNet ResNet-50, 2048-d). Or any :class:`torch.nn.Module` mapping float images
        ``(B, 3, H, W)`` to ``(B, D)``; it is set to eval mode and moved to ``device`` for the call (both restored
        afterwards), and its class name names it.
    key_added
        Key in ``obsm`` of the table; default ``"X_emb_<name>"`` (e.g. ``"X_emb_resnet18"``), the prefix
        :func:`stpred.tl.fit` looks for.
    batch_size
        Crops per forward pass.
    device
        Torch device; ``None`` uses CUDA when available, else the CPU.
    weights
        Local state-dict file for a named encoder, in torchvision (ResNet) or timm (ViT) naming, loaded strictly
        (every key and shape must fit; CONCH's full checkpoint is read under its ``visual.trunk.`` prefix).
        ``"hf-hub:<owner>/<repo>[/<file>]"`` (default file ``pytorch_model.bin``; e.g. ``"hf-hub:MahmoodLab/UNI"``,
        gated) downloads the file with the optional package ``huggingface_hub`` when online, then loads it like a
        local file. ``None``: a published encoder uses its local copy ``$STPRED_WEIGHTS_DIR/<name>/<file>``
        (default directory ``~/.cache/stpred/weights``) when present, else downloads its checkpoint (hub, or
        torchvision's server for ResNet-50); an architecture is initialised randomly with ``seed`` (HiFusion's
        reference trains its ResNets from random initialisation). A published encoder whose file does not match
        its published sha256 (where known) warns.
    size
        Side of the spot crops to use when several patch banks are registered; ``None`` takes the latest.
    table_key
        Table made by :func:`stpred.pp.select_genes` whose rows get embeddings.
    normalize
        ``"imagenet"``: scale to [0, 1], then subtract the ImageNet mean and divide by its standard deviation per
        channel (what torchvision/timm-pretrained encoders and UNI expect); a published encoder trained with other
        statistics uses its own instead (H-optimus-0's; CONCH's OpenAI CLIP statistics), recorded as
        ``pixel_mean``/``pixel_std``. ``"standardize"``: each image and
        channel by its own mean and standard deviation (as HiFusion).
        ``"none"``: scale to [0, 1] only.
    seed
        Seed of the random initialisation when ``weights`` is ``None`` (the global random state is left as it was).
    overwrite
        Recompute and replace ``obsm[key_added]`` even when it exists. Without it, an existing embedding made with
        the same recipe is reused and one made otherwise raises a :class:`ValueError`.
    progress
        Show a progress bar.
    **encoder_kwargs
        Options of the named encoder's constructor (e.g. ``width=32`` for a ResNet; ``img_size``, ``patch_size``,
        ``embed_dim``, ``depth``, ``num_heads``, ``init_values`` for a ViT).

    Returns
    -------
    Nothing; writes to the table ``table_key``:

    - ``obsm[key_added]``: ``float32`` ``(n_spots, D)`` embeddings in the table's row order;
    - ``uns["stpred"]["embeddings"][key_added]``: the recipe (``encoder``, ``weights``, ``weights_file`` (the
      file read), ``weights_sha256`` (its actual sha256), ``expected_sha256`` (the published one, or ``None``),
      ``encoder_kwargs``, ``seed`` for random initialisation, ``size``, ``mpp``, ``sections``, ``normalize``,
      ``pixel_mean``, ``pixel_std``, ``input_size``, ``dim``, ``device``, ``precision``) and its ``cache_key``;
    - a provenance entry in ``uns["stpred"]["history"]``.

    Raises
    ------
    KeyError
        The table does not exist (run :func:`stpred.pp.select_genes`) or no patch bank is registered (run
        :func:`stpred.pp.extract_patches`).
    ValueError
        Unknown encoder name; weights that do not fit the encoder; a module whose output is not ``(B, D)``;
        an existing ``obsm[key_added]`` made with another recipe and ``overwrite=False``.
    FileNotFoundError
        ``weights`` names a file that does not exist.
    TypeError
        An argument of the wrong type, encoder options the encoder does not take, or a module that does not return
        a tensor.
    ImportError
        A hub download (``weights="hf-hub:..."``, or a published encoder without a local copy) without the optional
        package ``huggingface_hub``; the message names the local-file alternative.
    OSError
        The download of a published checkpoint failed (offline, or a gated repository without access); the
        message says how to get access and where to put a local copy.

    Examples
    --------
    >>> import stpred
    >>> sdata = stpred.datasets.synthetic(n_sections=1, n_genes=8)
    >>> stpred.pp.select_genes(sdata, n_top=4)
    >>> _ = stpred.pp.extract_patches(sdata, size=64, context_size=None, progress=False)
    >>> stpred.pp.embed(sdata, encoder="resnet18", width=8, progress=False)
    >>> sdata.tables["stpred"].obsm["X_emb_resnet18"].shape[1]
    64
    """
    import torch

    from ._patches import get_patch_bank

    # ---- validate everything before any work
    table = get_table(sdata, table_key, made_by="pp.select_genes")
    check_one_of(normalize, _NORMALIZE, name="normalize")
    _check_int(batch_size, name="batch_size")
    _check_int(size, name="size", allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        msg = f"Expected `seed` to be an int, found {seed!r}."
        raise TypeError(msg)
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        msg = f"Expected `key_added` to be a non-empty string or None, found {key_added!r}."
        raise TypeError(msg)
    name, spec = _resolve_name(encoder, weights=weights, encoder_kwargs=encoder_kwargs)
    weights_ref = _resolve_weights(weights)
    dev = _device(device)
    bank: PatchBank = get_patch_bank(sdata, size=size)
    if len(bank) != table.n_obs or not (bank.obs_names == table.obs_names).all():
        msg = (
            f"The patch bank holds {len(bank)} crops of sections {sorted(set(bank.sections.tolist()))} but the "
            f"table {table_key!r} has {table.n_obs} rows; embeddings need a crop for every row. Run "
            "`stpred.pp.extract_patches(sdata)` for all sections."
        )
        raise ValueError(msg)
    key = key_added if key_added is not None else f"X_emb_{name}"
    previous = _existing(table, key)
    if key in table.obsm and previous is None and not overwrite:
        msg = (
            f"obsm[{key!r}] of table {table_key!r} exists and was not made by `stpred.pp.embed`; pass "
            "`overwrite=True` to replace it or `key_added=` to store the embedding under another name."
        )
        raise ValueError(msg)

    # ---- identify the encoder's output (cheaply for weight files: no model is built on a cache hit)
    kwargs = {**spec.defaults, **encoder_kwargs} if spec is not None else {}
    geometry = {"size": int(bank.size), "mpp": bank.mpp, "sections": sorted(set(bank.sections.tolist()))}
    path = _weights_path(name, spec, weights_ref)  # a published encoder's file is found or downloaded here
    published = spec.pretrained if spec is not None else None
    module: nn.Module | None = None
    if spec is not None and path is not None:
        sha = _sha256_file(path)  # the model is built only if the cache misses
        if published is not None:
            from ..models.encoders.pretrained import check_sha256

            check_sha256(name, sha)
        input_size = (_vit_img_size(spec, kwargs),) * 2 if spec.family == "vit" else None
    else:
        module = _build(name, spec, None, kwargs, seed=int(seed)) if spec is not None else encoder
        sha, input_size = _sha256_state(module), _input_size(module)
    fields = {
        "encoder": name,
        "weights_sha256": sha,
        "encoder_kwargs": plain(kwargs),
        **geometry,
        "normalize": normalize,
        "input_size": None if input_size is None else list(input_size),
    }
    cache_key = _cache_key(fields)
    if key in table.obsm and previous is not None and not overwrite:
        if previous.get("cache_key") == cache_key:
            logger.info("Reusing obsm[%r]: made with the same encoder, weights, patches and normalisation.", key)
            return
        msg = (
            f"obsm[{key!r}] holds embeddings made with {_describe(previous)}; this call asks for "
            f"{_describe(fields)}. Pass `overwrite=True` to replace them or `key_added=` to keep both."
        )
        raise ValueError(msg)

    # ---- build (when not yet) and run
    if module is None:
        module = _build(name, spec, path, kwargs, seed=int(seed))  # type: ignore[arg-type]
    random_init = spec is not None and path is None
    enc = _Encoder(
        module, name, spec.family if spec is not None else "user", sha, int(seed) if random_init else None, input_size
    )
    if published is not None:
        enc.mean, enc.std = tuple(published.mean), tuple(published.std)
    restore = None
    if enc.family == "user":
        first = next(iter(enc.module.parameters()), None)
        restore = (enc.module.training, first.device if first is not None else None)
    try:
        emb, precision = _run(enc, bank.spot, device=dev, batch_size=batch_size, normalize=normalize, progress=progress)
    finally:
        if restore is not None:
            enc.module.train(restore[0])
            if restore[1] is not None:
                enc.module.to(restore[1])
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # ---- write
    table.obsm[key] = emb
    entry = {
        **fields,
        "cache_key": cache_key,
        "weights": None if weights is None else str(weights),
        "weights_file": None if path is None else str(path),
        "expected_sha256": None if published is None else published.expected_sha256,
        "pixel_mean": list(enc.mean) if normalize == "imagenet" else None,
        "pixel_std": list(enc.std) if normalize == "imagenet" else None,
        "seed": enc.seed,
        "dim": int(emb.shape[1]),
        "device": str(dev),
        "precision": precision,
    }
    uns = stpred_uns(table)
    embeddings = dict(uns.get(_UNS_EMBEDDINGS, {}))
    embeddings[key] = plain(entry)
    uns[_UNS_EMBEDDINGS] = embeddings
    record(
        table,
        "embed",
        encoder=name,
        key_added=key,
        weights=None if weights is None else str(weights),
        weights_sha256=sha,
        seed=enc.seed,
        size=bank.size,
        mpp=bank.mpp,
        normalize=normalize,
        batch_size=batch_size,
        device=str(dev),
        precision=precision,
        encoder_kwargs=kwargs,
    )
    logger.info("Wrote obsm[%r]: %d spots × %d dimensions (%s).", key, emb.shape[0], emb.shape[1], name)
