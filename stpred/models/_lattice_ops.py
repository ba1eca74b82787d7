"""Sparse-lattice primitives for HiST: window tables, neighbour tables, dyadic coarsening, window attention.

Everything here is vectorised torch (sorts, ``unique``, scatters): no Python loop over spots or windows, no DGL.

Windows
-------
With half-size ``w`` a window is a ``2w x 2w`` block of lattice cells. The *regular* partition anchors windows at
``(0, 0)`` (window of a cell ``c``: ``c // 2w``); the *shifted* partition anchors them at ``(-w, -w)``
(``(c + w) // 2w``). A token attends to every token that shares its regular **or** its shifted window (itself
included): at most ``(2w)^2 + (2w)^2 - w^2`` = 63 tokens for ``w = 3``.

Instead of gathering an ``(N, 63)`` key table per token (63 copies of every key vector), attention is computed
window by window on the two partitions: every token is a member of exactly one regular and one shifted window,
so keys and values are stored once per window slot. The shifted-window part skips keys that share the query's
regular window (they are already counted), and the two partial softmaxes are merged exactly with their
log-sum-exp statistics. The result equals a masked softmax over the neighbour table of :func:`neighbour_table`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CoarseMap",
    "LevelTables",
    "SlidePlan",
    "WindowTable",
    "build_plan",
    "build_window_table",
    "coarsen_map",
    "gather_children",
    "level_tables",
    "neighbour_table",
    "pack_children",
    "window_attention",
    "window_attention_packed",
]

_NEG = -1e9


@dataclass
class WindowTable:
    """Tokens grouped by window (one partition).

    Attributes
    ----------
    members
        ``(W, K)`` long: token index of each window slot; empty slots hold ``n`` (one past the last token).
    slot
        ``(n,)`` long: flat position ``window * K + rank`` of each token in ``members``.
    rel
        ``(W, K, K)`` long: index of the offset key − query into a ``(4w - 1)^2`` relative-position table; masked
        pairs hold ``(4w - 1)^2`` (one past the table).
    pair
        ``(W, K, K)`` bool: whether query slot ``i`` attends to key slot ``j`` of the window.
    """

    members: Tensor
    slot: Tensor
    rel: Tensor
    pair: Tensor


@dataclass
class LevelTables:
    """The two window partitions of one lattice level."""

    coords: Tensor
    regular: WindowTable
    shifted: WindowTable

    @property
    def n(self) -> int:
        """Number of tokens at this level."""
        return int(self.coords.shape[0])


@dataclass
class CoarseMap:
    """Dyadic coarsening of one level: child ``i`` goes to slot ``slot[i]`` (0..3) of parent ``parent[i]``."""

    parent: Tensor
    slot: Tensor
    n_parent: int


@dataclass
class SlidePlan:
    """Everything a HiST forward needs about a slide's geometry: tables per level, maps between levels."""

    levels: list[LevelTables]
    maps: list[CoarseMap]


def _pair_key(coords: Tensor) -> Tensor:
    """Lexicographic int64 key of non-negative ``(n, 2)`` integer coordinates."""
    stride = coords[:, 1].max() + 1 if coords.shape[0] else 1
    return coords[:, 0] * stride + coords[:, 1]


def build_window_table(
    coords: Tensor,
    window: int,
    *,
    shifted: bool,
    exclude: Tensor | None = None,
    k_pad: int | None = None,
) -> WindowTable:
    """Group the tokens of one level by window.

    Parameters
    ----------
    coords
        ``(n, 2)`` long, non-negative, unique lattice coordinates.
    window
        Half window size ``w`` (windows are ``2w x 2w`` cells).
    shifted
        Use the partition anchored at ``(-w, -w)`` instead of ``(0, 0)``.
    exclude
        ``(n,)`` long group labels: a query does not attend to keys with the same label (used to drop, from the
        shifted part, the keys already in the query's regular window).
    k_pad
        Pad every window to this many slots (default: the largest window occupancy). Only for tests.

    Returns
    -------
    The :class:`WindowTable`.
    """
    n = coords.shape[0]
    side = 2 * window
    c = coords + window if shifted else coords
    win = torch.div(c, side, rounding_mode="floor")
    local = c - win * side
    inv = torch.unique(_pair_key(win), return_inverse=True)[1]
    n_win = int(inv.max()) + 1 if n else 0
    # sort by (window, cell within window): ranks then depend on positions only, never on the row order
    order = torch.argsort(inv * side * side + local[:, 0] * side + local[:, 1])
    counts = torch.bincount(inv, minlength=n_win)
    starts = torch.cumsum(counts, 0) - counts
    w_sorted = inv[order]
    rank = torch.arange(n, device=coords.device) - starts[w_sorted]
    k = int(counts.max()) if n else 1
    if k_pad is not None:
        k = max(k, int(k_pad))
    members = torch.full((n_win, k), n, dtype=torch.long, device=coords.device)
    members[w_sorted, rank] = order
    slot = torch.empty(n, dtype=torch.long, device=coords.device)
    slot[order] = w_sorted * k + rank

    valid = members < n
    pad_c = torch.cat([coords, coords.new_zeros(1, 2)])
    cm = pad_c[members]  # (W, K, 2)
    d = cm[:, None, :, :] - cm[:, :, None, :]  # d[w, i, j] = c_j - c_i (key - query)
    rel = (d[..., 0] + side - 1) * (2 * side - 1) + (d[..., 1] + side - 1)
    pair = valid[:, :, None] & valid[:, None, :]
    if exclude is not None:
        lab = torch.cat([exclude, exclude.new_full((1,), -1)])[members]
        pair &= lab[:, :, None] != lab[:, None, :]
    rel = rel.masked_fill(~pair, (2 * side - 1) ** 2)  # masked pairs index one extra (-1e9) bias column
    return WindowTable(members=members, slot=slot, rel=rel, pair=pair)


def _regular_labels(coords: Tensor, window: int) -> Tensor:
    win = torch.div(coords, 2 * window, rounding_mode="floor")
    return torch.unique(_pair_key(win), return_inverse=True)[1]


def level_tables(coords: Tensor, window: int, *, k_pad: int | None = None) -> LevelTables:
    """Regular and shifted window tables of one level (see the module docstring)."""
    regular = build_window_table(coords, window, shifted=False, k_pad=k_pad)
    shifted = build_window_table(coords, window, shifted=True, exclude=_regular_labels(coords, window), k_pad=k_pad)
    return LevelTables(coords=coords, regular=regular, shifted=shifted)


def coarsen_map(coords: Tensor) -> tuple[Tensor, CoarseMap]:
    """Parents of a level: ``coords // 2``, sorted lexicographically, with each child's parent and slot.

    Parameters
    ----------
    coords
        ``(n, 2)`` long, non-negative, unique.

    Returns
    -------
    ``(parent_coords (P, 2), CoarseMap)``; the slot of child ``c`` is ``2 * (c_x % 2) + (c_y % 2)``.
    """
    pc = torch.div(coords, 2, rounding_mode="floor")
    slot = (coords[:, 0] - 2 * pc[:, 0]) * 2 + (coords[:, 1] - 2 * pc[:, 1])
    stride = pc[:, 1].max() + 1
    uniq, parent = torch.unique(pc[:, 0] * stride + pc[:, 1], return_inverse=True)
    parent_coords = torch.stack([torch.div(uniq, stride, rounding_mode="floor"), uniq % stride], dim=1)
    return parent_coords, CoarseMap(parent=parent, slot=slot, n_parent=int(uniq.shape[0]))


def pack_children(x: Tensor, cmap: CoarseMap) -> Tensor:
    """``(n, C)`` child features → ``(P, 4, C)`` zero-filled parent slots."""
    buf = x.new_zeros(cmap.n_parent * 4, x.shape[1])
    buf = buf.index_copy(0, cmap.parent * 4 + cmap.slot, x)
    return buf.view(cmap.n_parent, 4, x.shape[1])


def gather_children(u: Tensor, cmap: CoarseMap) -> Tensor:
    """``(P, 4, C)`` parent slots → ``(n, C)`` features of the active children, in the children's order."""
    return u[cmap.parent, cmap.slot]


def build_plan(coords: Tensor, *, window: int, n_levels: int, k_pad: int | None = None) -> SlidePlan:
    """Window tables of every level and the coarsening maps between them.

    Parameters
    ----------
    coords
        ``(n, 2)`` long, non-negative, unique lattice coordinates of the slide's spots (level 0).
    window
        Half window size.
    n_levels
        Number of lattice levels (level ``l`` has the coordinates ``c // 2**l``, deduplicated).
    k_pad
        Pad windows to this many slots (tests only).

    Returns
    -------
    The :class:`SlidePlan`.
    """
    levels = [level_tables(coords, window, k_pad=k_pad)]
    maps = []
    c = coords
    for _ in range(n_levels - 1):
        c, cmap = coarsen_map(c)
        maps.append(cmap)
        levels.append(level_tables(c, window, k_pad=k_pad))
    return SlidePlan(levels=levels, maps=maps)


def neighbour_table(coords: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Padded neighbour table: every token that shares the regular or the shifted window of a token.

    Parameters
    ----------
    coords
        ``(n, 2)`` long, non-negative, unique lattice coordinates.
    window
        Half window size.

    Returns
    -------
    ``(index (n, K), mask (n, K))``: neighbour indices (padding = ``n``) and their validity; ``K`` is the largest
    neighbourhood (at most ``(2w)^2 + (2w)^2 - w^2``). The token itself is included.
    """
    lv = level_tables(coords, window)
    parts_i, parts_m = [], []
    for t in (lv.regular, lv.shifted):
        k = t.members.shape[1]
        w, r = t.slot // k, t.slot % k
        parts_i.append(t.members[w])
        parts_m.append(t.pair[w, r])
    idx, mask = torch.cat(parts_i, 1), torch.cat(parts_m, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    idx, mask = idx.gather(1, order), mask.gather(1, order)
    kmax = int(mask.sum(1).max())
    idx, mask = idx[:, :kmax], mask[:, :kmax]
    return idx.masked_fill(~mask, coords.shape[0]), mask


def _window_part(
    qkv: Tensor, table: WindowTable, bias: Tensor, *, scale: float, drop: float, training: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised attention inside the windows of one partition, returned per token: ``(m, l, o)``.

    ``qkv`` is ``(3, H, n + 1, d)`` with a zero last token for empty slots; ``bias`` is ``(H, R + 1)`` whose last
    column (``-1e9``) is what masked pairs index (``table.rel``), so masking costs no extra pass.
    """
    nw, kk = table.members.shape
    g = qkv[:, :, table.members]  # (3, H, W, K, d): every token's q, k, v stored once per window slot
    q, k, v = g.unbind(0)
    # scores and softmax statistics in (at least) float32, also under autocast
    acc = torch.promote_types(qkv.dtype, torch.float32)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc)  # (H, W, K, K)
    s.mul_(scale).add_(bias[:, table.rel].to(acc))
    with torch.no_grad():
        m = s.amax(dim=-1, keepdim=True)
    # rows with no valid key (shifted part only) get m ~ -1e9 and drop out of the merge in `window_attention`
    p = s.sub_(m).exp_()
    lsum = p.sum(dim=-1)
    if drop > 0 and training:
        p = F.dropout(p, drop, training=True)
    o = torch.matmul(p.to(v.dtype), v)  # (H, W, K, d)
    h, dh = o.shape[0], o.shape[-1]
    o = o.reshape(h, nw * kk, dh)[:, table.slot]  # (H, n, d)
    m = m.reshape(h, nw * kk)[:, table.slot]
    lsum = lsum.reshape(h, nw * kk)[:, table.slot]
    return m, lsum, o


def window_attention_packed(
    qkv: Tensor, level: LevelTables, bias: Tensor, *, drop: float = 0.0, training: bool = False
) -> Tensor:
    """:func:`window_attention` on packed ``(n, 3, H, d)`` queries, keys and values; returns ``(n, H * d)``."""
    n, _, h, dh = qkv.shape
    scale = dh**-0.5
    # one relayout for both partitions: (3, H, n + 1, d) with a zero token for the empty window slots
    qkv = F.pad(qkv.permute(1, 2, 0, 3), (0, 0, 0, 1))
    bias = torch.cat([bias, bias.new_full((bias.shape[0], 1), _NEG)], dim=1)
    m1, l1, o1 = _window_part(qkv, level.regular, bias, scale=scale, drop=drop, training=training)
    m2, l2, o2 = _window_part(qkv, level.shifted, bias, scale=scale, drop=drop, training=training)
    mx = torch.maximum(m1, m2)  # m1 is finite: a token always attends to itself through its regular window
    a1, a2 = torch.exp(m1 - mx), torch.exp(m2 - mx)  # a2 = 0 where the shifted part is empty
    w1 = (a1 / (a1 * l1 + a2 * l2)).unsqueeze(-1)
    w2 = (a2 / (a1 * l1 + a2 * l2)).unsqueeze(-1)
    out = (w1 * o1 + w2 * o2).to(qkv.dtype)  # (H, n, d)
    return out.permute(1, 0, 2).reshape(n, h * dh)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    level: LevelTables,
    bias: Tensor,
    *,
    drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Softmax attention of every token over the union of its regular and shifted windows.

    Parameters
    ----------
    q, k, v
        ``(n, H, d)`` queries, keys and values.
    level
        Window tables of the level.
    bias
        ``(H, (4w - 1)^2)`` relative-position bias (added to the scaled scores, indexed by key − query).
    drop
        Dropout probability on the normalised attention weights.
    training
        Apply dropout.

    Returns
    -------
    ``(n, H, d)`` attention outputs.
    """
    out = window_attention_packed(torch.stack([q, k, v], dim=1), level, bias, drop=drop, training=training)
    return out.view(q.shape)
