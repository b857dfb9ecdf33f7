"""Bit-packing of bool masks: 1 bit per weight instead of torch's 1 byte per bool.

Layout: the mask flattened in row-major order, bit ``i % 8`` (least significant first) of
byte ``i // 8`` is element ``i``; the last byte's unused high bits are zero. (The triton
kernels keep their own per-row int32 words, built from the bool mask they are given.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _shifts(device: torch.device) -> Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack(mask: Tensor) -> Tensor:
    """``mask`` (bool, any shape) as a flat uint8 tensor of ``ceil(numel / 8)`` bytes."""
    flat = mask.reshape(-1)
    n = flat.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = flat
    return (padded.view(-1, 8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)


def unpack(bits: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The bool mask of ``shape`` that :func:`pack` stored in ``bits``."""
    n = 1
    for s in shape:
        n *= int(s)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask: expected {(n + 7) // 8} uint8 bytes for shape "
                         f"{tuple(shape)}, got {bits.dtype} of shape {tuple(bits.shape)}")
    flags = (bits.unsqueeze(1) >> _shifts(bits.device)) & 1
    return flags.reshape(-1)[:n].bool().reshape(shape)

