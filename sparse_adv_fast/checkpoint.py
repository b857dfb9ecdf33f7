"""Atomic files: a reader never sees a half-written file, a failed write keeps the earlier
file, and a corrupt checkpoint is reported as such (``CheckpointError``), never silently
treated as absent.

:func:`write_atomic` is the one atomic-write helper of the package: text, bytes and
``torch.save`` objects (:func:`save_atomic`) all go through it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, truncated or mismatched)."""


Content = str | bytes | Callable[[IO[bytes]], object]


def write_atomic(path: str | os.PathLike[str], content: Content) -> Path:
    """Write ``content`` to ``path`` atomically; returns the path.

    ``content`` is text (written as UTF-8), bytes, or a callable ``write(f)`` that writes
    into the binary file object ``f`` (e.g. ``lambda f: torch.save(obj, f)``).

    The data goes to a uniquely named temp file in the same directory (created with
    ``O_EXCL`` under a random name, as ``mkstemp`` does: two writers of one path never share
    a temp file; same filesystem, so the rename is atomic), which is flushed and fsynced,
    then ``os.replace``d over ``path``; the directory is fsynced last. The file gets the
    usual permissions (``0o666`` less the umask), or those of the file it replaces. On any
    failure the temp file is removed and ``path`` is untouched. An ``OSError`` (a full disk,
    no permission) is re-raised with the same ``errno`` and a one-line message naming
    ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    _fsync_dir(path.parent)
    return path


def _create_temp(path: Path) -> tuple[int, str]:
    # Not tempfile.mkstemp: it forces mode 0o600, and results / checkpoints are meant to be
    # as readable as any file the user writes (the umask decides, applied by os.open).
    for _ in range(100):
        tmp = os.fspath(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        with contextlib.suppress(OSError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # keep a replaced file's mode
        return fd, tmp
    raise FileExistsError(f"no unused temporary name next to {path}")


def _write_error(path: Path, e: OSError) -> OSError:
    reason = e.strerror or str(e) or type(e).__name__
    kept = "; the earlier file is unchanged" if path.is_file() else ""
    return OSError(e.errno, f"cannot write {path}: {' '.join(reason.split())}{kept}")


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`write_atomic`); the path."""
    return write_atomic(path, lambda f: torch.save(obj, f))


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
    path: str | os.PathLike[str], *, map_location: Any = "cpu", weights_only: bool = True
) -> Any:
    """Load a checkpoint written by :func:`save_atomic`.

    Raises ``IsADirectoryError`` for a directory, ``FileNotFoundError`` if ``path`` does not
    exist and :class:`CheckpointError` (naming the file) if it cannot be read.
    ``weights_only=True`` (default) refuses arbitrary pickled objects: tensors, containers
    and plain Python values only.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: corrupt, truncated or holding objects that "
            f"weights_only loading refuses ({type(e).__name__}: {e}); delete it to start over"
        ) from e


__all__ = ["CheckpointError", "load", "save_atomic", "write_atomic"]
