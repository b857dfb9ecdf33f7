"""Resumable stage runner: each finished stage is one atomically written file in ``<out>/stages``.

A stage is a named function whose (picklable, plain) result is saved as
``<out>/stages/<name>.pt`` the moment it returns. Rerunning the pipeline with the same output
directory loads finished stages instead of recomputing them; ``fresh=True`` deletes them first.
The run's settings are stored in ``<out>/stages/run.json``: resuming with other settings is an
error (mixing stages from two configurations would give a meaningless table).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_FORMAT = 1


class StageError(RuntimeError):
    """A stage failed, or a stage file or the run settings in an output directory cannot be
    used."""


def _checkpoint() -> Any:
    # Resolved per call so the checkpoint module is only needed once a stage is saved/loaded.
    return importlib.import_module("sparse_adv_fast.checkpoint")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TrainingDiverged(StageError):
    """Training of a stage produced NaN / Inf (the last finished epoch's checkpoint is kept)."""


# ---- per-stage random state -----------------------------------------------------------------
SEED_LIMIT = 2**32


def check_seed(seed: Any) -> int:
    """``seed`` if it is an int in [0, 2**32) (what every RNG the pipeline seeds accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return seed


def stage_seed(seed: int, stage: str) -> int:
    """A 64-bit seed of its own for ``(seed, stage)``: distinct names give unrelated streams
    (a hash, not a sum of characters, so ``imp_78.5`` and ``imp_87.5`` differ)."""
    digest = hashlib.sha256(f"{check_seed(seed)}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seed_stage(seed: int, stage: str, loader: Any = None) -> None:
    """Seed every RNG a stage draws from with ``(seed, stage)``: torch's, numpy's, python's
    and, given ``loader``, the generators its shuffling draws from.

    Called at the start of each stage, so the stage's draws do not depend on what earlier
    stages drew in this process: a run resumed at (or inside) any stage draws exactly what
    an uninterrupted run draws.
    """
    s = stage_seed(seed, stage)
    torch = importlib.import_module("torch")
    torch.manual_seed(s)
    importlib.import_module("numpy").random.seed(s % SEED_LIMIT)
    random.seed(s)
    if loader is not None:
        state = importlib.import_module("sparse_adv_fast.train.state")
        for i, g in enumerate(state.loader_generators(loader)):
            g.manual_seed(stage_seed(seed, f"{stage}/loader{i}"))


def fit_stage(
    model: Any, loaders: tuple[Any, Any], *, seed: int, stage: str,
    checkpoint: str | os.PathLike[str], where: str | None = None, **fit_kw: Any,
) -> Any:
    """``saf.train.fit`` for one stage: its RNG from ``(seed, stage)`` (:func:`seed_stage`),
    resumable from ``checkpoint`` (written after every epoch), and a divergence raised as
    :class:`TrainingDiverged`: one message naming ``where`` (e.g. the output file), the
    stage, the first non-finite tensor and the checkpoint of the last finished epoch, which
    is kept."""
    seed_stage(seed, f"{stage}/fit", loaders[0])
    fit = importlib.import_module("sparse_adv_fast.train").fit
    try:
        return fit(model, loaders, checkpoint=checkpoint, resume=True, **fit_kw)
    except (FloatingPointError, _finite().NonFiniteError) as e:
        bad = _finite().first_nonfinite(model)
        msg = " ".join(str(e).split())
        layer = f"; first non-finite tensor: {bad}" if bad and bad not in msg else ""
        kept = (f"the last finished epoch is kept in {checkpoint}" if Path(checkpoint).exists()
                else "no epoch finished, so no checkpoint was written")
        prefix = f"{where}: " if where else ""
        raise TrainingDiverged(
            f"{prefix}training stage {stage!r} diverged: {msg}{layer}; {kept}; rerun with a "
            "lower --lr and --fresh"
        ) from e


def _finite() -> Any:
    return importlib.import_module("sparse_adv_fast.finite")


class StageRunner:
    """Run named stages once per output directory, checkpointing each result atomically.

    Args:
        out_dir: the output directory (created if missing).
        config: the run's settings (JSON-serialisable). Stored on the first run; a later run in
            the same directory with different settings raises :class:`StageError` unless
            ``fresh``.
        fresh: delete the stage files of an earlier run and start over.
        log: where one-line progress messages go (default: stderr).
        writer: whether this process writes stage files; ``False`` for the other ranks of
            a torchrun job, which read what rank 0 wrote (``run.json`` must exist).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        config: dict[str, Any],
        fresh: bool = False,
        log: Callable[[str], None] | None = None,
        writer: bool = True,
    ) -> None:
        if not isinstance(config, dict):
            raise TypeError(f"StageRunner: config must be a dict, got {type(config).__name__}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise StageError(f"output path {str(self.out_dir)!r} exists and is not a directory")
        self.stage_dir = self.out_dir / "stages"
        self.config = json.loads(json.dumps(config))  # normalise tuples -> lists for comparison
        self.log = log or _stderr
        self.writer = writer
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}
        if writer:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
        if fresh and writer:
            self.clear()
        self._check_config()

    # -- settings -----------------------------------------------------------------------------
    @property
    def _run_file(self) -> Path:
        return self.stage_dir / "run.json"

    def clear(self) -> None:
        """Delete this runner's files (stage results, scratch checkpoints, run.json)."""
        # Only files this runner writes: an --out pointing at a user folder loses nothing else.
        for p in self.stage_dir.iterdir():
            ours = p.suffix == ".pt" or p.name == "run.json" or p.name.startswith(".")
            if p.is_file() and ours:
                p.unlink()

    def _check_config(self) -> None:
        if not self._run_file.exists():
            if not self.writer:
                raise StageError(f"{self._run_file} does not exist on this rank: the run "
                                 "directory must be on a filesystem every rank shares")
            if any(self.stage_dir.glob("*.pt")):
                raise StageError(
                    f"{self.stage_dir} holds stage files but no run.json; rerun with --fresh"
                )
            text = json.dumps(self.config, indent=2, sort_keys=True)
            _checkpoint().write_atomic(self._run_file, text)
            return
        try:
            old = json.loads(self._run_file.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise StageError(
                f"run settings file {self._run_file} is corrupt ({e}); rerun with --fresh"
            ) from None
        if old != self.config:
            diff = ", ".join(
                f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}"
                for k in sorted(set(old) | set(self.config))
                if old.get(k) != self.config.get(k)
            )
            raise StageError(
                f"{self.out_dir} holds a run with other settings ({diff}); "
                "rerun with --fresh to start over, or choose another --out"
            )

    # -- stages -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """The result file of stage ``name``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"stage name must match {_NAME.pattern}, got {name!r}")
        return self.stage_dir / f"{name}.pt"

    def scratch(self, name: str) -> Path:
        """A file a stage may use for its own mid-stage checkpoints (deleted when it finishes)."""
        return self.stage_dir / f"{name}.partial.pt"

    def done(self, name: str) -> bool:
        """Whether stage ``name`` has a saved result."""
        return self.path(name).exists()

    def load(self, name: str) -> Any:
        """The saved result of stage ``name``; :class:`StageError` naming the file if unusable."""
        path = self.path(name)
        try:
            blob = _checkpoint().load(path)
        except Exception as e:  # any unreadable file: the message must name it
            cause = e.__cause__ or e  # CheckpointError wraps torch's own error
            lines = str(cause).strip().splitlines() or [""]
            reason = f"{type(cause).__name__}: {lines[0][:120]}"
            raise StageError(
                f"stage file {path} is corrupt or unreadable ({reason}); "
                "delete it or rerun with --fresh"
            ) from e
        if not isinstance(blob, dict) or blob.get("stage") != name or "result" not in blob:
            raise StageError(
                f"stage file {path} is not a result of stage {name!r}; "
                "delete it or rerun with --fresh"
            )
        return blob["result"]

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Return stage ``name``'s saved result, or run ``fn()`` and save its result first."""
        path = self.path(name)
        if path.exists():
            result = self.load(name)
            self.skipped.append(name)
            self.log(f"[saf] stage {name}: done earlier, skipped ({path.name})")
            return result
        self.log(f"[saf] stage {name}: running")
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        if not self.writer:
            return result
        _checkpoint().save_atomic(
            {"stage": name, "format": _FORMAT, "seconds": dt, "result": result}, path
        )
        self.scratch(name).unlink(missing_ok=True)
        self.ran.append(name)
        self.seconds[name] = dt
        self.log(f"[saf] stage {name}: finished in {dt:.1f}s")
        return result
