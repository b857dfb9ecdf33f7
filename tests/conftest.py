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
