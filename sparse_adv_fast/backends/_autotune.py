"""Dispatch by measurement: time the candidates of an op once, keep the winner on disk.

A :class:`Key` names one decision: op, direction (``forward`` / ``grad_input`` /
``grad_weight``, or ``step`` / ``random_init``), shape (leading batch dimension rounded up
to a power of two, so early-stopped PGD with shrinking batches does not re-time every
step), density bucket, dtype, device, thread count and scope (inside an attack's frozen
weights the derived forms are reused, elsewhere a forward rebuilds them: different costs).
On the first call with a new key :func:`measure` runs each candidate once as a warm-up
(a candidate that raises is skipped), times the survivors with the timer (default:
:func:`default_timer`, interleaved rounds, minimum) and applies :func:`rule`: the fastest
wins, but an implementation other than the torch reference must beat it by
:data:`MARGIN` (:data:`DENSE_MARGIN` on near-dense weights), so ``auto`` is never slower
than the reference within timing noise, and a kernel never measured on a device is never
preferred there over cuBLAS/cuDNN (the cache is per device name and per machine).

Choices live in memory and in a JSON file per machine (:func:`cache_path`; override with
``SPARSE_ADV_FAST_DISPATCH_CACHE``), written atomically and merged with what other
processes wrote; a corrupt file is ignored with one warning. ``SPARSE_ADV_FAST_AUTOTUNE=0``
switches measuring off (the registry then uses its static rule).

Nothing is timed while torch.compile traces, under fake tensors or during CUDA graph
capture: :func:`can_measure` says so and the registry falls back to its static rule.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

ENV_AUTOTUNE = "SPARSE_ADV_FAST_AUTOTUNE"
ENV_CACHE = "SPARSE_ADV_FAST_DISPATCH_CACHE"
REFERENCE = "torch"
# A non-reference candidate must be at least this much faster than the reference: two or
# three timed reps on a shared machine jitter by a few percent, and a tie must go to torch.
MARGIN = 0.05
# Above DENSE_FROM (kept fraction) the margin is DENSE_MARGIN: a CSR kernel on a near-dense
# layer loses more than the reference when its input comes from memory instead of the
# timing loop's warm cache (a dense small-CNN conv timed 9 % faster ran the attack 1.4x
# slower), so it is picked only where it wins by far (a thin first conv's input gradient:
# 2.3x).
DENSE_FROM, DENSE_MARGIN = 0.5, 0.4
WARMUP, REPS, MAX_REPS = 1, 3, 10
# After REPS rounds, rounds continue (up to MAX_REPS) while the two fastest are this close,
# or while some candidate's minimum is not confirmed by a second sample within CONFIRM of
# it: on a shared CPU a descheduled OpenMP thread stalls a kernel for a scheduler quantum,
# and three stalled samples in a row made a dense conv look slower than the CSR one.
CLOSE = 1.25
CONFIRM = 1.2
# Upper edges of the density buckets (kept fraction); a density falls in the first edge >=.
DENSITY_EDGES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
# 2: timings with confirmed minima (format-1 files were timed with three rounds only).
FORMAT = 2

_log = logging.getLogger("sparse_adv_fast")

# (key, {name: () -> output}) -> {name: seconds}; tests inject a fake one (use_timer).
Timer = Callable[["Key", Mapping[str, Callable[[], Any]]], dict[str, float]]


class Key(NamedTuple):
    """One dispatch decision."""

    op: str
    direction: str
    shape: tuple
    density: float | None  # bucket upper edge, None for ops without a mask
    dtype: str
    device: str
    threads: int
    scope: str = "-"  # "frozen" (an attack: forms reused), "eager", "-" (reads no weight)

    def text(self) -> str:
        """Stable, readable form used as the on-disk key."""
        shape = shape_text(self.shape)
        dens = "" if self.density is None else f" density<={self.density:g}"
        scope = "" if self.scope == "-" else f" {self.scope}"
        return (f"{self.op}/{self.direction} [{shape}]{dens} {self.dtype} {self.device} "
                f"threads={self.threads}{scope}")


def shape_text(shape: tuple) -> str:
    """Runs of ints joined by ``x``, string parts (labelled settings) by spaces."""
    out: list[str] = []
    for s in shape:
        if isinstance(s, int) and out and out[-1][-1:].isdigit() and not out[-1][:1].isalpha():
            out[-1] += f"x{s}"
        else:
            out.append(str(s))
    return " ".join(out)


class Choice(NamedTuple):
    """What :func:`measure` decided and the times it saw (seconds; skipped: the error)."""

    name: str
    times: dict[str, float]
    skipped: dict[str, str]


_enabled_seen: tuple[str | None, bool] = (None, True)


def enabled() -> bool:
    """False when ``SPARSE_ADV_FAST_AUTOTUNE`` is ``0`` / ``false`` / ``off`` / ``no``."""
    global _enabled_seen
    raw = os.environ.get(ENV_AUTOTUNE)
    if raw != _enabled_seen[0]:  # parsed once per value: asked on every op call
        on = (raw or "1").strip().lower() not in ("0", "false", "off", "no")
        _enabled_seen = (raw, on)
    return _enabled_seen[1]


def density_bucket(density: float) -> float:
    """The upper edge of the bucket ``density`` falls in (see :data:`DENSITY_EDGES`)."""
    for edge in DENSITY_EDGES:
        if density <= edge + 1e-12:
            return edge
    return 1.0


def rows_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


_device_names: dict[int, str] = {}


def device_text(device: torch.device) -> str:
    """``cpu`` or ``cuda:<device name>``: a measurement holds for one kind of device."""
    if device.type != "cuda":
        return device.type
    idx = device.index if device.index is not None else torch.cuda.current_device()
    name = _device_names.get(idx)
    if name is None:
        name = _device_names[idx] = torch.cuda.get_device_name(idx)
    return f"cuda:{name}"


def make_key(op: str, direction: str, shape: tuple, density: float | None,
             dtype: torch.dtype, device: torch.device, scope: str = "-") -> Key:
    """The :class:`Key` of a call (batch dimension bucketed, density bucketed)."""
    shape = (rows_bucket(shape[0]), *shape[1:]) if shape else ()
    bucket = None if density is None else density_bucket(density)
    return Key(op, direction, tuple(shape), bucket, str(dtype).removeprefix("torch."),
               device_text(device), torch.get_num_threads(), scope)


def can_measure(tensors: tuple) -> bool:
    """False while torch.compile traces, for fake/meta tensors or during CUDA graph capture."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    for t in tensors:
        if isinstance(t, torch.Tensor):
            if isinstance(t, FakeTensor) or t.is_meta:
                return False
            if t.is_cuda and torch.cuda.is_current_stream_capturing():
                return False
    return True


# ---- timing -----------------------------------------------------------------------------
def _sync(key: Key) -> None:
    if key.device.startswith("cuda"):
        torch.cuda.synchronize()


def _close(best: Mapping[str, float]) -> bool:
    top = sorted(best.values())[:2]
    return len(top) == 2 and top[1] < top[0] * CLOSE


def _confirmed(samples: list[float]) -> bool:
    """The minimum is seen twice (within :data:`CONFIRM`): it is the kernel, not luck."""
    s = sorted(samples)
    return len(s) >= 2 and s[1] <= s[0] * CONFIRM


def default_timer(key: Key, fns: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
    """Min over interleaved rounds (A B A B ...) of each candidate's time: :data:`REPS`
    rounds, more (up to :data:`MAX_REPS`) while the two fastest are within :data:`CLOSE`
    or a minimum is not yet confirmed by a second sample.

    Interleaving spreads a noisy neighbour's load over every candidate instead of one; the
    extra rounds are spent only where the decision is close or the machine is noisy.
    """
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for rounds in range(1, MAX_REPS + 1):
        for name, fn in fns.items():
            _sync(key)
            t0 = time.perf_counter()
            fn()
            _sync(key)
            samples[name].append(time.perf_counter() - t0)
        best = {n: min(v) for n, v in samples.items()}
        settled = all(_confirmed(v) for v in samples.values()) and not _close(best)
        if rounds >= REPS and settled:
            break
    return {n: min(v) if v else math.inf for n, v in samples.items()}


_timer: Timer = default_timer


@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[None]:
    """Measure with ``timer`` inside the block (tests inject a fake one)."""
    global _timer
    prev, _timer = _timer, timer
    try:
        yield
    finally:
        _timer = prev


def margin(key: Key) -> float:
    """How much faster than the reference another candidate must be for ``key``."""
    return DENSE_MARGIN if key.density is not None and key.density > DENSE_FROM else MARGIN


def rule(times: Mapping[str, float], reference: str = REFERENCE, margin: float = MARGIN) -> str:
    """The fastest candidate, unless it is not the reference and does not beat it by
    ``margin`` (a fraction of the reference's time); then the reference. Without a
    reference time, the fastest."""
    if not times:
        return reference
    best = min(times, key=times.__getitem__)
    ref = times.get(reference)
    if ref is None or best == reference:
        return best
    return best if times[best] < ref * (1.0 - margin) else reference


def measure(key: Key, fns: Mapping[str, Callable[[], Any]]) -> Choice:
    """Warm each candidate up once (skipping those that raise), time the rest, pick one."""
    ok: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            for _ in range(WARMUP):
                fn()
        except Exception as e:  # a kernel that cannot run this case is no candidate
            skipped[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            _log.info("sparse_adv_fast: %s skipped for %s (%s)", name, key.text(), skipped[name])
            continue
        ok[name] = fn
    times = {n: float(t) for n, t in _timer(key, ok).items()} if ok else {}
    return Choice(rule(times, margin=margin(key)), times, skipped)


# ---- the per-machine cache on disk --------------------------------------------------------
def _sources_digest(h: Any) -> None:
    """Feed the native sources into ``h``: a changed kernel invalidates old measurements."""
    try:
        from ._build import csrc_dir

        for p in sorted(csrc_dir().rglob("*")):
            if p.suffix in (".cpp", ".cu", ".h"):
                h.update(p.read_bytes())
    except (OSError, FileNotFoundError):  # no sources shipped: version strings must do
        pass


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


_fingerprint: str | None = None


def fingerprint() -> str:
    """Short hash of host, CPU model, core count, torch version and native sources."""
    global _fingerprint
    if _fingerprint is None:
        h = hashlib.sha1()
        for part in (platform.node(), platform.machine(), _cpu_model(), str(os.cpu_count()),
                     torch.__version__, str(torch.version.cuda)):
            h.update(part.encode() + b"\0")
        _sources_digest(h)
        _fingerprint = h.hexdigest()[:12]
    return _fingerprint


def cache_path() -> Path:
    """``$SPARSE_ADV_FAST_DISPATCH_CACHE``, else ``~/.cache/sparse_adv_fast/dispatch-<fp>.json``
    (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sparse_adv_fast" / f"dispatch-{fingerprint()}.json"


_warned_paths: set[tuple[str, str]] = set()


def _warn_once(path: Path, kind: str, msg: str) -> None:
    if (str(path), kind) not in _warned_paths:
        _warned_paths.add((str(path), kind))
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def read(path: Path | None = None) -> dict[str, dict]:
    """Records in the cache file (``{key text: record}``); ``{}`` if missing or corrupt."""
    path = cache_path() if path is None else path
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn_once(path, "read", f"sparse_adv_fast: ignoring unreadable dispatch cache {path} "
                                 f"({e}); it will be rewritten")
        return {}
    if isinstance(data, dict) and isinstance(data.get("format"), int) \
            and data["format"] != FORMAT:
        return {}  # another version's measurements: measured again, silently
    if isinstance(data, dict) and data.get("fingerprint") != fingerprint():
        # Measured on another host, torch or kernel source. The default path already has
        # the fingerprint in its name; a path given by the environment variable does not,
        # and without this check it would keep serving the old kernels' timings.
        return {}
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, dict):
        _warn_once(path, "read", f"sparse_adv_fast: ignoring dispatch cache {path} of an "
                                 "unknown layout; it will be rewritten")
        return {}
    return {k: v for k, v in choices.items() if isinstance(v, dict) and "choice" in v}


def record(key: Key, choice: Choice) -> dict:
    """The on-disk record of one decision."""
    return {
        "choice": choice.name, "op": key.op, "direction": key.direction,
        "shape": shape_text(key.shape), "density": key.density, "dtype": key.dtype,
        "device": key.device, "threads": key.threads, "scope": key.scope,
        "times_s": {n: round(t, 9) for n, t in choice.times.items()},
        "skipped": choice.skipped, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write(updates: Mapping[str, dict], path: Path | None = None) -> None:
    """Merge ``updates`` into the cache file (re-read first, so concurrent processes lose
    little) and replace it atomically; an unwritable location warns once."""
    path = cache_path() if path is None else path
    merged = read(path)
    merged.update(updates)
    text = json.dumps({"format": FORMAT, "fingerprint": fingerprint(), "choices": merged},
                      indent=1, sort_keys=True)
    try:
        from ..checkpoint import write_atomic  # the one atomic writer (imports no backend)

        write_atomic(path, text)
    except OSError as e:
        _warn_once(path, "write", f"sparse_adv_fast: cannot write the dispatch cache {path} ({e}); "
                         "choices are kept in memory only")


def explain(rec: Mapping[str, Any]) -> str:
    """One line: the choice and each candidate's time relative to the reference."""
    times = rec.get("times_s") or {}
    ref = times.get(REFERENCE)
    parts = []
    for name, t in sorted(times.items(), key=lambda kv: kv[1]):
        rel = f", {ref / t:.2f}x torch" if ref and name != REFERENCE and t > 0 else ""
        parts.append(f"{name} {t * 1e3:.3g} ms{rel}")
    for name, why in (rec.get("skipped") or {}).items():
        parts.append(f"{name} skipped ({why})")
    return f"-> {rec.get('choice')}  ({'; '.join(parts) or 'no timings'})"


__all__ = [
    "DENSE_FROM", "DENSE_MARGIN", "DENSITY_EDGES", "ENV_AUTOTUNE", "ENV_CACHE", "MARGIN",
    "REFERENCE", "Choice", "Key", "cache_path", "can_measure", "default_timer",
    "density_bucket", "enabled", "explain", "fingerprint", "make_key", "margin", "measure",
    "read", "record", "rows_bucket", "rule",
    "use_timer", "write",
]
