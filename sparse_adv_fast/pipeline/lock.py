"""One run per output directory: :class:`RunLock` over ``<dir>/run.lock``.

Two runs writing the same output directory interleave their files into a result that
matches neither, and ``--fresh`` deletes the files of a run still writing them. So the
commands that write a run directory (``demo``; ``train`` / ``prune`` / ``iwi`` through their
checkpoint directory) hold this lock for the whole run, and a second run fails at once.

The lock is an exclusive ``fcntl.flock`` on the lock file: the kernel drops it when the
holder dies, however it dies (SIGKILL included), so a lock left by a dead process is taken
over without any guessing. The file records the holder's pid, host and start time for the
message a refused run prints. Where ``flock`` is unavailable (no ``fcntl``, a filesystem
that refuses it) the lock falls back to creating the file with ``O_CREAT | O_EXCL`` and
treats an existing one as stale when its pid is not alive on this host
(``os.kill(pid, 0)``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux / macOS
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """The output directory is being written by another live run."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "another process"
    when = owner.get("started")
    since = (f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}"
             if isinstance(when, (int, float)) else "")
    return f"pid {owner.get('pid')} on {owner.get('host')}{since}"


class RunLock:
    """Exclusive lock of run directory ``folder`` (created if missing); a context manager.

    ``acquire()`` raises :class:`RunLockedError` at once (it never waits) when a live run
    holds it; a lock file left by a dead process is taken over (``took_over`` then holds
    that process's record, and ``log`` (default: stderr) gets a one-line note).
    ``release()`` removes the lock file.
    """

    def __init__(self, folder: str | os.PathLike[str],
                 log: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.path = self.folder / LOCK_NAME
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None
        self._flock = fcntl is not None

    # -- public -------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError`; returns ``self``."""
        if self._fd is not None:
            raise RuntimeError(f"RunLock({self.folder}) is already held by this object")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            if not self._flock:
                raise _NoFlock
            self._acquire_flock()
        except _NoFlock:
            self._flock = False
            self._acquire_exclusive()
        if self.took_over:
            self.log(f"[saf] {self.folder}: took over the lock left by a run that is no longer "
                     f"running ({_describe(self.took_over)})")
        return self

    def release(self) -> None:
        """Drop the lock and remove the lock file (a no-op when not held)."""
        if self._fd is None:
            return
        # Unlinked while still held: a run that opens the path after this gets a new file,
        # and the inode check in acquire() rejects a file unlinked under it.
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    # -- internals ----------------------------------------------------------------------------
    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.time()}).encode()

    def _refuse(self, owner: dict[str, Any]) -> RunLockedError:
        return RunLockedError(
            f"{self.folder} is in use by another run ({_describe(owner)}); wait for it to "
            f"finish or choose another --out (the lock is {self.path})"
        )

    def _acquire_flock(self) -> None:
        assert fcntl is not None
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # released and removed meanwhile: start over
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(_read(self.path)) from None
                if created:  # the fallback must not find our own empty file
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                raise _NoFlock from e
            # The holder may have released and unlinked the file between our open and our
            # flock: then we hold a lock on a file nobody else will see; try again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read(self.path)
            self.took_over = previous or None
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            os.fsync(fd)
            self._fd = fd
            return

    def _acquire_exclusive(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                pid = owner.get("pid")
                mine = owner.get("host") == socket.gethostname()
                if not (mine and isinstance(pid, int) and not _alive(pid)):
                    raise self._refuse(owner) from None
                self.took_over = owner
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            os.write(fd, self._record())
            os.fsync(fd)
            self._fd = fd
            return
        raise self._refuse(_read(self.path))


class _NoFlock(Exception):
    """flock is not supported on this filesystem."""


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]
