"""Vision Transformer in plain torch, with timm's state-dict names.

The parameter names follow timm's ``VisionTransformer`` (``vit_large_patch16_224`` and friends) exactly, so a
checkpoint saved from timm — for instance the pathology foundation model UNI, a ViT-L/16 with LayerScale
(``init_values=1e-5``) — loads as-is with strict checking::

    cls_token, pos_embed, patch_embed.proj.{weight,bias},
    blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj, blocks.{i}.ls1.gamma,
    blocks.{i}.norm2, blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2, blocks.{i}.ls2.gamma,
    norm, head

(``ls*.gamma`` exist only with LayerScale, ``head`` only with ``num_classes > 0``.) Attention uses
:func:`torch.nn.functional.scaled_dot_product_attention`; the position embedding is resampled (bicubic, as timm's
``dynamic_img_size``) when the input size differs from ``img_size``.

The options that the published pathology encoders add to the plain ViT keep timm's names too:

- register tokens (Darcet et al. 2024): ``reg_token`` of shape ``(1, R, D)``, placed after the CLS token;
- ``no_embed_class``: the position embedding covers the patches only (no entry for the CLS/register tokens);
- the packed SwiGLU MLP (timm ``SwiGLUPacked``): one ``mlp.fc1`` of width ``2H`` whose first half, through SiLU,
  gates the second half, then ``mlp.fc2`` of input width ``H`` (``H = int(D * mlp_ratio) / 2``);
- ``global_pool="token+mean"``: the output is the CLS token concatenated with the mean of the patch tokens
  (Virchow's embedding, Vorontsov et al. 2024).

:data:`VIT_ARCHS` also names the published encoders' architectures (``"uni"``, ``"uni2_h"``, ``"h_optimus_0"``,
``"virchow"``, ``"conch"``), so that their checkpoints load strictly; see :mod:`stpred.models.encoders.pretrained`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "VIT_ARCHS",
    "VisionTransformer",
    "create_vit",
    "from_checkpoint",
    "resample_pos_embed",
    "vit_base",
    "vit_base_patch16_224",
    "vit_large",
    "vit_large_patch16_224",
    "vit_small",
    "vit_small_patch16_224",
    "vit_tiny",
    "vit_tiny_patch16_224",
    "uni",
    "uni2_h",
    "h_optimus_0",
    "virchow",
    "conch",
]


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim`` (``proj`` is a strided conv)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, H/p · W/p, D)``."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout)."""

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            msg = f"Expected `embed_dim` to be divisible by `num_heads`, found {dim} and {num_heads}."
            raise ValueError(msg)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D)`` → ``(B, N, D)``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (CaiT / timm ``LayerScale``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        """Scale the last dimension by ``gamma``."""
        return x * self.gamma


class Mlp(nn.Module):
    """Two-layer GELU MLP (``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D)`` → ``(..., D)``."""
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """SwiGLU MLP with one packed input projection (timm ``SwiGLUPacked``: ``fc1``, ``fc2``).

    ``fc1`` maps ``D`` to ``hidden`` features; its first half ``a`` and second half ``b`` give
    ``fc2(silu(a) * b)`` (Shazeer 2020, eq. 6), with ``fc2`` of input width ``hidden / 2``.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if hidden % 2:
            msg = f"Expected an even SwiGLU hidden width (int(embed_dim * mlp_ratio)), found {hidden}."
            raise ValueError(msg)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D)`` → ``(..., D)``."""
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(gate) * value)


#: MLP kinds of :class:`VisionTransformer` (``mlp_layer=``).
_MLPS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu_packed": SwiGLUPacked}
_POOLS = ("token", "token+mean")


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        init_values: float | None,
        mlp_layer: str = "mlp",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLPS[mlp_layer](dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D)`` → ``(B, N, D)``."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], *, num_prefix_tokens: int = 1) -> Tensor:
    """Resample a ViT position embedding to a new patch grid.

    Parameters
    ----------
    pos_embed
        ``(1, num_prefix_tokens + h·w, D)`` with a square original grid ``h = w``.
    grid
        Target grid ``(rows, cols)``.
    num_prefix_tokens
        Leading tokens (the CLS token) whose embeddings are kept as they are.

    Returns
    -------
    ``(1, num_prefix_tokens + rows·cols, D)``; the input itself when the grid already matches.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n_old = patches.shape[1]
    side = math.isqrt(n_old)
    if side * side != n_old:
        msg = f"Expected a square position-embedding grid, found {n_old} patch positions."
        raise ValueError(msg)
    if (side, side) == tuple(grid):
        return pos_embed
    d = patches.shape[-1]
    img = patches.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class VisionTransformer(nn.Module):
    """ViT with a CLS token and learned absolute position embeddings, in timm's naming.

    Parameters
    ----------
    img_size
        Image side the position embedding is laid out for; other sizes (multiples of ``patch_size``) are accepted
        at run time by resampling it.
    patch_size
        Side of the square patches.
    in_chans
        Input channels.
    embed_dim
        Token width ``D``.
    depth
        Number of transformer blocks.
    num_heads
        Attention heads per block.
    mlp_ratio
        MLP hidden width over ``embed_dim``.
    qkv_bias
        Bias in the ``qkv`` projection.
    init_values
        LayerScale initial value (``None``: no LayerScale, as timm's default; UNI uses ``1e-5``).
    num_classes
        Width of a linear ``head`` on the pooled output; ``0`` makes ``head`` an identity (feature extractor).
    reg_tokens
        Number of register tokens ``reg_token`` after the CLS token (UNI2-h: 8, H-optimus-0: 4).
    no_embed_class
        The position embedding covers the patch tokens only (timm's ``no_embed_class``; UNI2-h, H-optimus-0).
    mlp_layer
        ``"mlp"`` (two-layer GELU MLP) or ``"swiglu_packed"`` (timm ``SwiGLUPacked``; UNI2-h, H-optimus-0,
        Virchow).
    global_pool
        Output of :meth:`forward`: ``"token"`` (the CLS token, width ``embed_dim``) or ``"token+mean"`` (CLS token
        and the mean of the patch tokens, concatenated: width ``2 * embed_dim``, as Virchow's embedding).

    Attributes
    ----------
    num_prefix_tokens
        Tokens before the patch tokens in :meth:`forward_features` (CLS and registers: ``1 + reg_tokens``).
    output_dim
        Width of :meth:`forward`'s output when ``num_classes=0``.

    Examples
    --------
    >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    >>> vit.forward_features(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 17, 32])
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        num_classes: int = 0,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        mlp_layer: str = "mlp",
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        if mlp_layer not in _MLPS:
            msg = f"Expected `mlp_layer` to be one of {sorted(_MLPS)}, found {mlp_layer!r}."
            raise ValueError(msg)
        if global_pool not in _POOLS:
            msg = f"Expected `global_pool` to be one of {list(_POOLS)}, found {global_pool!r}."
            raise ValueError(msg)
        if isinstance(reg_tokens, bool) or not isinstance(reg_tokens, int) or reg_tokens < 0:
            msg = f"Expected `reg_tokens` to be a non-negative int, found {reg_tokens!r}."
            raise ValueError(msg)
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("embed_dim", embed_dim)):
            if value <= 0:
                msg = f"Expected `{name}` to be positive, found {value}."
                raise ValueError(msg)
        if depth < 1:
            msg = f"Expected `depth` to be at least 1, found {depth}."
            raise ValueError(msg)
        if img_size % patch_size:
            msg = f"Image dimensions must be divisible by the patch size: found img_size={img_size}, patch_size={patch_size}."
            raise ValueError(msg)
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = 1 + reg_tokens
        self.no_embed_class = bool(no_embed_class)
        self.global_pool = global_pool
        self.output_dim = embed_dim * (2 if global_pool == "token+mean" else 1)
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        n_pos = grid * grid + (0 if self.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))
        self.blocks = nn.Sequential(
            *(
                Block(
                    embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    init_values=init_values,
                    mlp_layer=mlp_layer,
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(self.output_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def pos_embed_prefix_tokens(self) -> int:
        """Leading entries of ``pos_embed`` that belong to the CLS/register tokens (0 with ``no_embed_class``)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def _pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        pos = resample_pos_embed(self.pos_embed, grid, num_prefix_tokens=self.pos_embed_prefix_tokens)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            return torch.cat([*prefix, x + pos], dim=1)
        return torch.cat([*prefix, x], dim=1) + pos

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm.

        Parameters
        ----------
        x
            ``(B, C, H, W)`` float images; ``H`` and ``W`` must be multiples of ``patch_size``.

        Returns
        -------
        ``(B, T + P, D)``: the ``T = num_prefix_tokens`` CLS and register tokens first (CLS at index 0), then the
        ``P = H/p · W/p`` patch tokens in row-major order.
        """
        if x.ndim != 4:
            msg = f"Expected images of shape (B, C, H, W), found shape {tuple(x.shape)}."
            raise ValueError(msg)
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            msg = f"Expected image sides divisible by the patch size {self.patch_size}, found {h}×{w}."
            raise ValueError(msg)
        x = self._pos_embed(self.patch_embed(x), (h // self.patch_size, w // self.patch_size))
        return self.norm(self.blocks(x))

    def forward_head(self, tokens: Tensor) -> Tensor:
        """Pool ``tokens`` (``global_pool``) and apply ``head`` (an identity when ``num_classes=0``)."""
        pooled = tokens[:, 0]
        if self.global_pool == "token+mean":
            pooled = torch.cat([pooled, tokens[:, self.num_prefix_tokens :].mean(1)], dim=-1)
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, output_dim)``: the pooled final tokens (or ``head`` of them)."""
        return self.forward_head(self.forward_features(x))


def vit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads (timm ``vit_tiny_patch16_224``)."""
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def vit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16: 384 wide, 12 blocks, 6 heads (timm ``vit_small_patch16_224``)."""
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads (timm ``vit_base_patch16_224``)."""
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


def vit_large_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads (timm ``vit_large_patch16_224``; UNI adds ``init_values=1e-5``)."""
    return VisionTransformer(**{"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, **kwargs})


#: Short aliases of the constructors above.
vit_tiny = vit_tiny_patch16_224
vit_small = vit_small_patch16_224
vit_base = vit_base_patch16_224
vit_large = vit_large_patch16_224

#: SwiGLU ``mlp_ratio`` of the DINOv2-giant family in timm (``2.66667 * 2``: hidden 8192 at width 1536).
_GIANT_SWIGLU_RATIO = 2.66667 * 2


def uni(**kwargs: Any) -> VisionTransformer:
    """UNI (Chen et al. 2024): ViT-L/16 at 224 px with LayerScale (``init_values=1e-5``); 1024-d CLS token."""
    return vit_large_patch16_224(**{"img_size": 224, "init_values": 1e-5, **kwargs})


def uni2_h(**kwargs: Any) -> VisionTransformer:
    """UNI2-h (Mahmood lab 2025): ViT-H/14-style, 1536 wide, 24 blocks, 24 heads, packed SwiGLU, 8 registers.

    timm's ``vit_giant_patch14_224`` with ``depth=24, num_heads=24, embed_dim=1536, mlp_ratio=2.66667*2,
    init_values=1e-5, reg_tokens=8, no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=SiLU``, as on the model
    card; the embedding is the 1536-d CLS token.
    """
    config = {
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1536,
        "depth": 24,
        "num_heads": 24,
        "mlp_ratio": _GIANT_SWIGLU_RATIO,
        "init_values": 1e-5,
        "reg_tokens": 8,
        "no_embed_class": True,
        "mlp_layer": "swiglu_packed",
    }
    return VisionTransformer(**{**config, **kwargs})


def h_optimus_0(**kwargs: Any) -> VisionTransformer:
    """H-optimus-0 (Bioptimus 2024): ViT-g/14, 1536 wide, 40 blocks, 24 heads, packed SwiGLU, 4 registers.

    timm's ``vit_giant_patch14_reg4_dinov2`` at ``img_size=224`` with ``init_values=1e-5``; the embedding is the
    1536-d CLS token.
    """
    config = {
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "mlp_ratio": _GIANT_SWIGLU_RATIO,
        "init_values": 1e-5,
        "reg_tokens": 4,
        "no_embed_class": True,
        "mlp_layer": "swiglu_packed",
    }
    return VisionTransformer(**{**config, **kwargs})


def virchow(**kwargs: Any) -> VisionTransformer:
    """Virchow (Vorontsov et al. 2024): ViT-H/14, 1280 wide, 32 blocks, 16 heads, packed SwiGLU (ratio 5.3375).

    timm's ``vit_huge_patch14_224`` with ``init_values=1e-5, mlp_ratio=5.3375, mlp_layer=SwiGLUPacked,
    act_layer=SiLU``; the embedding is the CLS token concatenated with the mean patch token: 2560-d.
    """
    config = {
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1280,
        "depth": 32,
        "num_heads": 16,
        "mlp_ratio": 5.3375,
        "init_values": 1e-5,
        "mlp_layer": "swiglu_packed",
        "global_pool": "token+mean",
    }
    return VisionTransformer(**{**config, **kwargs})


def conch(**kwargs: Any) -> VisionTransformer:
    """CONCH's vision trunk (Lu et al. 2024): ViT-B/16 at 448 px, no LayerScale; the embedding is its 768-d CLS token.

    In the CONCH checkpoint these weights sit under ``visual.trunk.`` (see :data:`CHECKPOINT_PREFIX`); CONCH's own
    image embedding (``encode_image``) adds an attentional pooler on top, which is not part of this module.
    """
    return vit_base_patch16_224(**{"img_size": 448, **kwargs})


#: Architecture name → constructor; ``vit_tiny``/``vit_small``/``vit_base``/``vit_large`` are short aliases, and the
#: names of published encoders (``uni`` ... ``conch``) build their architectures (random weights).
VIT_ARCHS: dict[str, Callable[..., VisionTransformer]] = {
    "vit_tiny_patch16_224": vit_tiny_patch16_224,
    "vit_small_patch16_224": vit_small_patch16_224,
    "vit_base_patch16_224": vit_base_patch16_224,
    "vit_large_patch16_224": vit_large_patch16_224,
    "vit_tiny": vit_tiny_patch16_224,
    "vit_small": vit_small_patch16_224,
    "vit_base": vit_base_patch16_224,
    "vit_large": vit_large_patch16_224,
    "vit": VisionTransformer,
    "uni": uni,
    "uni2_h": uni2_h,
    "h_optimus_0": h_optimus_0,
    "virchow": virchow,
    "conch": conch,
}

#: Architecture → key prefix under which its weights sit in the published checkpoint (only the keys under the
#: prefix are read, with the prefix removed; a file without any such key is read as it is).
CHECKPOINT_PREFIX: dict[str, str] = {"conch": "visual.trunk."}


def create_vit(arch: str, **kwargs: Any) -> VisionTransformer:
    """Build a ViT by architecture name.

    Parameters
    ----------
    arch
        A key of :data:`VIT_ARCHS`; ``"vit"`` builds :class:`VisionTransformer` from ``kwargs`` alone.
    **kwargs
        Overrides of the architecture's sizes (e.g. ``img_size``, ``init_values``).

    Returns
    -------
    The randomly initialised model.
    """
    if not isinstance(arch, str) or arch not in VIT_ARCHS:
        msg = f"Unknown ViT architecture {arch!r}; expected one of {sorted(VIT_ARCHS)}."
        raise ValueError(msg)
    return VIT_ARCHS[arch](**kwargs)


def _timm_translate(model: VisionTransformer, *, prefix: str | None = None) -> Callable[[dict], dict]:
    """Select the keys under ``prefix`` and resample ``pos_embed`` to ``model``'s grid (timm's checkpoint filter)."""

    def translate(state: dict) -> dict:
        if prefix and any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        pos = state.get("pos_embed")
        n_patches = pos.shape[1] - model.pos_embed_prefix_tokens if isinstance(pos, Tensor) and pos.ndim == 3 else 0
        square = n_patches > 0 and math.isqrt(n_patches) ** 2 == n_patches
        # resample a grid laid out for another image size; any other layout is left for the strict check to report
        if square and pos.shape[1] != model.pos_embed.shape[1] and pos.shape[2] == model.embed_dim:
            grid = model.img_size // model.patch_size
            logger.info("Resampling pos_embed from %d to %d positions.", pos.shape[1], model.pos_embed.shape[1])
            pos = resample_pos_embed(pos, (grid, grid), num_prefix_tokens=model.pos_embed_prefix_tokens)
            state = {**state, "pos_embed": pos}
        return state

    return translate


def from_checkpoint(
    path: str | os.PathLike, *, arch: str = "vit_large_patch16_224", prefix: str | None = None, **kwargs: Any
) -> VisionTransformer:
    """Build a ViT and load a local timm-named checkpoint into it, strictly.

    Parameters
    ----------
    path
        File written by ``torch.save(state_dict)`` with timm names (e.g. UNI's ``pytorch_model.bin``).
    arch
        Architecture name (see :func:`create_vit`); ``"uni"``, ``"uni2_h"``, ``"h_optimus_0"``, ``"virchow"`` and
        ``"conch"`` are the published encoders' configurations.
    prefix
        Read only the keys under this prefix (removed before matching), when the file has any; default
        :data:`CHECKPOINT_PREFIX` of ``arch`` (``"visual.trunk."`` for CONCH), else none.
    **kwargs
        Architecture overrides (e.g. ``img_size``).

    Returns
    -------
    The model in eval mode with the checkpoint's weights. A ``pos_embed`` laid out for another image size is
    resampled to ``img_size``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The checkpoint's keys or shapes do not match the architecture (listed in the message).
    """
    from ._weights import load_weights

    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"No ViT weights file at {str(path)!r}. Pass the path of a local timm-named state dict."
        raise FileNotFoundError(msg)
    model = create_vit(arch, **kwargs)
    if prefix is None:
        prefix = CHECKPOINT_PREFIX.get(arch)
    load_weights(model, path, translate=_timm_translate(model, prefix=prefix))
    return model.eval()
