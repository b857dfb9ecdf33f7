"""Lazy, cached builds of the native extensions (DeepSpeed-op-builder style).

``torch.utils.cpp_extension`` is imported only when a build is first needed. Built
modules are cached in-process; on disk, torch caches them under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) keyed by a hash of the
sources and flags, so a rebuild happens only when a source changes.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

_log = logging.getLogger("sparse_adv_fast")
_lock = threading.Lock()
_built: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def csrc_dir() -> Path:
    """Where the C++/CUDA sources live (installed package or source checkout)."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if cand.is_dir() and any(cand.glob("*/binding.cpp")):
            return cand
    raise FileNotFoundError(f"no csrc/ with sources next to {here}")


def compiler_reason() -> str | None:
    """Why no C++ extension can be built here, or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler found ({cxx!r} not on PATH)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    return None


def failure(name: str) -> str | None:
    """The error of an earlier failed build of ``name``, if any."""
    return _failed.get(name)


def load(op: str, flavour: str) -> ModuleType:
    """Build (once) and import the extension for ``op``; flavour is ``cpp`` or ``cuda``.

    An ahead-of-time build installed by setup.py (``sparse_adv_fast._C_<op>_<flavour>``)
    is used when present.
    """
    name = f"_C_{op}_{flavour}"
    with _lock:
        if name in _built:
            return _built[name]
        if name in _failed:
            raise RuntimeError(_failed[name])
        try:
            mod = importlib.import_module(f"sparse_adv_fast.{name}")
        except ImportError:
            try:
                mod = _jit(op, flavour, name)
            except Exception as e:
                _failed[name] = f"building {name} failed: {_short(str(e))}"
                raise RuntimeError(_failed[name]) from e
        _built[name] = mod
        return mod


def _short(message: str, keep: int = 12) -> str:
    """The compiler's error lines out of a build log (the whole log is rarely readable)."""
    lines = [ln.strip() for ln in message.splitlines() if "error" in ln.lower()]
    return " | ".join(lines[:keep]) if lines else message.strip()[-2000:]


# A build killed half-way leaves torch's lock file behind and every later build waits on it
# forever; a real build here takes about a minute, so a lock this old is stale.
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        _log.warning("sparse_adv_fast: removing stale build lock %s (%.0f s old)", lock, age)
        lock.unlink(missing_ok=True)


def _jit(op: str, flavour: str, name: str) -> ModuleType:
    why = compiler_reason()
    if why:
        raise RuntimeError(why)
    ninja_bin = Path(sys.executable).parent
    if str(ninja_bin) not in os.environ.get("PATH", ""):
        os.environ["PATH"] = f"{ninja_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    from torch.utils import cpp_extension

    src = csrc_dir() / op
    sources = [str(src / "binding.cpp"), str(src / f"{op}_cpu.cpp")]
    cflags = ["-O3", "-fopenmp", "-march=native"] if sys.platform != "darwin" else ["-O3"]
    ldflags = ["-fopenmp"] if sys.platform != "darwin" else []
    kwargs = {}
    if flavour == "cuda":
        sources.append(str(src / f"{op}.cu"))
        cflags.append("-DSAF_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3"]  # no fast-math: pgd_step is bit-exact vs torch
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise FileNotFoundError(f"missing sources: {', '.join(missing)}")
    msg = f"sparse_adv_fast: loading {name} (compiled on first use, then cached)..."
    print(msg, file=sys.stderr)
    _clear_stale_lock(Path(cpp_extension._get_build_directory(f"saf{name}", verbose=False)))
    return cpp_extension.load(
        name=f"saf{name}",
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        with_cuda=flavour == "cuda",
        verbose=os.environ.get("SPARSE_ADV_FAST_VERBOSE_BUILD") == "1",
        **kwargs,
    )
