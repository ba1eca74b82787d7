"""On-device image augmentation shared by the image models (pixel normalisation lives in :mod:`stpred._imaging`)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["N_DIHEDRAL", "dihedral"]

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

