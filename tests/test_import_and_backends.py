"""Import stays lean; the backend registry reports, forces and falls back as documented."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast.ops import op_module

ml_mod = op_module("masked_linear")


def test_import_compiles_nothing_and_imports_no_triton():
    code = (
        "import sys, sparse_adv_fast as s, sparse_adv_fast.nn, sparse_adv_fast.ops;"
        "import sparse_adv_fast.functional;"
        "bad=[m for m in ('triton','torch.utils.cpp_extension') if m in sys.modules];"
        "print(','.join(bad) or 'clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean"


def test_available_lists_every_backend_with_true_or_reason():
    av = backends.available()
    assert set(av) == {"torch", "cpp", "triton", "cuda"}
    assert av["torch"] is True
    for name, v in av.items():
        assert v is True or (isinstance(v, str) and v), name
    if not torch.cuda.is_available():
        assert isinstance(av["cuda"], str)


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.use("fast")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("SPARSE_ADV_FAST_BACKEND", "torch")
    assert backends.current() == "torch"
    assert backends.resolve("masked_linear", torch.device("cpu")) == ("torch", None)
    monkeypatch.setenv("SPARSE_ADV_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        backends.current()


def test_use_overrides_env_and_auto_restores(monkeypatch):
    monkeypatch.setenv("SPARSE_ADV_FAST_BACKEND", "torch")
    backends.use("cpp")
    assert backends.current() == "cpp"
    backends.use("auto")
    assert backends.current() == "torch"  # back to the environment's choice


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_forced_backend_that_cannot_run_raises_with_reason():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    m = torch.ones(4, 3, dtype=torch.bool)
    with backends.using("cuda"), pytest.raises(backends.BackendUnavailable, match="cuda"):
        saf.ops.masked_linear(x, w, m)


def test_auto_falls_back_to_torch_with_one_log_line(monkeypatch, caplog, tmp_path):
    # a private dispatch cache: a recorded choice would not even try to load cpp
    monkeypatch.setenv("SPARSE_ADV_FAST_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))

    def broken(op):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(backends._cpp, "loader", broken)
    monkeypatch.setattr(backends._cpp, "variants", broken)  # auto's measured candidates
    monkeypatch.setattr(backends._cpp, "unavailable_reason", lambda: None)
    backends.reset()
    caplog.set_level("INFO", logger="sparse_adv_fast")
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    m = torch.rand(4, 3) > 0.5
    for _ in range(3):
        y = saf.ops.masked_linear(x, w, m)
    torch.testing.assert_close(y, ml_mod.reference(x, w, m))
    lines = [r for r in caplog.records if "compiler exploded" in r.getMessage()]
    assert len(lines) == 1
    backends.reset()


def test_info_prints_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "sparse_adv_fast.info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch" in out and "backends:" in out
    for name in ("torch", "cpp", "triton", "cuda"):
        assert f"  {name}" in out


def test_build_errors_are_trimmed_and_stale_locks_removed(tmp_path):
    import os
    import time

    from sparse_adv_fast.backends import _build

    log = "ninja: build stopped\nfoo.cpp:3:1: error: expected ';'\nlots of noise\n"
    assert _build._short(log) == "foo.cpp:3:1: error: expected ';'"
    lock = tmp_path / "lock"
    lock.write_text("")
    _build._clear_stale_lock(tmp_path)
    assert lock.exists(), "a fresh lock belongs to a running build"
    old = time.time() - _build.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    _build._clear_stale_lock(tmp_path)
    assert not lock.exists()


def test_triton_required_only_where_wheels_exist():
    """The pyproject marker admits exactly the platforms the backend lists as having wheels."""
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    (line,) = re.findall(r'^\s*"(triton[>=<~!][^"]*)",', text, flags=re.M)  # tomllib needs 3.11
    req = Requirement(line)
    for system, machine in [("Linux", "x86_64"), ("Linux", "aarch64"), ("Linux", "ppc64le"),
                            ("Windows", "AMD64"), ("Darwin", "arm64"), ("Darwin", "x86_64")]:
        env = {"platform_system": system, "platform_machine": machine}
        want = (system, machine) in backends._triton.WHEEL_PLATFORMS
        assert req.marker.evaluate(env) is want, (system, machine)


@pytest.mark.parametrize(("system", "machine", "says"), [
    ("Windows", "AMD64", "no wheels for Windows AMD64"),
    ("Darwin", "arm64", "no wheels for Darwin arm64"),
    ("Linux", "x86_64", "pip install 'triton>=3.6'"),
])
def test_triton_backend_says_why_it_is_missing(monkeypatch, system, machine, says):
    tri = backends._triton
    monkeypatch.setattr(tri.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else object())
    monkeypatch.setattr(tri.platform, "system", lambda: system)
    monkeypatch.setattr(tri.platform, "machine", lambda: machine)
    why = tri.unavailable_reason(need_gpu=False)
    assert says in why and "not installed" in why
    assert backends._reason("triton", torch.device("cuda")) == why


def test_triton_too_old_is_reported(monkeypatch):
    tri = backends._triton
    monkeypatch.setattr(tri.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(tri.importlib.metadata, "version", lambda name: "3.1.0")
    assert "triton 3.1.0 is too old" in tri.unavailable_reason(need_gpu=False)
