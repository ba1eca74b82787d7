"""Plain-torch image encoders with torchvision/timm-compatible state-dict names, and LoRA adapters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import attach

_NAMES = {
    "BasicBlock": "resnet",
    "Bottleneck": "resnet",
    "ResNet": "resnet",
    "resnet10": "resnet",
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "PretrainedEncoder": "pretrained",
    "fetch_weights": "pretrained",
    "load_weights": "_weights",
    "VisionTransformer": "vit",
    "vit_large_patch16_224": "vit",
    "vit_small": "vit",
    "vit_tiny": "vit",
    "LoRALinear": "lora",
}
__getattr__, __dir__, __all__ = attach(__name__, _NAMES)

if TYPE_CHECKING:  # pragma: no cover
    from ._weights import load_weights
    from .lora import LoRALinear
    from .pretrained import PretrainedEncoder, fetch_weights
    from .resnet import BasicBlock, Bottleneck, ResNet, resnet10, resnet18, resnet34, resnet50
    from .vit import VisionTransformer, vit_large_patch16_224, vit_small, vit_tiny
