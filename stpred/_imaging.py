"""Pixel normalisation shared by the image models and :func:`stpred.pp.embed`: one place for each rule.

Pure torch helpers with no dependency on the rest of stpred, so that both ``stpred.models`` and ``stpred.pp`` may
import them (``pp`` may use model-level helpers; models never import from ``pp``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_normalize", "standardize"]



def imagenet_normalize(
    x: Tensor,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """Subtract a per-channel mean and divide by a per-channel standard deviation (ImageNet's by default).

    Parameters
    ----------
    x
        Float images ``(B, 3, H, W)`` scaled to ``[0, 1]``.
    mean, std
        Channel statistics; a published encoder trained with other statistics (H-optimus-0, CONCH) passes its own.

    Returns
    -------
    A tensor of the same shape and dtype as ``x``.
    """
    if not x.is_floating_point() or x.ndim < 3 or x.shape[-3] != len(IMAGENET_MEAN):
        msg = (
            f"Expected float RGB images (..., 3, H, W) scaled to [0, 1], found {x.dtype} of shape {tuple(x.shape)}. "
            "Convert uint8 crops with `x.float() / 255` first."
        )
        raise ValueError(msg)
    shift = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    scale = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - shift) / scale


def standardize(x: Tensor, *, eps: float = 1e-3) -> Tensor:
    """Standardise each image and channel by its own mean and standard deviation over ``(H, W)``.

    ``(x - mean) / std`` with the unbiased standard deviation, the input normalisation of HiFusion's authors'
    released code (applied after scaling to [0, 1], which does not change the result). Where ``std < eps`` (a
    flat channel, up to float rounding) the standard deviation counts as 1, so a flat channel maps to 0.

    Parameters
    ----------
    x
        Images ``(..., H, W)`` of any dtype (``uint8`` crops from the patch bank, or floats).
    eps
        Threshold below which a standard deviation counts as 0, in the units of ``x``. The default, ``1e-3`` grey
        level, is far below the smallest non-zero std of an 8-bit image of up to 10⁶ pixels and far above float32
        rounding; divide it by 255 for images already scaled to [0, 1].

    Returns
    -------
    ``float32`` tensor of the same shape as ``x``.
    """
    xf = x.float()
    std, mean = torch.std_mean(xf, dim=(-2, -1), keepdim=True, correction=1)
    std = torch.where(std < eps, torch.ones_like(std), std)
    return (xf - mean) / std
