"""Low-rank adapters (LoRA) for frozen linear layers, single or several per layer.

``LoRALinear`` computes ``base(x) + (α/r) · B A x`` with ``A ∈ R^{r×in}`` (Kaiming-uniform) and ``B ∈ R^{out×r}``
(zeros), so a fresh adapter leaves the output unchanged. ``MultiLoRALinear`` holds ``n`` such ``(A, B)`` pairs over
one shared frozen weight and applies adapter ``v`` to the ``v``-th block of a batch laid out as
``(n · B, ...)`` (view-major) in one :func:`torch.bmm` — how MMAP runs one backbone on its three magnification
views with three adapter sets. Both subclass :class:`torch.nn.Linear` and reuse the wrapped layer's ``weight`` and
``bias`` parameters, so the state-dict names of the base weights (``...qkv.weight``) do not change; the adapters add
``...qkv.lora_A`` and ``...qkv.lora_B``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["LoRALinear", "MultiLoRALinear", "active_adapter", "inject_lora", "lora_parameters", "merge_lora"]


def _check_lora_args(base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(base, nn.Linear):
        msg = f"LoRA wraps an `nn.Linear`, found {type(base).__name__}."
        raise TypeError(msg)
    if isinstance(base, LoRALinear | MultiLoRALinear):
        msg = "This layer already carries LoRA adapters; wrap the plain `nn.Linear` instead."
        raise TypeError(msg)
    if not isinstance(rank, int) or rank < 1:
        msg = f"Expected `rank` to be a positive integer, found {rank!r}."
        raise ValueError(msg)
    if alpha <= 0:
        msg = f"Expected `alpha` to be positive, found {alpha!r}."
        raise ValueError(msg)
    if not 0.0 <= dropout < 1.0:
        msg = f"Expected `dropout` in [0, 1), found {dropout!r}."
        raise ValueError(msg)


class _AdapterBase(nn.Linear):
    """Shared set-up: adopt the frozen base parameters without allocating new ones."""

    def _adopt(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(requires_grad=False)
        if self.bias is not None:
            self.bias.requires_grad_(requires_grad=False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = float(alpha) / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _merged(self, delta: Tensor) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + delta.to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


class LoRALinear(_AdapterBase):
    """A frozen :class:`~torch.nn.Linear` plus one trainable low-rank update.

    Parameters
    ----------
    base
        The layer to adapt; its ``weight``/``bias`` parameters are reused (and frozen), not copied.
    rank
        Rank ``r`` of the update (MMAP/loralib: 16).
    alpha
        Scale numerator: the update is multiplied by ``alpha / rank`` (MMAP: 32, i.e. 2).
    dropout
        Dropout on the adapter's input (MMAP: 0).

    Examples
    --------
    >>> layer = LoRALinear(nn.Linear(8, 4), rank=2, alpha=4)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))  # B starts at zero
    True
    """

    def __init__(self, base: nn.Linear, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> None:
        _check_lora_args(base, rank, alpha, dropout)
        self._adopt(base, rank=rank, alpha=alpha, dropout=dropout)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        """The update ``(α/r) · B A`` as an ``(out, in)`` matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + (α/r) · B A dropout(x)``."""
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merge(self) -> nn.Linear:
        """A plain :class:`~torch.nn.Linear` with the update folded into its weight (same output, no dropout)."""
        return self._merged(self.delta_weight())


class MultiLoRALinear(_AdapterBase):
    """A frozen :class:`~torch.nn.Linear` shared by ``n_adapters`` low-rank updates, one per block of the batch.

    With :attr:`active` ``None`` (the default), an input of shape ``(n_adapters · B, ...)`` is read as
    ``n_adapters`` consecutive blocks of ``B`` rows and block ``v`` gets adapter ``v`` (one batched
    :func:`torch.bmm`, no loop). Setting :attr:`active` to an index (or using :func:`active_adapter`) applies that
    one adapter to every row.

    Parameters
    ----------
    base
        The layer to adapt; its parameters are reused and frozen.
    n_adapters
        Number of adapters (MMAP: 3, one per magnification view).
    rank, alpha, dropout
        As in :class:`LoRALinear`.
    """

    def __init__(
        self, base: nn.Linear, *, n_adapters: int, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0
    ) -> None:
        _check_lora_args(base, rank, alpha, dropout)
        if not isinstance(n_adapters, int) or n_adapters < 1:
            msg = f"Expected `n_adapters` to be a positive integer, found {n_adapters!r}."
            raise ValueError(msg)
        self._adopt(base, rank=rank, alpha=alpha, dropout=dropout)
        self.n_adapters = n_adapters
        self.active: int | None = None
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(n_adapters, rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, self.out_features, rank, device=w.device, dtype=w.dtype))
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta_weight(self, index: int) -> Tensor:
        """Adapter ``index``'s update ``(α/r) · B A`` as an ``(out, in)`` matrix."""
        return (self.lora_B[index] @ self.lora_A[index]) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """``base(x)`` plus, for each block ``v`` of rows, adapter ``v``'s update (or :attr:`active`'s for all)."""
        out = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        if self.active is not None:
            update = F.linear(F.linear(h, self.lora_A[self.active]), self.lora_B[self.active])
            return out + update * self.scaling
        if x.ndim < 2 or x.shape[0] % self.n_adapters:
            msg = (
                f"Expected a batch of {self.n_adapters} equal view blocks (leading size divisible by "
                f"{self.n_adapters}), found shape {tuple(x.shape)}. Lay the batch out as (view, B, ...) or select "
                "one adapter with `active_adapter`."
            )
            raise ValueError(msg)
        h = h.reshape(self.n_adapters, -1, self.in_features)
        a = self.lora_A.to(h.dtype).transpose(1, 2)
        b = self.lora_B.to(h.dtype).transpose(1, 2)
        update = torch.bmm(torch.bmm(h, a), b).reshape(out.shape)
        return out + update * self.scaling

    def merge(self, index: int) -> nn.Linear:
        """A plain :class:`~torch.nn.Linear` with adapter ``index`` folded into its weight."""
        if not 0 <= index < self.n_adapters:
            msg = f"Expected an adapter index in [0, {self.n_adapters}), found {index}."
            raise ValueError(msg)
        return self._merged(self.delta_weight(index))

    def extra_repr(self) -> str:
        """Base layer sizes, rank, alpha and number of adapters."""
        return f"{super().extra_repr()}, n_adapters={self.n_adapters}"


def inject_lora(
    vit: nn.Module,
    *,
    n_blocks: int,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    n_adapters: int = 1,
    targets: Sequence[str] = ("attn.qkv", "attn.proj"),
    freeze: bool = True,
) -> list[str]:
    """Replace the ``targets`` linears of the last ``n_blocks`` blocks of ``vit`` by LoRA layers, in place.

    Parameters
    ----------
    vit
        A module with a ``blocks`` sequence (e.g. :class:`~stpred.models.encoders.vit.VisionTransformer`).
    n_blocks
        How many of the last blocks get adapters (MMAP's reference: 9 of 24, blocks 15–23).
    rank, alpha, dropout
        As in :class:`LoRALinear`.
    n_adapters
        ``1``: :class:`LoRALinear`; more: :class:`MultiLoRALinear` with that many adapters.
    targets
        Dotted paths of the linears inside each block (MMAP: ``attn.qkv`` and ``attn.proj``; no MLP).
    freeze
        Freeze every parameter of ``vit`` except the new adapters.

    Returns
    -------
    The qualified names of the replaced layers.
    """
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        msg = f"Expected a ViT with a `blocks` attribute, found {type(vit).__name__}."
        raise TypeError(msg)
    depth = len(blocks)
    if not isinstance(n_blocks, int) or not 1 <= n_blocks <= depth:
        msg = f"Expected `n_blocks` (LoRA blocks) between 1 and the depth {depth}, found {n_blocks!r}."
        raise ValueError(msg)
    if freeze:
        for p in vit.parameters():
            p.requires_grad_(requires_grad=False)
    names = []
    for i in range(depth - n_blocks, depth):
        for target in targets:
            parent_path, _, leaf = target.rpartition(".")
            parent = blocks[i].get_submodule(parent_path) if parent_path else blocks[i]
            base = getattr(parent, leaf, None)
            if not isinstance(base, nn.Linear):
                msg = f"Block {i} has no linear layer {target!r} to adapt (found {type(base).__name__})."
                raise ValueError(msg)
            if n_adapters == 1:
                layer: nn.Linear = LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout)
            else:
                layer = MultiLoRALinear(base, n_adapters=n_adapters, rank=rank, alpha=alpha, dropout=dropout)
            setattr(parent, leaf, layer)
            names.append(f"blocks.{i}.{target}")
    return names


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Iterate over the adapter parameters (``lora_A``, ``lora_B``) of every LoRA layer in ``module``."""
    for m in module.modules():
        if isinstance(m, LoRALinear | MultiLoRALinear):
            yield m.lora_A
            yield m.lora_B


@contextmanager
def active_adapter(module: nn.Module, index: int | None) -> Iterator[None]:
    """Within the block, every :class:`MultiLoRALinear` in ``module`` applies adapter ``index`` to all rows."""
    layers = [m for m in module.modules() if isinstance(m, MultiLoRALinear)]
    previous = [m.active for m in layers]
    for m in layers:
        if index is not None and not 0 <= index < m.n_adapters:
            msg = f"Expected an adapter index in [0, {m.n_adapters}), found {index}."
            raise ValueError(msg)
        m.active = index
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m.active = p


def merge_lora(module: nn.Module, *, adapter: int = 0) -> nn.Module:
    """Fold every adapter of ``module`` into its base weight, in place (``adapter`` picks one of a multi-adapter).

    Returns
    -------
    ``module``, now holding only plain :class:`~torch.nn.Linear` layers where adapters were.
    """
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear | MultiLoRALinear):
            merged = m.merge() if isinstance(m, LoRALinear) else m.merge(adapter)
            parent_path, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            setattr(parent, leaf, merged)
    return module
