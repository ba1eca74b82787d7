"""On-device image augmentation shared by the image models (pixel normalisation lives in :mod:`stpred._imaging`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["N_DIHEDRAL", "brightness_contrast", "dihedral", "elastic"]

#: Number of elements of the dihedral group of the square (4 rotations × optional flip).
N_DIHEDRAL = 8


def _check_images(images: tuple[Tensor, ...]) -> int:
    if not images:
        msg = "Expected at least one image tensor, found none."
        raise ValueError(msg)
    n = images[0].shape[0] if images[0].ndim else -1
    for i, x in enumerate(images):
        if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
            msg = f"Expected square images of shape (B, C, S, S), found {tuple(x.shape)} for image tensor {i}."
            raise ValueError(msg)
        if x.shape[0] != n:
            msg = f"Expected every image tensor to hold {n} samples, found {x.shape[0]} for image tensor {i}."
            raise ValueError(msg)
    return n


def dihedral(*images: Tensor, k: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """Apply one of the 8 flips/rotations per sample, the same one to every image tensor given.

    Transform ``k`` (0–7) is, in this order: a horizontal flip if bit 0 is set, a vertical flip if bit 1 is set,
    a transpose (swap of the two spatial axes) if bit 2 is set. These 8 maps are exactly the dihedral group of the
    square (``k=0`` is the identity, ``k=3`` a 180° rotation, ``k=5`` and ``k=6`` the two 90° rotations). Every map
    fixes the image centre, so centre-aligned crops of different sizes (a spot crop and its context crop) stay
    aligned when they receive the same ``k``.

    The work is vectorised and free of host synchronisation: three masked :func:`torch.where` steps over the whole
    batch (one per bit), no loop over samples; it runs on any device and any dtype.

    Parameters
    ----------
    *images
        Tensors of shape ``(B, C, S, S)`` with the same ``B`` (``S`` may differ between tensors).
    k
        Transform index per sample, integer tensor of shape ``(B,)`` with values in ``[0, 8)``; drawn uniformly
        when ``None``.
    generator
        Random generator used to draw ``k`` (on its own device).

    Returns
    -------
    The transformed tensors, in the order given (new tensors; the inputs are not modified).
    """
    n = _check_images(images)
    device = images[0].device
    if k is None:
        gen_device = generator.device if generator is not None else device
        k = torch.randint(N_DIHEDRAL, (n,), generator=generator, device=gen_device)
    if k.shape != (n,) or k.dtype.is_floating_point or k.dtype == torch.bool:
        msg = f"Expected `k` to be an integer tensor of shape ({n},), found {k.dtype} {tuple(k.shape)}."
        raise ValueError(msg)
    k = k.to(device=device, dtype=torch.long)
    bits = [((k >> b) & 1).bool().view(n, 1, 1, 1) for b in range(3)]
    out = []
    for x in images:
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        y = torch.where(bits[0], x.flip(-1), x)
        y = torch.where(bits[1], y.flip(-2), y)
        y = torch.where(bits[2], y.transpose(-1, -2), y)
        out.append(y.contiguous(memory_format=fmt))
    return tuple(out)


def _is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is stored channels_last (and not also plain contiguous, as when C == 1 or H == W == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()



def _max_value(x: Tensor) -> float:
    """The white level of ``x``: 255 for ``uint8`` images, 1 for float images scaled to [0, 1]."""
    if x.dtype == torch.uint8:
        return 255.0
    if x.is_floating_point():
        return 1.0
    msg = f"Expected uint8 images or float images scaled to [0, 1], found dtype {x.dtype}."
    raise TypeError(msg)


def _check_p(p: float, name: str = "p") -> None:
    if not 0.0 <= p <= 1.0:
        msg = f"Expected `{name}` in [0, 1], found {p!r}."
        raise ValueError(msg)


def _back_to(y: Tensor, like: Tensor, top: float) -> Tensor:
    """Clip float ``y`` to ``[0, top]`` and return it in the dtype of ``like`` (rounded for ``uint8``)."""
    y = y.clamp(0.0, top)
    return y.round().to(torch.uint8) if like.dtype == torch.uint8 else y.to(like.dtype)


def brightness_contrast(x: Tensor, *, p: float, brightness: float = 0.2, contrast: float = 0.2) -> Tensor:
    """Random brightness and contrast per sample, each sample changed with probability ``p``.

    A changed sample becomes ``x · a + b · top``, clipped to ``[0, top]``, with ``a`` uniform in
    ``[1 - contrast, 1 + contrast]`` and ``b`` uniform in ``[-brightness, brightness]`` (``top`` is 255 for ``uint8``
    images, 1 for float images): an affine map of the intensities, the same on every channel. Vectorised over the
    batch on the images' device.

    Parameters
    ----------
    x
        Images ``(B, C, H, W)``, ``uint8`` or float in ``[0, 1]``.
    p
        Probability that a sample is changed; ``0`` returns ``x`` itself.
    brightness, contrast
        Largest brightness shift (fraction of ``top``) and largest relative contrast change.

    Returns
    -------
    A new tensor of the same shape and dtype (``uint8`` values are rounded).
    """
    _check_p(p)
    top = _max_value(x)
    if p == 0.0:
        return x
    n, device = x.shape[0], x.device
    draw = torch.rand(3, n, 1, 1, 1, device=device)
    a = 1.0 + contrast * (2.0 * draw[0] - 1.0)
    b = brightness * top * (2.0 * draw[1] - 1.0)
    apply = draw[2] < p
    xf = x.float()
    return _back_to(torch.where(apply, xf * a + b, xf), x, top)


def _blur_matrix(size: int, sigma: float, device: torch.device) -> Tensor:
    """``(size, size)`` matrix of a 1-D Gaussian blur (radius ``3 sigma``) with reflected borders.

    Row ``i`` holds the weights output pixel ``i`` gives each input pixel, so ``M @ v`` blurs ``v`` along its first
    axis; a matrix product is much faster on the CPU than a long-kernel convolution and exact at the borders.
    """
    radius = max(1, min(math.ceil(3.0 * sigma), size - 1))
    t = torch.arange(-radius, radius + 1, device=device)
    weights = torch.exp(-0.5 * (t.float() / sigma) ** 2)
    weights = weights / weights.sum()
    idx = (torch.arange(size, device=device)[:, None] + t[None, :]).abs()  # reflect at 0 ...
    idx = torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)  # ... and at size - 1
    return torch.zeros(size, size, device=device).scatter_add_(1, idx, weights.expand(size, -1).contiguous())


def _smooth(field: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(..., H, W)`` over its last two axes (reflected borders, radius ``3 sigma``)."""
    h, w = field.shape[-2:]
    return _blur_matrix(h, sigma, field.device) @ field @ _blur_matrix(w, sigma, field.device).T


def elastic(x: Tensor, *, p: float, alpha: float = 120.0, sigma: float = 6.0) -> Tensor:
    """Random elastic deformation per sample, each sample deformed with probability ``p``.

    The displacement field of a deformed sample is uniform noise in ``[-1, 1]`` per pixel and axis, smoothed by a
    Gaussian of standard deviation ``sigma`` pixels and scaled by ``alpha`` pixels (the elastic distortion of
    Simard et al. 2003); the image is resampled at the displaced positions (bilinear, reflected at the borders) with
    :func:`torch.nn.functional.grid_sample`. Every sample of the batch is processed at once on its device.

    Parameters
    ----------
    x
        Images ``(B, C, H, W)``, ``uint8`` or float in ``[0, 1]``.
    p
        Probability that a sample is deformed; ``0`` returns ``x`` itself.
    alpha
        Scale of the displacement, in pixels of ``x``.
    sigma
        Smoothness of the displacement (Gaussian standard deviation), in pixels of ``x``.

    Returns
    -------
    A new tensor of the same shape and dtype (``uint8`` values are rounded).
    """
    _check_p(p)
    top = _max_value(x)
    if x.ndim != 4:
        msg = f"Expected images of shape (B, C, H, W), found {tuple(x.shape)}."
        raise ValueError(msg)
    if sigma <= 0 or alpha < 0:
        msg = f"Expected `sigma` > 0 and `alpha` >= 0, found sigma={sigma!r}, alpha={alpha!r}."
        raise ValueError(msg)
    if p == 0.0:
        return x
    n, _, h, w = x.shape
    device = x.device
    apply = torch.rand(n, 1, 1, 1, device=device) < p
    shift = _smooth(torch.rand(n, 2, h, w, device=device) * 2.0 - 1.0, sigma) * alpha  # (x, y) in pixels
    ys = (2.0 * torch.arange(h, device=device, dtype=torch.float32) + 1.0) / h - 1.0  # pixel centres in [-1, 1]
    xs = (2.0 * torch.arange(w, device=device, dtype=torch.float32) + 1.0) / w - 1.0
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    scale = torch.tensor([2.0 / w, 2.0 / h], device=device)
    grid = base + shift.permute(0, 2, 3, 1) * scale
    xf = x.float()
    warped = F.grid_sample(xf, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return _back_to(torch.where(apply, warped, xf), x, top)
