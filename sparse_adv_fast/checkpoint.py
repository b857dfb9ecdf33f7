"""Atomic checkpoint files: a reader never sees a half-written file, and a corrupt one is
reported as such (``CheckpointError``), never silently treated as absent.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, truncated or mismatched)."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically.

    Writes a temp file in the same directory (same filesystem, so the rename is atomic),
    flushes and fsyncs it, then ``os.replace``s it over ``path`` and fsyncs the directory.
    Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load(
    path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True
) -> Any:
    """Load a checkpoint written by :func:`save_atomic`.

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`CheckpointError`
    (naming the file) if it cannot be read. ``weights_only=True`` (default) refuses
    arbitrary pickled objects: tensors, containers and plain Python values only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: corrupt, truncated or holding objects that "
            f"weights_only loading refuses ({type(e).__name__}: {e}); delete it to start over"
        ) from e


__all__ = ["CheckpointError", "load", "save_atomic"]
