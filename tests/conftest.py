"""Shared fixtures: backend lists, seeding and a clean backend choice per test."""

from __future__ import annotations

import os

# Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is
# first imported, and the suite runs in one process, so it is set here, first.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:  # tests cover many tiny shapes: one fixed config, no autotuning per shape
        os.environ.setdefault("SAF_TRITON_AUTOTUNE", "0")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch

from sparse_adv_fast import backends


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    prev = backends.current()
    yield
    backends.use(prev)


@pytest.fixture(autouse=True)
def _no_tf32():
    """References run in full fp32: with TF32 on (a GPU default for cuDNN), a cuBLAS/cuDNN
    reference would carry ~1e-3 relative error, beyond the fp32 tolerance, and Triton's
    dots would follow it (``kernels._common.dot_precision``). No-op on CPU."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def cpu_backends() -> list[str]:
    """Backends that run CPU tensors here: torch, cpp (if a compiler is present), and
    triton under TRITON_INTERPRET=1."""
    out = ["torch"]
    if backends._reason("cpp", torch.device("cpu")) is None:
        out.append("cpp")
    if backends._reason("triton", torch.device("cpu")) is None:
        out.append("triton")
    return out


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
