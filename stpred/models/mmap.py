"""MMAP: multi-magnification and prototype-enhanced spot expression prediction.

"MMAP: A Multi-Magnification and Prototype-Aware Architecture for Predicting Spatial Gene Expression" (PRICAI 2025,
arXiv:2510.11344). Details the paper leaves open follow the authors' released code; ``docs/models.md`` lists every
remaining difference.

Phase 1 (local, multi-magnification)
    Each spot crop gives three views: the full crop, a ½-side crop and a ¼-side crop, each resized back to the
    crop size (bilinear; random positions in training, centred at inference). One frozen ViT encodes the ``3·B``
    views in a single call, with a separate LoRA adapter set per view on ``attn.qkv``/``attn.proj`` of its last
    blocks (equivalent to the reference's three frozen copies, each with its own adapters). A one-query attention
    block lets the CLS token of the ¼ view (highest magnification) attend over
    ``[CLS₂, patch tokens of view 0, patch tokens of view 1]``; ``head1`` reads the fused token, ``head2`` the raw
    CLS₂; ``pred1 = (head1 + head2) / 2``. Loss: ``MSE + 0.1 · L_mag(fused, CLS₂)``.
Phase 2 (global, per-slide prototypes)
    Phase 1 is frozen. Each slide's fused features are clustered by K-means into ``K = clip(N // 5, 32, 80)``
    prototypes (fixed seed); a spot attends from its own feature to its ``L = ⌊K/2⌋`` most cosine-similar
    prototypes of its slide (padded to ``⌊80/2⌋ = 40`` with a key-padding mask); ``head3`` reads the result. The
    prediction is the mean of the three heads; the loss is ``MSE + 0.1 · L_align(fused₂, feature)``.

Differences from the authors' released code, each an option here:

================================  ======================  =====================================
behaviour                         default (paper)         reference code
================================  ======================  =====================================
view crops at inference           centred                 random (``random_crops_at_inference``)
magnification / alignment loss    ``1 - cos``             in-batch hinge (``mag_loss="hinge"``)
phase-1 loss warm-up              none                    first 10 % (``mag_loss_warmup=0.1``)
prediction from the three heads   equal mean              ¼, ¼, ½ (``head_weights="reference"``)
padded prototype slots            masked out              zero tokens (``proto_padding="zeros"``)
backbone                          ViT-S/16 (CPU-sized)    UNI ViT-L/16 (``backbone="vit_large"``,
                                                          ``backbone_weights=<file>``,
                                                          ``backbone_kwargs={"init_values": 1e-5}``)
================================  ======================  =====================================

Engine protocol (the hooks :func:`stpred.tl.fit` and ``Predictor.predict`` call)
--------------------------------------------------------------------------------
1. The per-spot store holds ``"spot"`` (uint8 crops), ``"slide"`` (section index) and ``"target"``
   (:attr:`MMAP.inputs` declares ``("spot", "slide")`` up front; phase 1 ignores ``"slide"``).
2. For each ``phase`` in :attr:`MMAP.phases` = ``(1, 2)``: ``model.set_phase(phase)`` (only that phase's
   parameters keep ``requires_grad``: LoRA adapters, ``local_attn``, ``head1``, ``head2`` in phase 1;
   ``global_attn``, ``head3`` in phase 2), then ``model.prepare_slides(store, groups)`` with one row-index array
   per slide, then training with a **new optimizer** over the parameters that require grad, calling
   :meth:`MMAP.augment` on training batches (dihedral flips in phase 1; it also records ``progress`` for the
   optional warm-up).
3. ``prepare_slides`` does nothing in phase 1. In phase 2 it runs :meth:`MMAP.encode` (frozen phase 1, eval mode,
   no gradients) over every spot of the groups, calls :meth:`MMAP.build_prototypes` per slide, and caches the
   features and phase-1 predictions in the store as ``"feature"``/``"pred1"``; :meth:`MMAP.forward` then uses
   them instead of running the backbone (without them it recomputes them with :meth:`MMAP.encode`).
4. Prediction on any slide (a new one, or after :func:`stpred.tl.load`): ``prepare_slides(store, groups)`` on the
   slides to predict first (transductive per slide, as in the paper: no labels are used), then ``forward``.
   The prototype bank (``proto_bank``/``proto_mask``/``proto_slides``) and the phase (``current_phase``) are
   buffers in the state dict; ``load_state_dict`` resizes the bank and re-applies the phase.

Without the engine: ``set_phase(2)``; ``feats = encode(batch)["feature"]`` over all spots of each slide;
``build_prototypes(feats, slide)``; then ``forward({"spot": ..., "slide": ...})``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._constants import BatchKeys
from .._imaging import imagenet_normalize, standardize
from .._validate import check_one_of, check_positive
from ._augment import brightness_contrast, dihedral, elastic
from ._base import LossOutput, RandomWeightsWarning, StpredModel, TrainDefaults
from ._kmeans import kmeans
from ._registry import register_model
from .encoders.lora import inject_lora, lora_parameters
from .encoders.vit import VIT_ARCHS, VisionTransformer, create_vit, from_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["MMAP", "MMAPConfig", "QueryAttention", "RandomBackboneWarning"]


class RandomBackboneWarning(RandomWeightsWarning):
    """Raised when an :class:`MMAP` is built without pretrained backbone weights (``backbone_weights=None``)."""

_N_VIEWS = 3


@dataclass(frozen=True)
class MMAPConfig:
    """Hyper-parameters of :class:`MMAP`; values in parentheses are the paper's or the authors' released code's.

    Parameters
    ----------
    n_genes
        Number of genes to predict (from the data).
    backbone
        ViT architecture (a key of :data:`~stpred.models.encoders.vit.VIT_ARCHS`). The paper uses UNI
        (``"vit_large_patch16_224"`` with ``init_values=1e-5``); the default ViT-S/16 keeps CPU runs feasible.
    backbone_weights
        Local timm-named checkpoint for the backbone (e.g. UNI's ``pytorch_model.bin``); ``None``: random init.
    backbone_kwargs
        Architecture overrides passed to the constructor (``img_size``, ``init_values``, widths for tests).
    lora_rank, lora_alpha, lora_dropout
        LoRA rank 16, α 32, dropout 0 (released code).
    lora_blocks
        Adapters on the last ``lora_blocks`` blocks (released code: 9 of 24, blocks 15–23).
    pixel_norm
        ``"imagenet"``: ImageNet mean/std (released code; what UNI expects); ``"per_image"``: standardise each view per
        channel.
    random_crops_at_inference
        Take the ½ and ¼ crops at random positions also in eval mode and in :meth:`MMAP.encode` (released
        code); by default they are centred at inference.
    augment
        Training augmentation of the spot crop in phase 1 (:meth:`MMAP.augment`): random flips / 90° rotations /
        transposes, then the brightness/contrast jitter and the elastic deformation below, in the order of the
        authors' released code. ``False`` turns all of it off.
    brightness_contrast_p
        Probability of a random brightness/contrast change per crop (released code: 0.1); ``0`` turns it off.
    brightness_limit, contrast_limit
        Largest brightness shift (fraction of white) and relative contrast change (released code: 0.2 and 0.2,
        the defaults of the albumentations transform it uses).
    elastic_p
        Probability of an elastic deformation per crop (released code: 0.5); ``0`` turns it off.
    elastic_alpha, elastic_sigma
        Scale and smoothness of the elastic displacement field, in pixels of the crop (released code: 120 and 6
        on 224 px crops).
    attn_heads, attn_dim_head, attn_dropout
        One-query attention: 8 heads × 64, output dropout 0.2 (released code).
    mag_loss
        ``"cosine"``: mean ``1 - cos`` (paper); ``"hinge"``: the reference's in-batch loss, ``1 - cos`` on matching
        pairs plus ``max(0, cos - margin)`` on all other pairs of the batch, summed and divided by the batch size
        (released code). Used for the phase-1 magnification loss and the phase-2 alignment loss.
    mag_loss_margin
        Hinge margin (released code: 0.2).
    mag_loss_weight
        γ₁ = 0.1 (released code).
    mag_loss_warmup
        Fraction of phase-1 training with the magnification loss switched off (released code: 5 of 50 epochs = 0.1).
    align_weight
        γ₂ = 0.1 (released code).
    proto_k_min, proto_k_max, proto_spots_per_k
        K = clip(N // 5, 32, 80) prototypes per slide of N spots (released code).
    proto_top_frac
        Each spot attends to its top ``⌊K · 0.5⌋`` prototypes by cosine (released code).
    proto_metric
        K-means metric: ``"euclidean"`` on the raw features (released code) or ``"cosine"``.
    proto_n_init
        K-means restarts (scikit-learn ≥ 1.4's k-means++ default: 1).
    proto_seed
        K-means seed (released code: 42).
    proto_padding
        ``"mask"``: padded prototype slots are masked out of the attention; ``"zeros"``: they enter as zero tokens
        (released code).
    head_weights
        ``"mean"``: final prediction = mean of the three heads (paper); ``"reference"``: ¼·head1 + ¼·head2 +
        ½·head3 (released code).
    phase
        Last phase :func:`stpred.tl.fit` trains: ``2`` (default) runs phase 1 then phase 2; ``1`` stops after phase 1
        (predictions are then the mean of the two phase-1 heads). The model is built in phase 1; change it at
        run time with :meth:`MMAP.set_phase`.
    train
        Optimisation defaults for each phase: Adam, lr 1e-5, no weight decay, cosine to 1e-6, 50 epochs, batch 16
        (released code).
    """

    n_genes: int
    backbone: str = "vit_small_patch16_224"
    backbone_weights: str | None = None
    backbone_kwargs: dict[str, Any] | None = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_blocks: int = 9
    pixel_norm: Literal["imagenet", "per_image"] = "imagenet"
    random_crops_at_inference: bool = False
    augment: bool = True
    brightness_contrast_p: float = 0.1
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    elastic_p: float = 0.5
    elastic_alpha: float = 120.0
    elastic_sigma: float = 6.0
    attn_heads: int = 8
    attn_dim_head: int = 64
    attn_dropout: float = 0.2
    mag_loss: Literal["cosine", "hinge"] = "cosine"
    mag_loss_margin: float = 0.2
    mag_loss_weight: float = 0.1
    mag_loss_warmup: float = 0.0
    align_weight: float = 0.1
    proto_k_min: int = 32
    proto_k_max: int = 80
    proto_spots_per_k: int = 5
    proto_top_frac: float = 0.5
    proto_metric: Literal["euclidean", "cosine"] = "euclidean"
    proto_n_init: int = 1
    proto_seed: int = 42
    proto_padding: Literal["mask", "zeros"] = "mask"
    head_weights: Literal["mean", "reference"] = "mean"
    phase: int = 2
    train: TrainDefaults = field(
        default=TrainDefaults(
            lr=1e-5, weight_decay=0.0, optimizer="adam", scheduler="cosine", min_lr=1e-6, max_epochs=50, batch_size=16
        )
    )

    def __post_init__(self) -> None:
        if isinstance(self.train, Mapping):
            object.__setattr__(self, "train", TrainDefaults(**self.train))
        if not isinstance(self.train, TrainDefaults):
            msg = f"Expected `train` to be a TrainDefaults or a dict, found {type(self.train).__name__}."
            raise TypeError(msg)
        if self.backbone_kwargs is not None:
            if not isinstance(self.backbone_kwargs, Mapping):
                msg = f"Expected `backbone_kwargs` to be a dict, found {type(self.backbone_kwargs).__name__}."
                raise TypeError(msg)
            object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        check_one_of(self.backbone, sorted(VIT_ARCHS), name="backbone")
        check_one_of(self.pixel_norm, ("imagenet", "per_image"), name="pixel_norm")
        check_one_of(self.mag_loss, ("cosine", "hinge"), name="mag_loss")
        check_one_of(self.proto_metric, ("euclidean", "cosine"), name="proto_metric")
        check_one_of(self.proto_padding, ("mask", "zeros"), name="proto_padding")
        check_one_of(self.head_weights, ("mean", "reference"), name="head_weights")
        check_one_of(self.phase, (1, 2), name="phase")
        for name in ("n_genes", "lora_rank", "lora_blocks", "attn_heads", "attn_dim_head", "proto_spots_per_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                msg = f"Expected `{name}` to be an integer, found {value!r}."
                raise TypeError(msg)
            check_positive(value, name=name)
        for name in ("lora_alpha", "mag_loss_margin"):
            check_positive(getattr(self, name), name=name)
        for name in ("mag_loss_weight", "align_weight"):
            check_positive(getattr(self, name), name=name, strict=False)
        for name in ("lora_dropout", "attn_dropout", "mag_loss_warmup", "brightness_limit", "contrast_limit"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                msg = f"Expected `{name}` in [0, 1), found {value!r}."
                raise ValueError(msg)
        for name in ("brightness_contrast_p", "elastic_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                msg = f"Expected `{name}` in [0, 1], found {value!r}."
                raise ValueError(msg)
        check_positive(self.elastic_sigma, name="elastic_sigma")
        check_positive(self.elastic_alpha, name="elastic_alpha", strict=False)
        if not 0.0 < self.proto_top_frac <= 1.0:
            msg = f"Expected `proto_top_frac` in (0, 1], found {self.proto_top_frac!r}."
            raise ValueError(msg)
        if not 1 <= self.proto_k_min <= self.proto_k_max:
            msg = (
                "Expected 1 <= `proto_k_min` <= `proto_k_max`, found "
                f"proto_k_min={self.proto_k_min}, proto_k_max={self.proto_k_max}."
            )
            raise ValueError(msg)
        check_positive(self.proto_n_init, name="proto_n_init")


class QueryAttention(nn.Module):
    """One-query cross-attention: token 0 attends over all tokens (MMAP's fusion block).

    ``LayerNorm`` on all tokens, bias-free ``q``/``k``/``v`` projections to ``heads × dim_head``, the query taken
    from token 0 only, softmax attention, an output projection back to ``dim`` and dropout. No residual, no MLP.

    Parameters
    ----------
    dim
        Token width.
    heads, dim_head
        Attention heads and their width.
    dropout
        Dropout on the output.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attend from token 0.

        Parameters
        ----------
        tokens
            ``(B, N, dim)``.
        key_mask
            ``(B, N)`` bool, ``True`` for tokens that may be attended to (token 0 must be ``True``); ``None``: all.

        Returns
        -------
        ``(B, dim)``.
        """
        b, n, _ = tokens.shape
        h = self.norm(tokens)
        q = self.to_q(h[:, :1]).reshape(b, 1, self.heads, -1).transpose(1, 2)
        k = self.to_k(h).reshape(b, n, self.heads, -1).transpose(1, 2)
        v = self.to_v(h).reshape(b, n, self.heads, -1).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, 1, dim_head)
        return self.dropout(self.to_out(out.reshape(b, -1)))


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode inside the block and restore each submodule's flag afterwards."""
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _similarity_loss(a: Tensor, b: Tensor, *, kind: str, margin: float) -> Tensor:
    """``"cosine"``: mean ``1 - cos(aᵢ, bᵢ)``; ``"hinge"``: in-batch contrastive loss of the released code."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    if kind == "cosine":
        return (1.0 - (a * b).sum(-1)).mean()
    sim = a @ b.T
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    positive = (1.0 - sim.diagonal()).sum()
    negative = F.relu(sim - margin).masked_fill(eye, 0.0).sum()
    return (positive + negative) / sim.shape[0]


@register_model("mmap")
class MMAP(StpredModel):
    """MMAP: multi-magnification LoRA-ViT features (phase 1) refined by per-slide prototypes (phase 2).

    Parameters
    ----------
    n_genes
        Number of genes to predict.
    **config
        Any field of :class:`MMAPConfig` (an unknown name raises a :class:`TypeError`).

    Raises
    ------
    FileNotFoundError
        ``backbone_weights`` names a file that does not exist.
    ValueError
        An option has an unknown value, or ``lora_blocks`` exceeds the backbone's depth.

    Notes
    -----
    The engine protocol for the two phases is in the module docstring (:mod:`stpred.models.mmap`).

    Examples
    --------
    >>> tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    >>> model = MMAP(5, backbone="vit", backbone_kwargs=tiny, lora_blocks=2, attn_heads=2, attn_dim_head=8)
    >>> spot = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    >>> model.eval()(dict(spot=spot))["pred"].shape
    torch.Size([4, 5])
    """

    #: Batch keys the engine supplies; ``"slide"`` is only read in phase 2 but declared up front, because the
    #: engine builds its per-spot arrays once, before phase 1.
    inputs: tuple[str, ...] = (BatchKeys.SPOT, BatchKeys.SLIDE)
    batching = "spots"
    @property
    def phases(self) -> tuple[int, ...]:
        """Training phases the engine runs, in order (``set_phase`` then ``prepare_slides`` before each)."""
        return tuple(range(1, self.config.phase + 1))

    def __init__(self, n_genes: int, **config: Any) -> None:
        super().__init__()
        self.config = cfg = MMAPConfig(n_genes, **config)
        kwargs = dict(cfg.backbone_kwargs or {})
        if cfg.backbone_weights is not None:
            self.backbone: VisionTransformer = from_checkpoint(cfg.backbone_weights, arch=cfg.backbone, **kwargs)
        else:
            self.backbone = create_vit(cfg.backbone, **kwargs)
            warnings.warn(
                f"MMAP's backbone is randomly initialised ({cfg.backbone!r}, `backbone_weights=None`); the paper's "
                "model uses a pretrained UNI ViT-L/16 and only trains LoRA adapters and heads on it. Load weights "
                "from a local timm-named checkpoint with `backbone_weights='path/to/pytorch_model.bin'` (for UNI also "
                "`backbone='vit_large_patch16_224', backbone_kwargs={'init_values': 1e-5}`). A saved predictor "
                "restored with `stpred.tl.load` replaces these random weights with its own.",
                RandomBackboneWarning,
                stacklevel=2,
            )
        if cfg.lora_blocks > self.backbone.depth:
            msg = (
                f"`lora_blocks`={cfg.lora_blocks} exceeds the depth {self.backbone.depth} of backbone "
                f"{cfg.backbone!r}; pass lora_blocks <= {self.backbone.depth}."
            )
            raise ValueError(msg)
        inject_lora(
            self.backbone,
            n_blocks=cfg.lora_blocks,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            n_adapters=_N_VIEWS,
        )
        dim = self.feature_dim = self.backbone.embed_dim
        attn = {"heads": cfg.attn_heads, "dim_head": cfg.attn_dim_head, "dropout": cfg.attn_dropout}
        self.local_attn = QueryAttention(dim, **attn)
        self.head1 = nn.Linear(dim, n_genes)
        self.head2 = nn.Linear(dim, n_genes)
        self.global_attn = QueryAttention(dim, **attn)
        self.head3 = nn.Linear(dim, n_genes)
        self.register_buffer("proto_bank", torch.zeros(0, cfg.proto_k_max, dim))
        self.register_buffer("proto_mask", torch.zeros(0, cfg.proto_k_max, dtype=torch.bool))
        self.register_buffer("proto_slides", torch.zeros(0, dtype=torch.long))
        self.register_buffer("current_phase", torch.tensor(1))
        self.register_load_state_dict_post_hook(_restore_phase)
        self._progress = 1.0
        self.set_phase(1)  # built in phase 1; `config.phase` is the last phase `tl.fit` trains

    def init_head_bias(self, mean: Tensor) -> None:
        """Start the three heads at the mean training target (called by :func:`stpred.tl.fit`).

        Not in the reference, whose heads start near zero: with ``log_share`` targets near ln(1/250) the first
        epochs would only learn that offset, and at MMAP's small learning rate (1e-5) that takes long.
        """
        with torch.no_grad():
            for head in (self.head1, self.head2, self.head3):
                head.bias.copy_(mean.to(head.bias))

    # ------------------------------------------------------------------ phases
    @property
    def phase(self) -> int:
        """The current training phase (1 or 2)."""
        return self._phase

    def _phase_parameters(self, phase: int) -> list[nn.Parameter]:
        if phase == 1:
            return [
                *lora_parameters(self.backbone),
                *self.local_attn.parameters(),
                *self.head1.parameters(),
                *self.head2.parameters(),
            ]
        return [*self.global_attn.parameters(), *self.head3.parameters()]

    def set_phase(self, phase: int) -> None:
        """Switch to phase ``1`` or ``2``: only that phase's parameters keep ``requires_grad``.

        Phase 1 trains the LoRA adapters, ``local_attn``, ``head1`` and ``head2``; phase 2 trains ``global_attn`` and
        ``head3``. The frozen backbone weights never train. Rebuild the optimizer after switching.
        """
        check_one_of(phase, (1, 2), name="phase")
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self._phase_parameters(phase):
            p.requires_grad_(True)
        self._phase = int(phase)
        self.current_phase.fill_(int(phase))

    # ------------------------------------------------------------------ phase 1
    def _standardize(self, x: Tensor) -> Tensor:
        """Normalise views scaled to [0, 1] as ``config.pixel_norm`` says."""
        if self.config.pixel_norm == "imagenet":
            return imagenet_normalize(x)
        return standardize(x, eps=1e-3 / 255.0).to(x.dtype)  # flat below 1e-3 grey level, as for HiFusion

    def make_views(self, x: Tensor, *, random: bool) -> Tensor:
        """The three magnification views of a batch of crops, as one batch.

        Parameters
        ----------
        x
            ``(B, C, H, W)`` images (float, or uint8 converted to ``[0, 1]``).
        random
            Place the ½ and ¼ crops at uniformly random integer positions (per image); otherwise centre them.

        Returns
        -------
        ``(3, B, C, H, W)`` float: the full image, the ``H/2 × W/2`` crop and the ``H/4 × W/4`` crop, each resized
        back to ``H × W`` (bilinear, ``align_corners=False``).
        """
        if x.ndim != 4:
            msg = f"Expected spot crops of shape (B, C, H, W), found shape {tuple(x.shape)}."
            raise ValueError(msg)
        if not x.is_floating_point():
            x = x.float() / 255.0
        b, _, h, w = x.shape
        if h < 4 or w < 4:
            msg = f"Expected spot crops of at least 4×4 pixels for the ¼ view, found {h}×{w}."
            raise ValueError(msg)
        views = [x]
        batch = torch.arange(b, device=x.device)[:, None, None]
        for frac in (2, 4):
            ch, cw = h // frac, w // frac
            if random:
                oy = torch.randint(0, h - ch + 1, (b,), device=x.device)
                ox = torch.randint(0, w - cw + 1, (b,), device=x.device)
            else:
                oy = torch.full((b,), (h - ch) // 2, device=x.device)
                ox = torch.full((b,), (w - cw) // 2, device=x.device)
            rows = (oy[:, None] + torch.arange(ch, device=x.device))[:, :, None]
            cols = (ox[:, None] + torch.arange(cw, device=x.device))[:, None, :]
            crop = x[batch, :, rows, cols].permute(0, 3, 1, 2)  # (B, C, ch, cw)
            views.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
        return torch.stack(views)

    def _phase1(self, spot: Tensor, *, random: bool) -> dict[str, Tensor]:
        views = self.make_views(spot, random=random)
        b = views.shape[1]
        tokens = self.backbone.forward_features(self._standardize(views.flatten(0, 1)))  # view-major (3B, 1+P, D)
        tokens = tokens.unflatten(0, (_N_VIEWS, b))
        cls2 = tokens[2, :, 0]
        p = self.backbone.num_prefix_tokens  # CLS (+ register tokens of UNI2-h / H-optimus-0) before the patches
        seq = torch.cat([tokens[2, :, :1], tokens[0, :, p:], tokens[1, :, p:]], dim=1)
        fused = self.local_attn(seq)
        pred1 = 0.5 * (self.head1(fused) + self.head2(cls2))
        return {"pred": pred1, "feature": fused, "cls": cls2}

    @torch.no_grad()
    def encode(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Frozen phase-1 outputs of a batch, as cached for phase 2.

        Runs in eval mode (no dropout; crops centred unless ``random_crops_at_inference``) without gradients,
        whatever the module's mode.

        Parameters
        ----------
        batch
            Needs ``"spot"``: ``(B, 3, S, S)`` uint8.

        Returns
        -------
        ``{"feature": (B, D) fused phase-1 token, "pred1": (B, n_genes) phase-1 prediction}``, float32.
        """
        with _eval_mode(self.backbone, self.local_attn, self.head1, self.head2):
            out = self._phase1(batch[BatchKeys.SPOT], random=self.config.random_crops_at_inference)
        return {"feature": out["feature"].float(), "pred1": out["pred"].float()}

    # ------------------------------------------------------------------ phase 2
    def n_prototypes(self, n_spots: int) -> int:
        """Prototypes ``K = clip(n_spots // proto_spots_per_k, proto_k_min, proto_k_max)`` of a slide.

        Raises
        ------
        ValueError
            The slide has fewer spots than ``K`` (K-means needs at least one spot per prototype).
        """
        cfg = self.config
        k = min(max(n_spots // cfg.proto_spots_per_k, cfg.proto_k_min), cfg.proto_k_max)
        if n_spots < k:
            msg = (
                f"A slide with {n_spots} spots cannot give the {k} prototypes MMAP requires "
                f"(K = clip(N // {cfg.proto_spots_per_k}, {cfg.proto_k_min}, {cfg.proto_k_max})). "
                f"Pass proto_k_min <= {n_spots} to allow smaller slides."
            )
            raise ValueError(msg)
        return k

    def n_selected(self, n_prototypes: int) -> int:
        """Prototypes ``L = max(1, ⌊K · proto_top_frac⌋)`` each spot attends to."""
        return max(1, int(n_prototypes * self.config.proto_top_frac + 1e-9))

    @torch.no_grad()
    def build_prototypes(self, features: Tensor, slide: Tensor) -> dict[int, int]:
        """Cluster each slide's features into its prototype bank (K-means, fixed seed) and store it.

        Parameters
        ----------
        features
            ``(N, D)`` fused phase-1 features of every spot of the slides (``encode(batch)["feature"]``).
        slide
            ``(N,)`` integer slide index of each row, the same indices later passed as ``batch["slide"]``.

        Returns
        -------
        Slide index → number of prototypes ``K``. The bank (``proto_bank``: slides × ``proto_k_max`` × D, padded,
        with ``proto_mask``) is kept in buffers; slides not in ``slide`` keep their entries, the others are
        replaced. K-means runs on the module's device.
        """
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != self.feature_dim:
            msg = (
                f"Expected features of shape (N, {self.feature_dim}) from `encode`, found "
                f"{tuple(getattr(features, 'shape', ()))}."
            )
            raise ValueError(msg)
        slide = torch.as_tensor(slide)
        if slide.ndim != 1 or slide.shape[0] != features.shape[0] or slide.is_floating_point():
            msg = (
                f"Expected `slide` to be a 1-D integer tensor with one entry per feature row ({features.shape[0]}), "
                f"found dtype {slide.dtype} and shape {tuple(slide.shape)}."
            )
            raise ValueError(msg)
        device = self.proto_bank.device
        features = features.detach().to(device=device, dtype=torch.float32)
        slide = slide.to(device=device, dtype=torch.long)
        ids = torch.unique(slide)
        counts = torch.bincount(torch.searchsorted(ids, slide), minlength=len(ids))
        ks = [self.n_prototypes(int(n)) for n in counts.tolist()]  # validate every slide before any work
        cfg = self.config
        bank = torch.zeros(len(ids), cfg.proto_k_max, self.feature_dim, device=device)
        mask = torch.zeros(len(ids), cfg.proto_k_max, dtype=torch.bool, device=device)
        for i, (s, k) in enumerate(zip(ids.tolist(), ks)):  # one K-means per slide
            res = kmeans(features[slide == s], k, n_init=cfg.proto_n_init, metric=cfg.proto_metric, seed=cfg.proto_seed)
            bank[i, :k] = res.centroids
            mask[i, :k] = True
            logger.debug("Slide %d: %d prototypes from %d spots (inertia %.4g).", s, k, int(counts[i]), res.inertia)
        keep = ~torch.isin(self.proto_slides, ids)
        self.proto_bank = torch.cat([self.proto_bank[keep], bank])
        self.proto_mask = torch.cat([self.proto_mask[keep], mask])
        self.proto_slides = torch.cat([self.proto_slides[keep], ids])
        return dict(zip(ids.tolist(), ks))

    @torch.no_grad()
    def prepare_slides(self, store: Any, groups: Sequence[Any], *, batch_size: int = 64) -> None:
        """Engine hook run before each phase and before prediction: in phase 2, encode and build prototypes.

        In phase 1 this does nothing. In phase 2 every spot of ``groups`` is encoded (:meth:`encode`, in batches,
        on CUDA with bf16 autocast when available, else on the model's device), :meth:`build_prototypes` runs on
        the resulting features with the store's ``"slide"`` indices, and the features and phase-1 predictions are
        added to the store as ``"feature"`` ``(N, D)`` and ``"pred1"`` ``(N, n_genes)`` (NaN for rows outside
        ``groups``), so that phase-2 batches skip the frozen backbone — the reference likewise caches them once.

        Parameters
        ----------
        store
            The engine's :class:`~stpred.train.TensorStore` (``.tensors``: batch key → per-row tensor, ``.n``
            rows) holding ``"spot"`` and ``"slide"``.
        groups
            Row indices, one array per slide (training and validation slides in :func:`stpred.tl.fit`, the
            slides to predict in ``Predictor.predict``).
        batch_size
            Spots per encoding batch.
        """
        if self._phase != 2:
            return
        tensors = store.tensors
        missing = [k for k in (BatchKeys.SPOT, BatchKeys.SLIDE) if k not in tensors]
        if missing:
            msg = f"MMAP phase 2 needs the store entries {missing}; found {sorted(tensors)}."
            raise KeyError(msg)
        rows = torch.cat([torch.as_tensor(g, dtype=torch.long).reshape(-1) for g in groups]).unique()
        if rows.numel() == 0:
            msg = "Expected at least one spot in `groups`, found none."
            raise ValueError(msg)
        home = self.proto_bank.device
        device = torch.device("cuda") if torch.cuda.is_available() else home
        self.to(device)
        try:
            feats, preds = [], []
            for chunk in rows.split(batch_size):
                spot = tensors[BatchKeys.SPOT].index_select(0, chunk.to(tensors[BatchKeys.SPOT].device)).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    enc = self.encode({BatchKeys.SPOT: spot})
                feats.append(enc["feature"])
                preds.append(enc["pred1"])
            feature, pred1 = torch.cat(feats), torch.cat(preds)
            slide = tensors[BatchKeys.SLIDE].index_select(0, rows.to(tensors[BatchKeys.SLIDE].device))
            ks = self.build_prototypes(feature, slide)
        finally:
            self.to(home)
        logger.info("MMAP prototypes: %s (slide: K).", ks)
        at = rows.to(store.device)
        for key, value in (("feature", feature), ("pred1", pred1)):
            cache = tensors.get(key)
            if cache is None or tuple(cache.shape) != (store.n, value.shape[1]):
                cache = torch.full((store.n, value.shape[1]), float("nan"), device=store.device)
            cache[at] = value.to(device=cache.device, dtype=cache.dtype)
            tensors[key] = cache

    def _prototype_tokens(self, feature: Tensor, slide: Tensor) -> tuple[Tensor, Tensor]:
        """``[feature, top-L prototypes, pads]`` tokens ``(B, 1 + L_max, D)`` and their key mask ``(B, 1 + L_max)``."""
        slide = slide.to(self.proto_slides.device, torch.long).reshape(-1)
        match = slide[:, None] == self.proto_slides[None, :]
        found = match.any(1)
        if not bool(found.all()):
            missing = sorted(set(slide[~found].tolist()))
            msg = (
                f"No prototypes for slide(s) {missing} (built for {self.proto_slides.tolist()}). Run "
                "`model.build_prototypes(features, slide)` on those slides' `encode` features first."
            )
            raise KeyError(msg)
        rows = match.to(torch.int8).argmax(1)
        bank = self.proto_bank[rows].to(feature.dtype)  # (B, K_max, D)
        valid = self.proto_mask[rows]
        sims = torch.einsum("bd,bkd->bk", F.normalize(feature.float(), dim=-1), F.normalize(bank.float(), dim=-1))
        sims = sims.masked_fill(~valid, float("-inf"))
        l_max = self.n_selected(self.config.proto_k_max)
        top = sims.topk(l_max, dim=1).indices  # descending similarity
        n_sel = torch.floor(valid.sum(1).double() * self.config.proto_top_frac + 1e-9).long().clamp_min(1)
        keep = torch.arange(l_max, device=feature.device)[None, :] < n_sel[:, None]
        protos = bank.gather(1, top[:, :, None].expand(-1, -1, bank.shape[-1]))
        ones = torch.ones_like(keep[:, :1])
        if self.config.proto_padding == "zeros":
            protos = protos * keep[:, :, None].to(protos.dtype)
            key_mask = torch.ones_like(torch.cat([ones, keep], 1))
        else:
            key_mask = torch.cat([ones, keep], 1)
        return torch.cat([feature[:, None], protos], 1), key_mask

    # ------------------------------------------------------------------ model API
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Predict expression for a batch of spots.

        Parameters
        ----------
        batch
            Phase 1: ``"spot"`` ``(B, 3, S, S)`` uint8. Phase 2: also ``"slide"`` ``(B,)``; optionally the cached
            ``"feature"`` and ``"pred1"`` of :meth:`encode`, which then replace the backbone pass.

        Returns
        -------
        ``"pred"`` ``(B, n_genes)``, ``"feature"`` (phase-1 fused token) and, in phase 1, ``"cls"`` (CLS of the ¼
        view); in phase 2 ``"pred1"`` and ``"fused"`` (the prototype-attention output).
        """
        if self._phase == 1:
            if "spot" not in batch:
                msg = f"MMAP needs the batch key 'spot'; found {sorted(batch)}."
                raise KeyError(msg)
            random = self.training or self.config.random_crops_at_inference
            return self._phase1(batch[BatchKeys.SPOT], random=random)
        if BatchKeys.SLIDE not in batch:
            msg = f"MMAP phase 2 needs the batch key 'slide' (section index of each spot); found {sorted(batch)}."
            raise KeyError(msg)
        if "feature" in batch and "pred1" in batch:
            feature, pred1 = batch["feature"], batch["pred1"]
            if not bool(torch.isfinite(feature).all()):
                msg = (
                    "The batch's cached 'feature' rows are missing (NaN) for some spots: run "
                    "`model.prepare_slides(store, groups)` with groups covering these spots first."
                )
                raise ValueError(msg)
        else:
            enc = self.encode(batch)
            feature, pred1 = enc["feature"], enc["pred1"]
        tokens, key_mask = self._prototype_tokens(feature, batch[BatchKeys.SLIDE])
        fused = self.global_attn(tokens, key_mask)
        head3 = self.head3(fused)
        if self.config.head_weights == "reference":
            pred = 0.5 * (pred1 + head3)  # ¼·head1 + ¼·head2 + ½·head3
        else:
            pred = (2.0 * pred1 + head3) / 3.0  # mean of head1, head2, head3
        return {"pred": pred, "pred1": pred1, "feature": feature, "fused": fused}

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The phase-1 fused token ``(B, D)`` of each spot (its own image; out-of-distribution scores).

        Uses the cached ``"feature"`` of :meth:`prepare_slides` when the batch holds it, else :meth:`encode`.
        """
        if "feature" in batch and bool(torch.isfinite(batch["feature"]).all()):
            return batch["feature"].float()
        if BatchKeys.SPOT not in batch:
            msg = f"MMAP features need the batch key 'spot'; found {sorted(batch)}."
            raise KeyError(msg)
        return self.encode(batch)["feature"]

    def loss(self, out: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> LossOutput:
        """``MSE + γ · similarity`` of the current phase.

        Returns
        -------
        ``extra`` holds ``"mag"`` in phase 1 (between the fused token and CLS₂) or ``"align"`` in phase 2
        (between the prototype-attention output and the spot's own feature).
        """
        cfg = self.config
        mse = F.mse_loss(out["pred"].float(), batch[BatchKeys.TARGET].float())
        if self._phase == 1:
            sim = _similarity_loss(out["feature"], out["cls"], kind=cfg.mag_loss, margin=cfg.mag_loss_margin)
            weight = cfg.mag_loss_weight if self._progress >= cfg.mag_loss_warmup else 0.0
            return LossOutput(loss=mse + weight * sim, mse=mse.detach(), extra={"mag": sim.detach()})
        sim = _similarity_loss(out["fused"], out["feature"], kind=cfg.mag_loss, margin=cfg.mag_loss_margin)
        return LossOutput(loss=mse + cfg.align_weight * sim, mse=mse.detach(), extra={"align": sim.detach()})

    def augment(self, batch: Mapping[str, Tensor], progress: float) -> dict[str, Tensor]:
        """Training augmentation on the device; records ``progress`` for the loss warm-up.

        In phase 1 (with ``augment=True``) each spot crop receives, in the order of the authors' released code:
        a uniform draw from the 8 symmetries of the square (the group its vertical flip, 90° rotation and
        transpose generate), a random brightness/contrast change with probability ``brightness_contrast_p``, and an
        elastic deformation with probability ``elastic_p`` (see :class:`MMAPConfig`). All of it runs batched on the
        crops' device and keeps their dtype. Phase 2 uses no augmentation (the released code trains it on cached
        features), so the batch is returned unchanged.

        Parameters
        ----------
        batch
            Batch with ``"spot"`` ``(B, 3, S, S)``.
        progress
            Fraction of the current phase's training done, in ``[0, 1]``.

        Returns
        -------
        A new batch dict (the input is not modified).
        """
        self._progress = float(progress)
        batch = dict(batch)
        if self._phase != 1 or not self.config.augment or "spot" not in batch:
            return batch
        cfg = self.config
        (x,) = dihedral(batch["spot"])
        x = brightness_contrast(
            x, p=cfg.brightness_contrast_p, brightness=cfg.brightness_limit, contrast=cfg.contrast_limit
        )
        batch["spot"] = elastic(x, p=cfg.elastic_p, alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma)
        return batch

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("proto_bank", "proto_mask", "proto_slides"):  # the bank's size depends on the slides seen
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                self._buffers[name] = torch.empty_like(value, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _restore_phase(module: nn.Module, incompatible_keys: Sequence[Any]) -> None:
    """After ``load_state_dict``, re-apply the loaded phase (its ``requires_grad`` pattern)."""
    if isinstance(module, MMAP):
        module.set_phase(int(module.current_phase))
