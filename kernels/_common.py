"""Helpers shared by the Triton kernels: launch configs, dtypes and the mask operand.

Autotuning runs every config of a kernel, which under ``TRITON_INTERPRET=1`` (CPU, numpy)
takes seconds per shape; there the kernels launch with one small fixed config instead.
The choice is made once, at import: ``@triton.jit`` reads the variable when it decorates a
kernel, so a kernel module is interpreted or compiled for its whole life.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Mask format the masked GEMMs read: ``"bits"`` (32 weights per int32 word, built once
#: per mask version and cached) or ``"bytes"`` (the bool mask itself, zero-copy).
MASK_FORMATS = ("bits", "bytes")

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def check_dtype(t: torch.Tensor, op: str) -> None:
    """Raise TypeError unless ``t`` is a floating dtype the kernels handle."""
    if t.dtype not in _TL_DTYPES:
        raise TypeError(
            f"{op} (triton): dtype {t.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in _TL_DTYPES)}"
        )


def check_int32_indexable(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise ValueError for a tensor whose element offsets overflow the GEMMs' int32 indexing."""
    for t in tensors:
        if t is None or not t.numel():
            continue
        if sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) >= 2**31:
            raise ValueError(
                f"{op} (triton): a {tuple(t.shape)} operand spans 2**31 or more elements, "
                "beyond the kernels' int32 offsets; split the batch"
            )


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulator type: float64 for float64 inputs, float32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision that matches torch's own matmul settings.

    torch keeps full fp32 products unless ``allow_tf32`` is set; a Triton dot would use TF32
    by default and miss the fp32 tolerance, so fp32 asks for ``"ieee"`` unless torch would
    itself use TF32.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"  # the default; only fp32 operands read this setting
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


#: ``SAF_TRITON_AUTOTUNE=0`` launches each GEMM with its first config instead of tuning
#: (each config compiles once per shape: useful for GPU test runs over many tiny shapes).
AUTOTUNE = os.environ.get("SAF_TRITON_AUTOTUNE", "1") != "0"


class _FixedConfig:
    """Launch a jitted kernel with one config (stand-in for ``triton.autotune``)."""

    def __init__(self, fn: Any, config: triton.Config):
        self.fn = fn
        self.meta = dict(config.kwargs)
        self.launch_opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}

    def __getitem__(self, grid: Callable[[dict], Sequence[int]] | Sequence[int]):
        def launch(*args: Any, **kwargs: Any) -> Any:
            g = grid(self.meta) if callable(grid) else grid
            return self.fn[g](*args, **kwargs, **self.meta, **self.launch_opts)

        return launch


def tuned(configs: list[triton.Config], key: list[str], interpret_config: triton.Config):
    """``triton.autotune(configs, key)`` on a GPU; one fixed small config under the interpreter
    (and the first of ``configs`` when ``SAF_TRITON_AUTOTUNE=0``).

    Only for kernels that overwrite their outputs completely (autotuning reruns them).
    """

    def wrap(fn: Any) -> Any:
        if INTERPRET:
            return _FixedConfig(fn, interpret_config)
        if not AUTOTUNE:
            return _FixedConfig(fn, configs[0])
        return triton.autotune(configs=configs, key=key)(fn)

    return wrap


def pack_bits(mask2d: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool ``(rows, cols)`` mask along ``cols``: ``(rows, ceil(cols/32))`` int32.

    Bit ``j`` of word ``w`` in row ``i`` is ``mask2d[i, 32*w + j]``.
    """
    rows, cols = mask2d.shape
    words = triton.cdiv(cols, 32)
    padded = torch.zeros((rows, words * 32), dtype=torch.int64, device=mask2d.device)
    padded[:, :cols] = mask2d
    weights = torch.ones(32, dtype=torch.int64, device=mask2d.device) << torch.arange(
        32, device=mask2d.device
    )
    packed = (padded.view(rows, words, 32) * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # wrap into int32
    return packed.to(torch.int32).contiguous()


def mask_operand(mask: torch.Tensor, fmt: str) -> tuple[torch.Tensor, int, bool]:
    """The mask as the kernels read it: ``(tensor, row_stride, is_bits)``.

    ``mask`` is read as ``(shape[0], rest)``: rows are output features/channels, columns the
    flattened reduction index. The packed form is cached per mask object and version (masks
    change far less often than weights), so an attack or a training step packs nothing.
    """
    if fmt not in MASK_FORMATS:
        raise ValueError(f"mask format must be one of {MASK_FORMATS}, got {fmt!r}")
    mask2d = mask.reshape(mask.shape[0], -1)
    if fmt == "bits":
        from sparse_adv_fast.ops import _cache

        bits = _cache.get(mask, mask, "triton_bits32", lambda: pack_bits(mask2d))
        return bits, bits.shape[1], True
    m = mask2d.contiguous()
    return m.view(torch.uint8), m.shape[1], False


@triton.jit
def load_mask(ptr, row, col, row_stride, valid, BITS: tl.constexpr):
    """Keep-flags of the mask at ``(row, col)`` (broadcastable index tensors), False off-range."""
    if BITS:
        word = tl.load(ptr + row * row_stride + col // 32, mask=valid, other=0)
        keep = ((word >> (col % 32)) & 1) != 0
    else:
        keep = tl.load(ptr + row * row_stride + col, mask=valid, other=0) != 0
    return keep & valid
