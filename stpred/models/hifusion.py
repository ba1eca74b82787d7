"""HiFusion (AAAI 2026): hierarchical intra-spot features fused with a context view by cross-attention.

Re-implemented from Weng et al. (2026), "HiFusion: Hierarchical Intra-Spot Alignment and Regional Context Fusion for
Spatial Gene Expression Prediction from Histopathology" (AAAI 2026, arXiv:2511.12969), and the authors' released code
wherever the paper leaves a detail open (noted as "released code" below; deviations are listed in ``docs/models.md``): a
ResNet-18 trunk encodes the spot crop at three levels (the whole crop, a 2×2 grid and a 7×7 grid of sub-crops, the
sub-crop feature maps mosaicked back in place), a ResNet-10 trunk encodes a twice larger context crop around the same
centre, the three levels are mixed by softmax weights, and the pooled context token attends to 2×2 tokens of the
fused spot map. Blocks first, then the model, then its loss.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._constants import BatchKeys
from .._imaging import standardize
from ._augment import dihedral
from ._base import LossOutput, StpredModel, TrainDefaults
from ._registry import register_model
from .encoders._weights import load_weights
from .encoders.resnet import ResNet

__all__ = ["TINY_CONFIG", "HiFusion", "HiFusionConfig", "mosaic", "tile"]


def tile(x: Tensor, grid: int) -> Tensor:
    """Cut every image into a ``grid × grid`` mosaic of square crops, batched sample-major.

    Parameters
    ----------
    x
        Images ``(B, C, S, S)`` with ``S`` divisible by ``grid``.
    grid
        Crops per side.

    Returns
    -------
    ``(B * grid * grid, C, S // grid, S // grid)``: crop ``(i, j)`` (row ``i``, column ``j``) of image ``b`` is
    at index ``(b * grid + i) * grid + j``. A reshape/permute on the device, no loop.
    """
    b, c, h, w = x.shape
    if h % grid or w % grid:
        msg = f"Expected an image side divisible by the grid {grid}, found {h}×{w}."
        raise ValueError(msg)
    th, tw = h // grid, w // grid
    return x.reshape(b, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(b * grid * grid, c, th, tw)


def mosaic(features: Tensor, grid: int) -> Tensor:
    """Inverse of :func:`tile`: put each crop's feature map back at the place its pixels came from.

    Parameters
    ----------
    features
        ``(B * grid * grid, C, h, w)`` maps in :func:`tile` order.
    grid
        Crops per side.

    Returns
    -------
    ``(B, C, grid * h, grid * w)``; ``mosaic(tile(x, g), g)`` equals ``x``.
    """
    n, c, h, w = features.shape
    b = n // (grid * grid)
    return features.reshape(b, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * h, grid * w)


@dataclass(frozen=True)
class HiFusionConfig:
    """Every HiFusion hyper-parameter; defaults reproduce the authors' released code (Weng et al. 2026).

    Attributes
    ----------
    n_genes
        Number of predicted genes (the reference panel: 250).
    spot_size, context_size
        Side in pixels of the spot crop and of the context ("neighbor") crop, centred on the same point.
    grids
        Sub-crops per side at each spot level; ``grids[0]`` must be 1 (the whole crop).
    spot_layers, context_layers
        BasicBlocks per stage of the spot (ResNet-18) and context (ResNet-10) trunks.
    width
        First-stage width of both trunks; the feature dimension is ``8 * width``.
    n_heads, attn_dropout
        Cross-attention heads and dropout on the attention probabilities.
    token_grid
        The fused spot map is average-pooled to ``token_grid × token_grid`` key/value tokens.
    fusion_temperature
        Softmax temperature of the level weights (fixed).
    alignment_weight
        Weight of the feature-alignment term ``L1(F0, F1) + L1(F0, F2)``.
    augment
        Apply a random dihedral transform (same on spot and context) during training.
    channels_last
        Store the weights channels_last and feed channels_last inputs (faster convolutions on recent GPUs).
    spot_weights, context_weights
        Optional local state dicts (torchvision naming) for the spot / context trunk, loaded strictly at
        construction; the reference trains both from random initialisation.
    train
        Optimisation defaults for :func:`stpred.tl.fit`.
    """

    n_genes: int
    spot_size: int = 224  # released code: 224 px spot crop
    context_size: int = 448  # released code: 448 px "neighbor" crop, same centre
    grids: tuple[int, ...] = (1, 2, 7)  # released code: 1, 4 and 49 sub-patches = 1×1, 2×2, 7×7 grids
    spot_layers: tuple[int, ...] = (2, 2, 2, 2)  # released code: torchvision ResNet-18
    context_layers: tuple[int, ...] = (1, 1, 1, 1)  # released code: "ResNet-10", one BasicBlock per stage
    width: int = 64  # standard widths 64/128/256/512 → 512-d features
    n_heads: int = 8  # released code: 8 heads, head_dim 64
    attn_dropout: float = 0.1  # released code: dropout 0.1 on the attention probabilities
    token_grid: int = 2  # released code: 2×2 average pool → 4 key/value tokens
    fusion_temperature: float = 1.0  # released code: fixed temperature 1.0
    alignment_weight: float = 0.5  # released code: 0.5 · [L1(F0, F1) + L1(F0, F2)]
    augment: bool = True  # released code: h/v flips and a 90° rotation = the 8 dihedral maps
    channels_last: bool = False  # not in the reference (a speed option; the engine sets it on CUDA)
    spot_weights: str | None = None  # released code: random init (no weights loaded)
    context_weights: str | None = None  # released code: random init
    train: TrainDefaults = field(  # released code: Adam, lr 1e-3, L2 1e-5, cosine to 1e-6, 50 epochs, batch 32
        default=TrainDefaults(
            lr=1e-3,
            weight_decay=1e-5,
            optimizer="adam",
            scheduler="cosine",
            min_lr=1e-6,
            max_epochs=50,
            batch_size=32,
            batch_per_section=True,  # the reference draws every batch from one section (BatchNorm statistics)
        )
    )

    def __post_init__(self) -> None:
        # accept lists (JSON round trips) and a dict for `train` (from dataclasses.asdict)
        for name in ("grids", "spot_layers", "context_layers"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("spot_weights", "context_weights"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if isinstance(self.train, Mapping):
            object.__setattr__(self, "train", TrainDefaults(**self.train))
        self._validate()

    def _validate(self) -> None:
        positive = {
            k: getattr(self, k) for k in ("n_genes", "spot_size", "context_size", "width", "n_heads", "token_grid")
        }
        bad = {k: v for k, v in positive.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            msg = f"Expected positive integers, found {bad}."
            raise ValueError(msg)
        if not self.grids or self.grids[0] != 1 or min(self.grids) < 1:
            msg = f"Expected `grids` to start with 1 (the whole spot crop), e.g. (1, 2, 7), found {self.grids}."
            raise ValueError(msg)
        uneven = [g for g in self.grids if self.spot_size % g]
        if uneven:
            msg = (
                f"`spot_size` {self.spot_size} is not divisible by the grid(s) {uneven}; choose a spot size that is a "
                f"multiple of every entry of `grids` {self.grids}."
            )
            raise ValueError(msg)
        dim = 8 * self.width
        if dim % self.n_heads:
            msg = f"The feature dimension 8 * width = {dim} is not divisible by `n_heads` = {self.n_heads}."
            raise ValueError(msg)
        if not 0.0 <= self.attn_dropout < 1.0:
            msg = f"Expected `attn_dropout` in [0, 1), found {self.attn_dropout}."
            raise ValueError(msg)
        if self.alignment_weight < 0 or self.fusion_temperature <= 0:
            msg = (
                "Expected `alignment_weight` >= 0 and `fusion_temperature` > 0, found "
                f"{self.alignment_weight} and {self.fusion_temperature}."
            )
            raise ValueError(msg)


#: A seconds-on-CPU configuration for tests and smoke runs: ``HiFusion(n_genes, **TINY_CONFIG)``.
TINY_CONFIG: dict[str, Any] = {"width": 8, "n_heads": 2, "spot_size": 64, "context_size": 128, "grids": (1, 2, 4)}


@register_model("hifusion")
class HiFusion(StpredModel):
    """HiFusion: hierarchical intra-spot modelling plus context-aware cross-scale fusion.

    Architecture (Weng et al. 2026, HISM and CCF modules; details from the authors' released code):

    * **Spot levels.** One ResNet-18 trunk encodes the standardised spot crop (224 px) as a whole (F0, 512×7×7),
      as a 2×2 grid of 112 px crops and as a 7×7 grid of 32 px crops. Each level is *one* batched encoder call
      (B, 4B, 49B images, in that order, so BatchNorm sees each level's own statistics as in the reference); the
      crops are cut on the device by :func:`tile` and the crop feature maps are put back in place by
      :func:`mosaic` (level 1: 2×2 maps of 4×4 = 8×8, adaptive max-pooled to 7×7 = F1; level 2: 7×7 maps of 1×1
      = F2).
    * **Level fusion.** ``softmax(logits / T)``-weighted sum of F0, F1, F2 (logits initialised equal, T = 1).
    * **Cross-scale fusion.** A ResNet-10 trunk encodes the 448 px context crop (512×14×14); its global average
      is the query token. The fused spot map, average-pooled to 2×2, gives 4 key/value tokens. 8-head
      cross-attention (dropout 0.1 on the attention probabilities) plus the context token as residual, then
      LayerNorm and a linear gene head give the prediction.
    * **Auxiliary heads.** One shared linear head on each level's pooled map predicts expression too.

    Loss (Weng et al. 2026; weights from the released code):
    ``MSE(final) + mean_l MSE(level l) + alignment_weight · (L1(F0, F1) + L1(F0, F2))``, L1 as a mean over all map
    elements, no detach. With 250 genes the default model has 17,390,455 parameters, as the
    reference (17.39 M).

    Deliberate differences from the reference code:

    * The cross-attention is :class:`torch.nn.MultiheadAttention` (same computation and parameter count: Q, K, V
      and output projections with biases, scaled dot product, dropout on the probabilities). Its initialisation
      is PyTorch's (Xavier-uniform in-projection, zero biases), not ``nn.Linear``'s default, and its state-dict
      names differ, so reference checkpoints need renaming.
    * Standardisation treats a channel whose standard deviation is below ``1e-3`` grey levels as flat (std → 1)
      instead of testing for an exact 0, so float rounding on a flat channel cannot blow up to ±1 values.
    * Augmentation runs on the device, per batch (:meth:`augment`): a uniform draw among the 8 dihedral maps per
      spot, identical for spot and context, which is the same distribution as the reference's flip/flip/rot90
      pipeline (each of the 2³ combinations has probability 1/8 and they are all distinct).
    * Crops of a level are batched sample-major instead of tile-major; BatchNorm statistics do not depend on
      the order, so the function is the same.
    * ``forward`` checks the crop sizes. The released code's ST-Data evaluation silently swapped the two crops
      (the 448 crop went through the spot branch); here that raises.
    * Optional pretrained trunks (``spot_weights``, ``context_weights``); the default stays the reference's
      random initialisation (Kaiming-normal fan-out convolutions, BatchNorm 1/0, PyTorch-default linears).
    * Mixed precision is the engine's choice (bf16 autocast on CUDA, no loss scaling) rather than fp16 with a
      gradient scaler; the model computes its losses in float32.

    Parameters
    ----------
    n_genes
        Number of genes to predict.
    **config
        Any field of :class:`HiFusionConfig` except ``n_genes``.
    """

    inputs = (BatchKeys.SPOT, BatchKeys.CONTEXT)
    batching = "spots"
    name: str

    @property
    def crop_sizes(self) -> tuple[int | None, int | None]:
        """Side in pixels of the spot and context crops (``config.spot_size``, ``config.context_size``)."""
        return self.config.spot_size, self.config.context_size

    def __init__(self, n_genes: int, **config: Any) -> None:
        super().__init__()
        valid = [f.name for f in dataclasses.fields(HiFusionConfig) if f.name != "n_genes"]
        unknown = sorted(set(config) - set(valid))
        if unknown:
            msg = f"Unknown HiFusion option(s) {unknown}. Valid options: {valid}."
            raise TypeError(msg)
        self.config = HiFusionConfig(n_genes=n_genes, **config)
        c = self.config
        dim = 8 * c.width
        self.spot_encoder = ResNet(c.spot_layers, width=c.width)
        self.context_encoder = ResNet(c.context_layers, width=c.width)
        self.fusion_logits = nn.Parameter(torch.ones(len(c.grids)))  # released code: initialised to ones
        self.attn = nn.MultiheadAttention(dim, c.n_heads, dropout=c.attn_dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_genes)
        self.aux_head = nn.Linear(dim, n_genes)  # released code: one head shared by the three levels
        self.load_pretrained()
        if c.channels_last:
            self.to(memory_format=torch.channels_last)

    def init_head_bias(self, mean: Tensor) -> None:
        """Start the final and auxiliary heads at the mean training target (called by :func:`stpred.tl.fit`).

        Not in the reference, which starts from zero-mean outputs: with ``log_share`` targets near ln(1/250) the
        first epochs are then spent learning that offset. Starting at the mean changes no architecture or loss.
        """
        with torch.no_grad():
            self.head.bias.copy_(mean.to(self.head.bias))
            self.aux_head.bias.copy_(mean.to(self.aux_head.bias))

    @classmethod
    def tiny(cls, n_genes: int, **overrides: Any) -> HiFusion:
        """A small model (:data:`TINY_CONFIG`: width 8, 64/128 px crops, grids 1/2/4) for tests and smoke runs."""
        return cls(n_genes, **{**TINY_CONFIG, **overrides})

    def load_pretrained(
        self, *, spot: str | os.PathLike | None = None, context: str | os.PathLike | None = None
    ) -> None:
        """Load trunk weights from local files (torchvision naming; a checkpoint's ``fc`` is dropped).

        Parameters
        ----------
        spot, context
            State-dict files for the spot (ResNet-18) and context (ResNet-10) trunks; default to
            ``config.spot_weights`` / ``config.context_weights``. ``None`` leaves a trunk as it is.
        """
        spot = self.config.spot_weights if spot is None else spot
        context = self.config.context_weights if context is None else context
        if spot is not None:
            load_weights(self.spot_encoder, spot)
        if context is not None:
            load_weights(self.context_encoder, context)

    def _uses_channels_last(self) -> bool:
        if self.config.channels_last:
            return True
        w = next((p for p in self.spot_encoder.parameters() if p.ndim == 4), None)  # conv1 of a ResNet
        return w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    def _prepare(self, x: Tensor, channels_last: bool) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def spot_levels(self, spot: Tensor) -> list[Tensor]:
        """Feature maps of the standardised spot crop at every level, each at the size of level 0.

        Parameters
        ----------
        spot
            Float spot crops ``(B, 3, S, S)``.

        Returns
        -------
        One ``(B, D, h, w)`` map per entry of ``config.grids``; level ``l > 0`` is the mosaic of its crops'
        maps, adaptive max-pooled to level 0's size when it differs.
        """
        channels_last = self._uses_channels_last()
        maps: list[Tensor] = []
        for grid in self.config.grids:  # one batched encoder call per level (3 calls), never per tile
            x = spot if grid == 1 else tile(spot, grid)
            f = self.spot_encoder.forward_features(self._prepare(x, channels_last))
            if grid > 1:
                f = mosaic(f, grid)
            if maps and f.shape[-2:] != maps[0].shape[-2:]:
                f = F.adaptive_max_pool2d(f, maps[0].shape[-2:])
            maps.append(f)
        return maps

    def _check_batch(self, batch: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.inputs if k not in batch]
        if missing:
            msg = f"HiFusion needs the batch keys {list(self.inputs)}; missing {missing} (found {sorted(batch)})."
            raise KeyError(msg)
        c = self.config
        for key, size in ((BatchKeys.SPOT, c.spot_size), (BatchKeys.CONTEXT, c.context_size)):
            shape = tuple(batch[key].shape)
            if len(shape) != 4 or shape[1] != 3 or shape[2] != size or shape[3] != size:
                msg = (
                    f"Expected batch[{key!r}] of shape (B, 3, {size}, {size}), found {shape}. Extract patches with "
                    f"`stpred.pp.extract_patches(sdata, size={c.spot_size}, context_size={c.context_size})` or set "
                    f"`{key}_size` in the HiFusion config."
                )
                raise ValueError(msg)
        if batch[BatchKeys.SPOT].shape[0] != batch[BatchKeys.CONTEXT].shape[0]:
            msg = (
                f"Expected as many context crops as spot crops, found {batch['context'].shape[0]} and "
                f"{batch['spot'].shape[0]}."
            )
            raise ValueError(msg)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        """Predict expression from the spot and context crops.

        Parameters
        ----------
        batch
            ``"spot"``: ``uint8`` ``(B, 3, spot_size, spot_size)``; ``"context"``: ``uint8``
            ``(B, 3, context_size, context_size)``, centred on the same point. Each image is standardised per
            channel here.

        Returns
        -------
        ``"pred"``
            ``(B, n_genes)`` final prediction.
        ``"level_preds"``
            Tuple of ``(B, n_genes)`` auxiliary predictions, one per level.
        ``"level_features"``
            Tuple of the level maps ``(B, D, h, w)`` (F0, F1, F2) used by the alignment loss.
        ``"fusion_weights"``
            ``(n_levels,)`` softmax level weights.
        """
        rep, maps, weights = self._represent(batch)
        pred = self.head(rep)
        level_preds = tuple(self.aux_head(f.mean(dim=(2, 3))) for f in maps)
        return {"pred": pred, "level_preds": level_preds, "level_features": tuple(maps), "fusion_weights": weights}

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The normalised fused token ``(B, 8 * width)`` that the final head reads (out-of-distribution scores)."""
        return self._represent(batch)[0]

    def _represent(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor], Tensor]:
        """Representation before the final head, the level maps and the softmax level weights."""
        self._check_batch(batch)
        spot = standardize(batch["spot"])
        context = standardize(batch["context"])
        maps = self.spot_levels(spot)
        weights = torch.softmax(self.fusion_logits.float() / self.config.fusion_temperature, dim=0)
        fused = maps[0] * weights[0].to(maps[0].dtype)
        for w, f in zip(weights[1:], maps[1:]):
            fused = fused + f * w.to(f.dtype)
        tokens = F.adaptive_avg_pool2d(fused, self.config.token_grid).flatten(2).transpose(1, 2)  # (B, k², D)
        ctx_map = self.context_encoder.forward_features(self._prepare(context, self._uses_channels_last()))
        query = ctx_map.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, D)
        attended, _ = self.attn(query, tokens, tokens, need_weights=False)
        return self.norm((attended + query).squeeze(1)), maps, weights

    def loss(self, out: Mapping[str, Any], batch: Mapping[str, Tensor]) -> LossOutput:
        """HiFusion's training loss (Weng et al., 2026, as in the authors' released code), computed in float32.

        Parameters
        ----------
        out
            Output of :meth:`forward`.
        batch
            Must hold ``"target"``: ``(B, n_genes)`` normalised expression.

        Returns
        -------
        ``loss`` = ``mse + aux_mse + alignment_weight * align``; ``mse``: MSE of the final prediction;
        ``extra["aux_mse"]``: mean over levels of the auxiliary MSEs; ``extra["align"]``: ``Σ_{l>0} L1(F0, F_l)``
        (element means, unweighted).
        """
        if BatchKeys.TARGET not in batch:
            msg = f"HiFusion's loss needs batch['target']; found the keys {sorted(batch)}."
            raise KeyError(msg)
        target = batch[BatchKeys.TARGET].float()
        pred = out["pred"].float()
        if pred.shape != target.shape:
            msg = f"Expected batch['target'] of shape {tuple(pred.shape)}, found {tuple(target.shape)}."
            raise ValueError(msg)
        mse = F.mse_loss(pred, target)
        aux = torch.stack([F.mse_loss(p.float(), target) for p in out["level_preds"]]).mean()
        feats = out["level_features"]
        align = pred.new_zeros(())
        for f in feats[1:]:
            align = align + F.l1_loss(feats[0].float(), f.float())
        loss = mse + aux + self.config.alignment_weight * align
        return LossOutput(loss=loss, mse=mse.detach(), extra={"aux_mse": aux.detach(), "align": align.detach()})

    def augment(self, batch: Mapping[str, Tensor], progress: float) -> dict[str, Tensor]:
        """Training-time augmentation on the device: one random dihedral map per spot, same on both crops.

        Parameters
        ----------
        batch
            Batch with ``"spot"`` and ``"context"``.
        progress
            Fraction of training done (unused; the augmentation is the same throughout, as in the reference).

        Returns
        -------
        A new batch dictionary with transformed ``"spot"`` and ``"context"`` (other entries shared).
        """
        if not self.config.augment:
            return dict(batch)
        spot, context = dihedral(batch["spot"], batch["context"])
        return {**batch, "spot": spot, "context": context}
