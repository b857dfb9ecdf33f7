"""Output paths are checked before any work: a run must not train for an hour and then find
it cannot write its result, and an output must never overwrite one of the run's inputs.

:func:`check_output_file` (``--out`` of train / prune / iwi, ``--json``) and
:func:`check_output_dir` (``demo --out``) raise :class:`OutputPathError` (a ``ValueError``:
the command line reports it as a usage error, exit status 2) with a message naming the flag.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot or must not be written."""


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links, symlinks, `./x` vs `x`
    except OSError:
        return a.resolve() == b.resolve()


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the one honest test that writing works there
    (``os.access`` ignores read-only mounts, ACLs and full quotas)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".saf-write-test.")
    except OSError as e:
        raise OutputPathError(
            f"{what}: cannot create files in {str(folder)!r} ({e.strerror or e})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def check_output_file(
    path: str | os.PathLike[str], *, flag: str = "--out",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """``path`` as a ``Path`` if a file can be written there; else :class:`OutputPathError`.

    Refused: an existing directory, a missing or non-directory parent folder, a folder
    where files cannot be created, and a path that is one of ``inputs`` (a ``None`` input
    is skipped).
    """
    out = Path(path)
    what = f"{flag} {os.fspath(path)!r}"
    if out.is_dir():
        raise OutputPathError(f"{what} is a directory; give a file name")
    parent = out.parent
    if not parent.exists():
        raise OutputPathError(f"{what}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise OutputPathError(f"{what}: {str(parent)!r} is not a folder")
    for inp in inputs:
        if inp is not None and Path(inp).exists() and _same(out, Path(inp)):
            raise OutputPathError(
                f"{what} is the input {os.fspath(inp)!r}: writing it would destroy the input; "
                "choose another name"
            )
    _probe(parent, what)
    return out


def check_output_dir(path: str | os.PathLike[str], *, flag: str = "--out") -> Path:
    """``path`` as a ``Path`` if it is (or can be created as) a writable folder."""
    out = Path(path)
    what = f"{flag} {os.fspath(path)!r}"
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{what} exists and is not a directory; give a folder name")
    probe = out
    while not probe.exists():  # the nearest existing folder is where mkdir will write
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{what}: {str(probe)!r} is not a folder")
    _probe(probe, what)
    return out


__all__ = ["OutputPathError", "check_output_dir", "check_output_file"]
