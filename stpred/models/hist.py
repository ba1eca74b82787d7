"""HiST: a hierarchical sparse transformer over a slide's spot lattice (Wu et al., ICML 2026).

One forward maps a whole slide: spot embeddings ``(N, in_dim)`` on an integer lattice ``(N, 2)`` to expression
``(N, n_genes)``. Attention is local (union of regular and half-shifted windows on each of three dyadic lattice
levels, a U-Net of transformer layers) plus a global path through a few slide calibration tokens, so a slide
costs O(N · window) time and memory, never O(N²).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._constants import BatchKeys
from .._lattice import lattice_indices
from ._base import LossOutput, StpredModel, TrainDefaults
from ._lattice_ops import (
    CoarseMap,
    LevelTables,
    SlidePlan,
    build_plan,
    gather_children,
    pack_children,
    window_attention_packed,
)
from ._registry import register_model

__all__ = ["HiST", "HiSTConfig"]

_CALIBRATION = ("max", "mean", "fixed")

#: Coordinate-augmentation recipes of :class:`HiSTConfig` (``augmentation=``): the values each one gives the
#: ``aug_*`` options left unset. ``"official"``: the authors' released code as it trains; ``"paper"``: the
#: schedule described by Wu et al. (2026); ``"none"``: off.
AUGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "official": {
        "aug_p": 0.75,
        "aug_drop": 0.75,
        "aug_shear_deg": 30.0,
        "aug_schedule": "constant",
        "aug_min_strength": 0.0,
    },
    "paper": {
        "aug_p": 1.0,
        "aug_drop": 0.2,
        "aug_shear_deg": 15.0,
        "aug_schedule": "cosine",
        "aug_min_strength": 0.2,
    },
    "none": {"aug_p": 0.0, "aug_drop": 0.0, "aug_shear_deg": 0.0, "aug_schedule": "none", "aug_min_strength": 0.0},
}


@dataclass(frozen=True)
class HiSTConfig:
    """Hyper-parameters of :class:`HiST`; defaults follow the authors' released code (Wu et al. 2026, "111-21").

    Values in parentheses are those of the released code's default model configuration unless marked "paper"
    (Wu et al. 2026, ICML; arXiv:2606.14251).

    Parameters
    ----------
    in_dim
        Width of the spot embeddings (UNI: 1024). Read from the data.
    n_genes
        Number of predicted genes. Read from the data.
    width
        Token width at every level (1024 / 2 = 512).
    heads
        Attention heads (8 of 64).
    encoder_depths
        Transformer layers per encoder level 0, 1, 2 ("111-21": 1, 1, 1).
    decoder_depths
        Transformer layers per decoder stage, coarse to fine ("111-21": 2 at level 1, 1 at level 0).
        Must have one entry fewer than ``encoder_depths``.
    window
        Half window size: windows are ``2 * window`` cells wide (3 → 6 x 6).
    ff_ratio
        FFN expansion (4, ReLU).
    attn_drop
        Dropout on the attention weights (0.05).
    input_drop
        Dropout after the input projection (0.05).
    rpb_std
        Init std of the relative-position bias tables (0.02, truncated normal).
    calibration
        Slide calibration tokens, built from the input embeddings (max-pool,
        mean-pool, a fixed random token).
    fixed_token_std
        Std of the fixed token (1e-4).
    augmentation
        Named recipe for the coordinate augmentation (see :meth:`HiST.augment`); it fills every ``aug_*`` option
        left at ``None``:

        ============  ======  ========  =========  ==========  ==============================================
        preset        aug_p   aug_drop  shear      schedule    source
        ============  ======  ========  =========  ==========  ==============================================
        ``official``  0.75    0.75      ±30°       constant    the authors' released code as it runs (its
                                                               cosine schedule never reaches the data-loader
                                                               workers, so training sees full strength)
        ``paper``     1.0     0.2       ±15°       cosine,     Wu et al. (2026), training details: strength
                                                   1 → 0.2     decaying from 1 to 0.2 over training
        ``none``      0       0         0°         none        no augmentation
        ============  ======  ========  =========  ==========  ==============================================

        The default, ``"official"``, reproduces the released code's training. Individual ``aug_*`` options
        override the preset's values.
    aug_p
        Probability of each coordinate transform (mirror, shear, rotation) at full strength.
    aug_drop
        Fraction of spots dropped at full strength.
    aug_shear_deg
        Largest shear angle in degrees.
    aug_schedule
        Strength of the augmentation over training (``progress`` from 0 to 1): ``"cosine"``
        (``m + (1 - m) · 0.5 (1 + cos(pi · progress))`` with ``m = aug_min_strength``), ``"constant"`` (1
        throughout) or ``"none"`` (0: no augmentation). The probabilities and the drop fraction are multiplied by
        the strength; the shear range is not.
    aug_min_strength
        Strength the cosine schedule ends at (``"official"``: 0, as the released code's schedule was designed;
        ``"paper"``: 0.2).
    cache_size
        Number of slides whose lattice tables are kept (per model instance, keyed by the coordinates' content).
    train
        Optimisation defaults: AdamW, lr 1e-4, weight decay 1e-4 (paper; the released training script uses
        1e-5), cosine to 0 over 100 epochs, one slide per step.
    """

    in_dim: int
    n_genes: int
    width: int = 512
    heads: int = 8
    encoder_depths: tuple[int, ...] = (1, 1, 1)
    decoder_depths: tuple[int, ...] = (2, 1)
    window: int = 3
    ff_ratio: int = 4
    attn_drop: float = 0.05
    input_drop: float = 0.05
    rpb_std: float = 0.02
    calibration: tuple[str, ...] = _CALIBRATION
    fixed_token_std: float = 1e-4
    augmentation: Literal["official", "paper", "none"] = "official"
    aug_p: float | None = None
    aug_drop: float | None = None
    aug_shear_deg: float | None = None
    aug_schedule: Literal["cosine", "constant", "none"] | None = None
    aug_min_strength: float | None = None
    cache_size: int = 16
    train: TrainDefaults = field(
        default_factory=lambda: TrainDefaults(
            lr=1e-4,
            weight_decay=1e-4,  # paper (Wu et al. 2026); the released training script uses 1e-5
            optimizer="adamw",
            scheduler="cosine",
            min_lr=0.0,
            max_epochs=100,
            batch_size=1,
        )
    )

    def __post_init__(self) -> None:
        for name in ("in_dim", "n_genes", "width", "heads", "window", "ff_ratio", "cache_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"Expected `{name}` to be a positive integer, found {value!r}."
                raise ValueError(msg)
        if self.width % self.heads:
            msg = f"`width` ({self.width}) must be divisible by `heads` ({self.heads})."
            raise ValueError(msg)
        if len(self.encoder_depths) < 1 or any(d < 1 for d in self.encoder_depths):
            msg = f"Expected `encoder_depths` to be positive layer counts, found {self.encoder_depths!r}."
            raise ValueError(msg)
        if len(self.decoder_depths) != len(self.encoder_depths) - 1 or any(d < 1 for d in self.decoder_depths):
            msg = (
                f"Expected {len(self.encoder_depths) - 1} positive `decoder_depths` (one per level above 0, for "
                f"`encoder_depths={self.encoder_depths!r}`), found {self.decoder_depths!r}."
            )
            raise ValueError(msg)
        unknown = [c for c in self.calibration if c not in _CALIBRATION]
        if unknown or len(set(self.calibration)) != len(self.calibration) or not self.calibration:
            msg = f"Expected `calibration` to be distinct names from {list(_CALIBRATION)}, found {self.calibration!r}."
            raise ValueError(msg)
        if self.augmentation not in AUGMENTATION_PRESETS:
            msg = f"Unknown augmentation {self.augmentation!r}; expected one of {sorted(AUGMENTATION_PRESETS)}."
            raise ValueError(msg)
        for name, value in AUGMENTATION_PRESETS[self.augmentation].items():  # the preset fills what is unset
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("attn_drop", "input_drop", "aug_drop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                msg = f"Expected `{name}` in [0, 1), found {value!r}."
                raise ValueError(msg)
        for name in ("aug_p", "aug_min_strength"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                msg = f"Expected `{name}` in [0, 1], found {value!r}."
                raise ValueError(msg)
        if not 0.0 <= self.aug_shear_deg < 90.0:
            msg = f"Expected `aug_shear_deg` in [0, 90), found {self.aug_shear_deg!r}."
            raise ValueError(msg)
        if self.aug_schedule not in ("cosine", "constant", "none"):
            msg = f"Unknown aug_schedule {self.aug_schedule!r}; expected one of ['cosine', 'constant', 'none']."
            raise ValueError(msg)

    @property
    def n_levels(self) -> int:
        """Number of lattice levels."""
        return len(self.encoder_depths)


# --------------------------------------------------------------------------------------------------- blocks


class RefinementLayer(nn.Module):
    """Pre-norm dual-path attention (local windows + slide calibration tokens), then a ReLU FFN.

    Spot tokens ``x`` and calibration tokens ``z`` share the norms, the output projection and the FFN.

    Parameters
    ----------
    width
        Token width.
    heads
        Attention heads.
    window
        Half window size.
    ff_ratio
        FFN expansion.
    attn_drop
        Dropout on the attention weights.
    rpb_std
        Init std of the relative-position bias.
    """

    def __init__(self, width: int, heads: int, window: int, ff_ratio: int, attn_drop: float, rpb_std: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_drop = attn_drop
        self.norm1 = nn.LayerNorm(width)
        self.qkv_local = nn.Linear(width, 3 * width)
        self.qkv_global = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        side = 4 * window - 1
        self.rpb = nn.Parameter(torch.empty(heads, side * side))
        nn.init.trunc_normal_(self.rpb, std=rpb_std)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ff_ratio * width), nn.ReLU(inplace=True), nn.Linear(ff_ratio * width, width)
        )

    def _global(self, qkv_x: Tensor, qkv_z: Tensor, drop: float) -> tuple[Tensor, Tensor]:
        """Spots ↔ calibration tokens, per head, as block-diagonal matmuls (no copies of the spot tensors).

        ``qkv_x`` ``(n, 3, H, d)``, ``qkv_z`` ``(T, 3, H, d)`` → ``(n, C)`` for the spots (softmax over the ``T``
        tokens) and ``(T, C)`` for the tokens (softmax over all spots and tokens).
        """
        n, _, h, d = qkv_x.shape
        t = qkv_z.shape[0]
        scale = d**-0.5
        qx, kx, vx = (qkv_x[:, i].flatten(1) for i in range(3))  # (n, C) strided views
        qz, kz, vz = qkv_z.unbind(1)  # (T, H, d)
        eye = torch.eye(h, dtype=qz.dtype, device=qz.device)
        k_blocks = torch.einsum("thi,hg->higt", kz, eye).reshape(h * d, h * t)  # block-diagonal
        v_blocks = torch.einsum("thi,hg->htgi", vz, eye).reshape(h * t, h * d)
        q_blocks = torch.einsum("thi,hg->htgi", qz, eye).reshape(h * t, h * d)
        # spots read the tokens
        a = torch.softmax((qx @ k_blocks).float().view(n, h, t) * scale, dim=-1)
        a = F.dropout(a, drop, training=drop > 0).to(vx.dtype)
        glob_x = a.view(n, h * t) @ v_blocks  # (n, C)
        # tokens read every spot and each other
        s_zx = (q_blocks @ kx.T).float()  # (H T, n)
        s_zz = torch.einsum("thd,shd->hts", qz, kz).float().reshape(h * t, t)
        b = torch.softmax(torch.cat([s_zx, s_zz], dim=1) * scale, dim=-1)
        b = F.dropout(b, drop, training=drop > 0).to(vx.dtype)
        from_x = (b[:, :n] @ vx).view(h, t, h, d).diagonal(dim1=0, dim2=2).permute(0, 2, 1)  # (T, H, d)
        from_z = torch.einsum("hts,shd->thd", b[:, n:].reshape(h, t, t), vz)
        return glob_x, (from_x + from_z).reshape(t, h * d)

    def forward(self, x: Tensor, z: Tensor, level: LevelTables) -> tuple[Tensor, Tensor]:
        """Refine spot tokens ``x`` ``(n, C)`` and calibration tokens ``z`` ``(T, C)`` on one level."""
        n = x.shape[0]
        drop = self.attn_drop if self.training else 0.0
        hx, hz = self.norm1(x), self.norm1(z)
        # (a) local: union of the regular and the shifted window, with relative-position bias
        qkv = self.qkv_local(hx).view(n, 3, self.heads, -1)
        local = window_attention_packed(qkv, level, self.rpb, drop=drop, training=self.training)
        # (b) global: spots read the calibration tokens; the tokens read every spot and each other
        glob_x, glob_z = self._global(
            self.qkv_global(hx).view(n, 3, self.heads, -1),
            self.qkv_global(hz).view(z.shape[0], 3, self.heads, -1),
            drop,
        )
        # the two paths are summed before one output projection
        x = x + self.proj(local + glob_x)
        z = z + self.proj(glob_z)
        x = x + self.ffn(self.norm2(x))
        z = z + self.ffn(self.norm2(z))
        return x, z


class Coarsen(nn.Module):
    """Dyadic coarsening: the four child slots (zero where empty) concatenated → linear (no bias) → LayerNorm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, cmap: CoarseMap) -> Tensor:
        """``(n, C)`` children → ``(P, C)`` parents."""
        return self.norm(self.linear(pack_children(x, cmap).flatten(1)))


class Uncoarsen(nn.Module):
    """Dyadic uncoarsening: linear ``C_in → 4 C`` (no bias, ICNR init), scattered to the active children → LN."""

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.linear = nn.Linear(in_width, 4 * width, bias=False)
        self.norm = nn.LayerNorm(width)
        # ICNR: the four children start identical (as in the released code)
        base = torch.empty(width, in_width)
        nn.init.kaiming_normal_(base, mode="fan_out", nonlinearity="relu")
        with torch.no_grad():
            self.linear.weight.copy_(base.repeat(4, 1))

    def forward(self, x: Tensor, cmap: CoarseMap) -> Tensor:
        """``(P, C_in)`` parents → ``(n, C)`` active children, in the children's order."""
        u = self.linear(x).view(x.shape[0], 4, self.width)
        return self.norm(gather_children(u, cmap))


class _EncoderStage(nn.Module):
    def __init__(self, cfg: HiSTConfig, depth: int, *, first: bool) -> None:
        super().__init__()
        w = cfg.width
        self.coarsen = None if first else Coarsen(w)
        self.z_proj = nn.Linear(cfg.in_dim if first else w, w)
        self.layers = nn.ModuleList(
            RefinementLayer(w, cfg.heads, cfg.window, cfg.ff_ratio, cfg.attn_drop, cfg.rpb_std) for _ in range(depth)
        )


class _DecoderStage(nn.Module):
    def __init__(self, cfg: HiSTConfig, depth: int, in_width: int) -> None:
        super().__init__()
        w = cfg.width
        self.uncoarsen = Uncoarsen(in_width, w)
        self.z_proj = nn.Linear(in_width, w)
        self.layers = nn.ModuleList(
            RefinementLayer(w, cfg.heads, cfg.window, cfg.ff_ratio, cfg.attn_drop, cfg.rpb_std) for _ in range(depth)
        )


# ---------------------------------------------------------------------------------------------------- model


def _as_config(in_dim: int, n_genes: int, config: dict[str, Any]) -> HiSTConfig:
    names = {f.name for f in fields(HiSTConfig)} - {"in_dim", "n_genes"}
    unknown = sorted(set(config) - names)
    if unknown:
        msg = f"Unknown HiST option(s) {unknown}; valid options: {sorted(names)}."
        raise TypeError(msg)
    config = dict(config)
    for key in ("encoder_depths", "decoder_depths", "calibration"):  # lists after a JSON round trip
        if key in config and isinstance(config[key], list):
            config[key] = tuple(config[key])
    if isinstance(config.get("train"), dict):
        config["train"] = TrainDefaults(**config["train"])
    return HiSTConfig(in_dim=in_dim, n_genes=n_genes, **config)


@register_model("hist")
class HiST(StpredModel):
    """HiST: hierarchical sparse transformer on the spot lattice of one whole slide.

    Input projection (``in_dim → width``, no bias, dropout), then a U-Net over dyadic lattice levels:
    encoder levels 0, 1, 2 with ``encoder_depths`` refinement layers each, decoder stages back to level 1 and 0
    with ``decoder_depths`` layers, lateral skips by concatenation, and a linear head on ``2 * width`` features.
    Each refinement layer is pre-norm dual-path attention, (a) window attention over the union of the regular
    and the half-shifted ``2w x 2w`` windows with a learned relative-position bias per head and (b) attention
    between the spots and the slide calibration tokens (which in turn attend to all spots and each other), summed
    before one output projection, then a ReLU FFN; both with residuals. Coarsening concatenates the four child
    slots → linear → LayerNorm; uncoarsening is linear ``C → 4C`` scattered back to the active children →
    LayerNorm.

    The lattice tables (windows per level, coarsening maps) are built once per slide by :meth:`prepare`, with
    sorts and scatters only, and cached by the content of ``coords``; attention then runs window by window, in
    O(N · window) time and memory.

    Parameters
    ----------
    in_dim
        Width of the spot embeddings (``batch["embedding"]``).
    n_genes
        Number of genes predicted.
    **config
        Any field of :class:`HiSTConfig` except ``in_dim``/``n_genes``.

    Notes
    -----
    Deliberate differences from the authors' released code (also listed in ``docs/models.md``); everything else
    follows it (width 512, 8 heads, "111-21", 6 x 6 windows, RPB tables of 11 x 11 per head and layer, three
    calibration tokens [max, mean, fixed] pooled from the raw embeddings and re-projected by a Linear at every
    stage, concat skips, ICNR uncoarsening, MSE loss, head bias from the mean target; 33,306,752 parameters at
    in_dim 1024 and 2000 genes, exactly the released code's trained count):

    - **No sentinel tokens, padding masked.** The reference pads each slide with two zero "sentinel" tokens that
      it never masks (they join window attention, coarsening and the max/mean pooling). Here no sentinels
      are added; window slots that hold no spot are masked out of every softmax, and the calibration tokens pool
      over real spots only (so the max token is not clipped at 0 and the mean divides by N, not N + 2). Window
      and dyadic alignment are relative to the slide's bounding box (``coords - min``), not to the reference's
      sentinel-padded canvas (offset by 2 or 3 cells); the output is invariant to translating ``coords``.
    - **Shifted windows always shifted.** The reference silently uses the regular partition twice when both
      canvas sides are multiples of 6; here the shifted partition is always anchored at ``(-w, -w)``.
    - **Augmentation.** The default preset, ``augmentation="official"``, trains as the released code does in
      practice: mirror, shear (±30°) and rotation each with p = 0.75 and 75 % of the spots dropped, at constant
      strength (the released code's cosine schedule never reaches its data-loader workers).
      ``augmentation="paper"`` follows the schedule described by Wu et al. (2026) instead. Augmentation starts
      from the integer lattice (the batch carries no continuous positions) and re-snaps to a collision-free
      lattice with the rule of :func:`stpred.pp.lattice` (nearest free cell, in rounds); the released code's
      canonical mapper takes the first free cell of a square scan, its runtime mapper the nearest free cell spot
      by spot.
    - **No dead parameters.** The released code's head has a never-used global projection (2.05 M parameters);
      it is not built. The fixed calibration token is a buffer drawn from a generator seeded with 0.
    - **Attention is windowed, not an edge list.** The same neighbourhoods as the reference's DGL union graph
      (minus the sentinels), computed window by window with an exact log-sum-exp merge of the two partitions,
      so keys and values are never copied per edge. Scores and softmax statistics stay in float32 under autocast.
    - **Input handling.** Coordinates must be unique integers (no silent re-snapping); rows need not be sorted
      (the output is permutation-equivariant), where the reference sorts every slide lexicographically.

    Examples
    --------
    >>> model = HiST(in_dim=16, n_genes=5, width=32, heads=2)
    >>> batch = {"embedding": torch.randn(40, 16), "coords": torch.randint(0, 30, (40, 2))}
    >>> batch["coords"] = torch.unique(batch["coords"], dim=0)[:30]
    >>> batch["embedding"] = batch["embedding"][:30]
    >>> model(batch)["pred"].shape
    torch.Size([30, 5])
    """

    name: str
    inputs = (BatchKeys.EMBEDDING, BatchKeys.COORDS)
    batching = "slide"
    data_sizes = ("in_dim", "n_genes")

    def __init__(self, in_dim: int, n_genes: int, **config: Any) -> None:
        super().__init__()
        self.config = cfg = _as_config(in_dim, n_genes, config)
        w = cfg.width
        self.input_proj = nn.Linear(cfg.in_dim, w, bias=False)
        self.input_drop = nn.Dropout(cfg.input_drop)
        gen = torch.Generator().manual_seed(0)
        fixed = torch.randn(1, cfg.in_dim, generator=gen) * cfg.fixed_token_std
        self.register_buffer("fixed_token", fixed)
        self.encoder = nn.ModuleList(_EncoderStage(cfg, d, first=i == 0) for i, d in enumerate(cfg.encoder_depths))
        self.decoder = nn.ModuleList(
            _DecoderStage(cfg, d, in_width=w if i == 0 else 2 * w) for i, d in enumerate(cfg.decoder_depths)
        )
        self.head = nn.Linear(2 * w if cfg.decoder_depths else w, cfg.n_genes)
        self._plans: OrderedDict[tuple, SlidePlan] = OrderedDict()

    # ------------------------------------------------------------------------------------------- inputs

    def _inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        missing = [k for k in self.inputs if k not in batch]
        if missing:
            msg = f"HiST needs batch keys {list(self.inputs)}; missing {missing} (found {sorted(batch)})."
            raise KeyError(msg)
        emb, coords = batch[BatchKeys.EMBEDDING], batch[BatchKeys.COORDS]
        if emb.dim() == 3 and emb.shape[0] == 1:  # a collated batch of one slide
            emb = emb[0]
        if coords.dim() == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if emb.dim() != 2:
            msg = f"Expected one slide's embeddings of shape (n_spots, {self.config.in_dim}), found {tuple(emb.shape)}."
            raise ValueError(msg)
        if emb.shape[1] != self.config.in_dim:
            msg = (
                f"HiST was built for embeddings of width in_dim={self.config.in_dim}, found width {emb.shape[1]}. "
                "Build the model with the embedding's width (or embed with the matching encoder)."
            )
            raise ValueError(msg)
        self._check_coords(coords)
        if coords.shape[0] != emb.shape[0]:
            msg = f"Found {coords.shape[0]} lattice coordinates for {emb.shape[0]} embeddings; they must match."
            raise ValueError(msg)
        if emb.shape[0] < 2:
            msg = f"HiST needs at least 2 spots per slide, found {emb.shape[0]}."
            raise ValueError(msg)
        return emb, coords

    @staticmethod
    def _check_coords(coords: Tensor) -> None:
        if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
            msg = (
                f"Expected integer lattice coordinates (torch.long), found {coords.dtype}. "
                "Map spot centres with `stpred.pp.lattice(sdata)` first."
            )
            raise TypeError(msg)
        if coords.dim() != 2 or coords.shape[1] != 2:
            msg = f"Expected lattice coordinates of shape (n_spots, 2), found {tuple(coords.shape)}."
            raise ValueError(msg)

    # -------------------------------------------------------------------------------------- lattice plan

    def prepare(self, coords: Tensor, *, cache: bool = True) -> SlidePlan:
        """Window tables of every level and the coarsening maps for a slide (cached by coordinate content).

        Parameters
        ----------
        coords
            ``(n, 2)`` integer lattice coordinates, unique per spot.
        cache
            Look up and store the result in this model's cache (``config.cache_size`` slides).

        Returns
        -------
        The slide's lattice plan (window tables of every level and the coarsening maps) used by :meth:`forward`.
        """
        self._check_coords(coords)
        coords = coords.long()
        key = None
        if cache:
            digest = hashlib.blake2b(coords.detach().cpu().contiguous().numpy().tobytes(), digest_size=16)
            key = (digest.hexdigest(), tuple(coords.shape), str(coords.device))
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        c = coords - coords.min(dim=0).values
        stride = c[:, 1].max() + 1
        n_unique = torch.unique(c[:, 0] * stride + c[:, 1]).numel()
        if n_unique != c.shape[0]:
            msg = (
                f"Lattice coordinates must be unique per spot; found {c.shape[0] - n_unique} duplicate(s) among "
                f"{c.shape[0]} spots. Use `stpred.pp.lattice(sdata)` (collision-free) to make them."
            )
            raise ValueError(msg)
        plan = build_plan(c, window=self.config.window, n_levels=self.config.n_levels)
        if cache:
            self._plans[key] = plan
            while len(self._plans) > self.config.cache_size:
                self._plans.popitem(last=False)
        return plan

    def clear_cache(self) -> None:
        """Forget the cached lattice tables."""
        self._plans.clear()

    # ------------------------------------------------------------------------------------------- forward

    def _calibration_tokens(self, emb: Tensor) -> Tensor:
        pooled = {"max": lambda: emb.amax(0, keepdim=True), "mean": lambda: emb.mean(0, keepdim=True)}
        toks = [self.fixed_token.to(emb.dtype) if c == "fixed" else pooled[c]() for c in self.config.calibration]
        return torch.cat(toks)

    def encode(self, emb: Tensor, plan: SlidePlan) -> Tensor:
        """Features ``(n, 2 * width)`` of the spots (before the head)."""
        x = self.input_drop(self.input_proj(emb))
        z = self._calibration_tokens(emb)
        skips: list[tuple[Tensor, Tensor]] = []
        for lvl, stage in enumerate(self.encoder):
            if stage.coarsen is not None:
                x = stage.coarsen(x, plan.maps[lvl - 1])
            z = stage.z_proj(z)
            for layer in stage.layers:
                x, z = layer(x, z, plan.levels[lvl])
            skips.append((x, z))
        for j, stage in enumerate(self.decoder):
            lvl = self.config.n_levels - 2 - j
            x = stage.uncoarsen(x, plan.maps[lvl])
            z = stage.z_proj(z)
            for layer in stage.layers:
                x, z = layer(x, z, plan.levels[lvl])
            x = torch.cat([x, skips[lvl][0]], dim=-1)
            z = torch.cat([z, skips[lvl][1]], dim=-1)
        return x

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Predict the expression of every spot of one slide.

        Parameters
        ----------
        batch
            ``"embedding"``: ``(n, in_dim)`` float; ``"coords"``: ``(n, 2)`` long lattice indices (unique per spot).
            A leading batch dimension of size 1 is accepted.

        Returns
        -------
        ``{"pred": (n, n_genes)}``.
        """
        emb, coords = self._inputs(batch)
        plan = self.prepare(coords)
        return {"pred": self.head(self.encode(emb, plan))}

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """Spot features ``(n, 2 * width)`` of one slide before the head (out-of-distribution scores)."""
        emb, coords = self._inputs(batch)
        return self.encode(emb, self.prepare(coords))

    def dropout_modules(self) -> list[nn.Module]:
        """The input dropout and every refinement layer with attention dropout (gated by the layer's mode)."""
        layers = [m for m in self.modules() if isinstance(m, RefinementLayer) and m.attn_drop > 0]
        return [*super().dropout_modules(), *layers]

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> LossOutput:
        """Mean squared error over all spots x genes.

        Parameters
        ----------
        out
            Output of :meth:`forward`.
        batch
            Must hold ``"target"`` ``(n, n_genes)``.

        Returns
        -------
        ``loss`` = ``mse``.
        """
        if BatchKeys.TARGET not in batch:
            msg = f"HiST's loss needs batch key 'target'; found {sorted(batch)}."
            raise KeyError(msg)
        pred, target = out["pred"], batch[BatchKeys.TARGET]
        if target.dim() == 3 and target.shape[0] == 1:
            target = target[0]
        if target.shape != pred.shape:
            msg = f"Target of shape {tuple(target.shape)} does not match the prediction {tuple(pred.shape)}."
            raise ValueError(msg)
        mse = F.mse_loss(pred.float(), target.float())
        return LossOutput(loss=mse, mse=mse.detach())

    # -------------------------------------------------------------------------------------- fit hooks

    @torch.no_grad()
    def init_head_bias(self, mean: Tensor) -> None:
        """Set the head bias to the mean training target per gene (as the authors' released code does: the mean log1p expression).

        Parameters
        ----------
        mean
            ``(n_genes,)`` mean target of the training spots.
        """
        mean = torch.as_tensor(mean, dtype=self.head.bias.dtype)
        if mean.shape != self.head.bias.shape:
            msg = f"Expected a per-gene mean of shape ({self.config.n_genes},), found {tuple(mean.shape)}."
            raise ValueError(msg)
        self.head.bias.copy_(mean.to(self.head.bias.device))

    # ------------------------------------------------------------------------------------------ augment

    def aug_strength(self, progress: float) -> float:
        """Augmentation strength in ``[0, 1]`` at ``progress`` (fraction of training done), per ``aug_schedule``."""
        p = min(max(float(progress), 0.0), 1.0)
        cfg = self.config
        if cfg.aug_schedule == "none":
            return 0.0
        if cfg.aug_schedule == "constant":
            return 1.0
        m = cfg.aug_min_strength
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))

    def augment(self, batch: dict[str, Tensor], progress: float) -> dict[str, Tensor]:
        """Random mirror, shear, rotation of the lattice about its centroid, and spot drop-out.

        Each transform is applied with probability ``aug_p * s`` and each spot is dropped with probability
        ``aug_drop * s``, where ``s = aug_strength(progress)`` (the ``augmentation`` preset of
        :class:`HiSTConfig` sets these). Mirror flips x and y each with probability 1/2; shear is along x or y
        (1/2 each) by a factor uniform in ``[-tan a, tan a]`` with ``a = aug_shear_deg``; rotation is by a
        uniform angle. The transformed positions are re-snapped to a collision-free integer lattice (unit 1).

        Parameters
        ----------
        batch
            One slide; every tensor whose first dimension equals the number of spots (embedding, coords, target,
            ...) is subset consistently.
        progress
            Fraction of training done, in ``[0, 1]``.

        Returns
        -------
        A new batch dictionary (the input is not modified).
        """
        s = self.aug_strength(progress)
        if s == 0.0:
            return batch
        coords = batch[BatchKeys.COORDS]
        squeeze = coords.dim() == 3 and coords.shape[0] == 1
        c = coords[0] if squeeze else coords
        self._check_coords(c)
        n = c.shape[0]
        p_drop = self.config.aug_drop * s
        cfg = self.config
        t, _ = _coordinate_transform(torch.rand(8).tolist(), p=cfg.aug_p * s, shear_deg=cfg.aug_shear_deg)
        keep = torch.rand(n) >= p_drop
        if int(keep.sum()) < 2:
            keep[:] = True
        idx = keep.nonzero().squeeze(1)
        pos = c.detach().cpu().numpy().astype(np.float64)[idx.numpy()]
        pos = (pos - np.round(pos.mean(axis=0))) @ t
        new = torch.from_numpy(lattice_indices(pos, 1.0)).to(c.device)
        out = dict(batch)
        for key, val in batch.items():
            if not isinstance(val, Tensor):
                continue
            if squeeze and val.dim() >= 2 and val.shape[0] == 1 and val.shape[1] == n:
                out[key] = val[:, idx.to(val.device)]
            elif val.dim() >= 1 and val.shape[0] == n:
                out[key] = val[idx.to(val.device)]
        out[BatchKeys.COORDS] = new[None] if squeeze else new
        return out


def _coordinate_transform(u: list[float], *, p: float, shear_deg: float) -> tuple[np.ndarray, float]:
    """The 2 × 2 map ``T`` (positions are row vectors: ``new = pos @ T``) drawn from 8 uniform numbers ``u``.

    Mirror, then shear, then rotation, each applied when its gate ``u[i] < p``. Returns ``T`` and the shear factor
    applied (0 when no shear was drawn).
    """
    t = np.eye(2)
    k = 0.0
    if u[0] < p:  # mirror: x and y each flipped with probability 1/2
        t = t @ np.diag([-1.0 if u[1] < 0.5 else 1.0, -1.0 if u[2] < 0.5 else 1.0])
    if u[3] < p:  # shear along x or y by a factor uniform in [-tan a, tan a]
        k = math.tan(math.radians(shear_deg)) * (2.0 * u[4] - 1.0)
        t = t @ (np.array([[1.0, k], [0.0, 1.0]]) if u[5] < 0.5 else np.array([[1.0, 0.0], [k, 1.0]]))
    if u[6] < p:  # rotation by a uniform angle
        a = 2.0 * math.pi * u[7]
        t = t @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return t, k
