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
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
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


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self, dim: int, *, num_heads: int, mlp_ratio: float, qkv_bias: bool, init_values: float | None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
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
        Width of a linear ``head`` on the CLS token; ``0`` makes ``head`` an identity (feature extractor).

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
    ) -> None:
        super().__init__()
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
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values)
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        pos = resample_pos_embed(self.pos_embed, grid)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + pos

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm.

        Parameters
        ----------
        x
            ``(B, C, H, W)`` float images; ``H`` and ``W`` must be multiples of ``patch_size``.

        Returns
        -------
        ``(B, 1 + P, D)``: the CLS token first, then the ``P = H/p · W/p`` patch tokens in row-major order.
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
        """CLS token of ``tokens`` through ``head`` (an identity when ``num_classes=0``)."""
        return self.head(tokens[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, D)``: the normalised CLS token (or ``head`` of it)."""
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

#: Architecture name → constructor; ``vit_tiny``/``vit_small``/``vit_base``/``vit_large`` are short aliases.
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
}


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


def _timm_translate(model: VisionTransformer) -> Callable[[dict], dict]:
    """Resample a checkpoint's ``pos_embed`` to ``model``'s grid (timm's ``checkpoint_filter_fn`` idea)."""

    def translate(state: dict) -> dict:
        pos = state.get("pos_embed")
        if isinstance(pos, Tensor) and pos.ndim == 3 and pos.shape[1] != model.pos_embed.shape[1]:
            grid = model.img_size // model.patch_size
            logger.info("Resampling pos_embed from %d to %d positions.", pos.shape[1], model.pos_embed.shape[1])
            state = {**state, "pos_embed": resample_pos_embed(pos, (grid, grid))}
        return state

    return translate


def from_checkpoint(
    path: str | os.PathLike, *, arch: str = "vit_large_patch16_224", **kwargs: Any
) -> VisionTransformer:
    """Build a ViT and load a local timm-named checkpoint into it, strictly.

    Parameters
    ----------
    path
        File written by ``torch.save(state_dict)`` with timm names (e.g. UNI's ``pytorch_model.bin``).
    arch
        Architecture name (see :func:`create_vit`).
    **kwargs
        Architecture overrides; for UNI pass ``init_values=1e-5``.

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
    load_weights(model, path, translate=_timm_translate(model))
    return model.eval()
