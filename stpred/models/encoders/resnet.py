"""ResNet with BasicBlocks (ResNet-10/18/34) or Bottlenecks (ResNet-50) in plain torch, with torchvision's names.

The parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``, ...; a
:class:`Bottleneck` adds ``conv3``/``bn3``) and the initialisation match ``torchvision.models.resnet`` (ResNet v1.5:
the stride sits on the 3×3 convolution of a Bottleneck), so a torchvision checkpoint such as the ImageNet
``resnet50-0676ba61.pth`` loads with :func:`~stpred.models.encoders.load_weights` without any renaming.
``width`` scales every stage (64 in torchvision) for tiny CPU configurations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._weights import load_weights

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet10", "resnet18", "resnet34", "resnet50"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (He et al. 2016).

    Parameters
    ----------
    in_ch
        Input channels.
    out_ch
        Output channels.
    stride
        Stride of the first convolution (2 halves the resolution).
    downsample
        Module applied to the input on the residual path when the shape changes (1×1 conv + BatchNorm).
    """

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``(B, in_ch, H, W)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 convolutions with a residual connection, output ``4 × planes`` channels (He et al. 2016).

    The stride sits on the 3×3 convolution (``conv2``), as in torchvision ("ResNet v1.5").

    Parameters
    ----------
    in_ch
        Input channels.
    planes
        Channels of the inner 3×3 convolution; the block outputs ``4 * planes``.
    stride
        Stride of ``conv2``.
    downsample
        Module applied to the input on the residual path when the shape changes (1×1 conv + BatchNorm).
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``(B, in_ch, H, W)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet trunk of :class:`BasicBlock` or :class:`Bottleneck` stages, torchvision-compatible.

    Stem ``conv1`` (7×7, stride 2) → ``bn1`` → ReLU → ``maxpool`` (3×3, stride 2), then four stages of widths
    ``width × (1, 2, 4, 8)`` (times 4 for Bottlenecks) with strides ``(1, 2, 2, 2)``: the feature map is 1/32 of the
    input side (rounded up).

    Parameters
    ----------
    layers
        Number of blocks per stage: ``(2, 2, 2, 2)`` is ResNet-18, ``(1, 1, 1, 1)`` ResNet-10, ``(3, 4, 6, 3)``
        with ``block="bottleneck"`` ResNet-50.
    width
        Channels of the first stage (torchvision: 64); the output has ``8 * width`` channels (``32 * width`` with
        Bottlenecks).
    num_classes
        Size of the linear head ``fc`` applied to the pooled features; ``0`` (default) registers no ``fc``.
    in_chans
        Input channels.
    zero_init_residual
        Zero the last BatchNorm of every block so that each block starts as the identity (torchvision option,
        off by default as in torchvision).
    block
        ``"basic"`` (:class:`BasicBlock`) or ``"bottleneck"`` (:class:`Bottleneck`).

    Attributes
    ----------
    num_features
        Channels of the output feature map (``8 * width * expansion``).
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        *,
        width: int = 64,
        num_classes: int = 0,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        block: str = "basic",
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            msg = f"Expected `block` to be one of {sorted(_BLOCKS)}, found {block!r}."
            raise ValueError(msg)
        self.block = _BLOCKS[block]
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            msg = f"Expected `layers` to be 4 positive block counts, e.g. (2, 2, 2, 2), found {layers}."
            raise ValueError(msg)
        if width < 1 or num_classes < 0 or in_chans < 1:
            msg = (
                f"Expected positive `width` and `in_chans` and non-negative `num_classes`, found width={width}, "
                f"in_chans={in_chans}, num_classes={num_classes}."
            )
            raise ValueError(msg)
        self.layers = layers
        self.width = width
        self.num_features = 8 * width * self.block.expansion
        self._in_ch = width
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(width, layers[0], stride=1)
        self.layer2 = self._make_stage(2 * width, layers[1], stride=2)
        self.layer3 = self._make_stage(4 * width, layers[2], stride=2)
        self.layer4 = self._make_stage(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else None
        self.reset_parameters(zero_init_residual=zero_init_residual)

    def _make_stage(self, planes: int, blocks: int, *, stride: int) -> nn.Sequential:
        out_ch = planes * self.block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        stage = [self.block(self._in_ch, planes, stride, downsample)]
        stage += [self.block(out_ch, planes) for _ in range(1, blocks)]
        self._in_ch = out_ch
        return nn.Sequential(*stage)

    def reset_parameters(self, *, zero_init_residual: bool = False) -> None:
        """Initialise as torchvision does: Kaiming-normal (fan_out, ReLU) convolutions, BatchNorm weight 1, bias 0.

        Parameters
        ----------
        zero_init_residual
            Also zero the last BatchNorm weight of every block (``bn2``, or ``bn3`` of a Bottleneck).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
                elif isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map of ``x``.

        Parameters
        ----------
        x
            Float images ``(B, in_chans, H, W)`` (any memory format; channels_last is kept).

        Returns
        -------
        ``(B, num_features, ⌈H/32⌉, ⌈W/32⌉)`` feature map.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        """Globally average-pooled features ``(B, num_features)``, or ``fc`` logits when ``num_classes > 0``."""
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        return x if self.fc is None else self.fc(x)


def _build(layers: Sequence[int], weights: str | os.PathLike | None, **kwargs: int | bool | str) -> ResNet:
    model = ResNet(layers, **kwargs)  # type: ignore[arg-type]
    if weights is not None:
        load_weights(model, weights)
    return model


def resnet18(*, weights: str | os.PathLike | None = None, **kwargs: int | bool) -> ResNet:
    """ResNet-18 (BasicBlock × ``(2, 2, 2, 2)``; 11.18 M parameters without ``fc`` at ``width=64``).

    Parameters
    ----------
    weights
        Optional local state dict in torchvision naming, loaded strictly (an ImageNet ``fc`` is dropped when
        ``num_classes=0``).
    **kwargs
        Passed to :class:`ResNet` (``width``, ``num_classes``, ``in_chans``, ``zero_init_residual``).
    """
    return _build((2, 2, 2, 2), weights, **kwargs)


def resnet10(*, weights: str | os.PathLike | None = None, **kwargs: int | bool) -> ResNet:
    """ResNet-10 (BasicBlock × ``(1, 1, 1, 1)``; 4.91 M parameters without ``fc`` at ``width=64``).

    Parameters
    ----------
    weights
        Optional local state dict in torchvision naming, loaded strictly.
    **kwargs
        Passed to :class:`ResNet`.
    """
    return _build((1, 1, 1, 1), weights, **kwargs)


def resnet34(*, weights: str | os.PathLike | None = None, **kwargs: int | bool) -> ResNet:
    """ResNet-34 (BasicBlock × ``(3, 4, 6, 3)``; 21.28 M parameters without ``fc`` at ``width=64``).

    Parameters
    ----------
    weights
        Optional local state dict in torchvision naming, loaded strictly.
    **kwargs
        Passed to :class:`ResNet`.
    """
    return _build((3, 4, 6, 3), weights, **kwargs)


def resnet50(*, weights: str | os.PathLike | None = None, **kwargs: int | bool) -> ResNet:
    """ResNet-50 (Bottleneck × ``(3, 4, 6, 3)``; 25.56 M parameters with the 1000-class ``fc`` at ``width=64``).

    Parameters
    ----------
    weights
        Optional local state dict in torchvision naming, loaded strictly (e.g. torchvision's ImageNet
        ``resnet50-0676ba61.pth``; its ``fc`` is dropped when ``num_classes=0``).
    **kwargs
        Passed to :class:`ResNet` (``width``, ``num_classes``, ``in_chans``, ``zero_init_residual``); the output has
        ``32 * width`` channels (2048 at ``width=64``).
    """
    return _build((3, 4, 6, 3), weights, block="bottleneck", **kwargs)
