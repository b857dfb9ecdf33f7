"""Shared fixtures: backend lists, seeding, a clean backend choice per test, one torch
thread on request (``one_thread``) and the CLI runner (``run_cli``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The suite never reads or writes the user's dispatch cache (~/.cache/sparse_adv_fast): a
# fresh file for this run, inherited by subprocess tests; tests that test the cache set
# their own.
if not os.environ.get("SPARSE_ADV_FAST_DISPATCH_CACHE"):
    _cache_dir = tempfile.mkdtemp(prefix="saf-tests-")
    atexit.register(shutil.rmtree, _cache_dir, True)
    os.environ["SPARSE_ADV_FAST_DISPATCH_CACHE"] = os.path.join(_cache_dir, "dispatch.json")

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

# The backend choice of the session: every test starts from it and returns to it, so a
# fixture of wider scope that forces a backend cannot leak into later modules.
_SESSION_BACKEND = backends.current()


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    backends.use(_SESSION_BACKEND)
    yield
    backends.use(_SESSION_BACKEND)


@pytest.fixture
def torch_backend():
    """The torch reference backend for the test: for tests of logic above the kernels
    (pipeline, pruning, CLI), which then build no native extension and time no candidates.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("torch_backend")``."""
    with backends.using("torch"):
        yield


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


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test, restored afterwards: with tiny models, more
    threads only add contention on a shared CPU (6x slower here). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(capsys, *argv):
    """``cli.main(argv)`` (each argument passed through ``str``) -> (exit status, stdout,
    stderr), SystemExit included. Tests import it: ``from conftest import run_cli``."""
    from sparse_adv_fast import cli  # the pipeline only for the tests that run it

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def blob_mlp(c: int, d: int, n: int, *, noise: float, steps: int, act=torch.nn.ReLU):
    """A d-32-c MLP trained full-batch (Adam, lr 2e-2, ``steps`` steps, seed 0) on ``c``
    Gaussian blobs in [0, 1]^d (centers in [0.3, 0.7], labels cycling): ``(model.eval(), x,
    y)``."""
    torch.manual_seed(0)
    centers = 0.3 + 0.4 * torch.rand(c, d)
    y = torch.arange(n) % c
    x = (centers[y] + noise * torch.randn(n, d)).clamp(0, 1)
    model = torch.nn.Sequential(torch.nn.Linear(d, 32), act(), torch.nn.Linear(32, c))
    opt = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


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
