"""Atomic checkpoint I/O: round trip, no partial files, clear errors on corrupt files."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from sparse_adv_fast import checkpoint
from sparse_adv_fast.checkpoint import CheckpointError


def _obj():
    return {"epoch": 3, "model": {"w": torch.arange(6.0).reshape(2, 3)},
            "rng": torch.get_rng_state(), "hist": [{"loss": 0.5, "acc": None}], "t": (1, "a")}


def test_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    assert checkpoint.save_atomic(_obj(), path) == path
    back = checkpoint.load(path)
    assert back["epoch"] == 3 and back["hist"] == [{"loss": 0.5, "acc": None}]
    assert torch.equal(back["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(back["rng"], torch.get_rng_state())
    checkpoint.save_atomic({"epoch": 4}, path)  # overwrite
    assert checkpoint.load(path) == {"epoch": 4}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic({"epoch": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - pickling error type is torch's business
        checkpoint.save_atomic({"epoch": 2, "bad": lambda: 0}, path)
    assert checkpoint.load(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_truncated_and_garbage_files_raise_checkpoint_error(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic(_obj(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoint.load(path)
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="ck.pt"):
        checkpoint.load(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoint.load(tmp_path / "nope.pt")


class _Custom:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic({"x": _Custom()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.load(path)
    assert isinstance(checkpoint.load(path, weights_only=False)["x"], _Custom)


# ---- write_atomic: the one atomic-write helper (text, bytes, torch objects, PNGs) ------------
def test_write_atomic_text_bytes_and_writer(tmp_path):
    p = tmp_path / "f"
    checkpoint.write_atomic(p, "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    checkpoint.write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    checkpoint.write_atomic(p, lambda f: f.write(b"from a writer"))
    assert p.read_bytes() == b"from a writer"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["f"]


def test_concurrent_writers_of_one_path_never_share_a_temp_file(tmp_path):
    # The inner write runs while the outer one has its temp file open: a fixed temp name
    # would make them clobber each other's half-written data.
    p = tmp_path / "results.json"

    def outer(f):
        f.write(b"outer-start ")
        checkpoint.write_atomic(p, "inner")
        assert p.read_text() == "inner"
        f.write(b"outer-end")

    checkpoint.write_atomic(p, outer)
    assert p.read_bytes() == b"outer-start outer-end"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["results.json"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["while writing", "at fsync"])
def test_full_disk_keeps_the_earlier_file_with_a_one_line_error(tmp_path, monkeypatch, where):
    p = tmp_path / "ck.pt"
    checkpoint.save_atomic({"epoch": 1}, p)
    before = p.read_bytes()
    if where == "at fsync":  # delayed allocation: a full disk often surfaces only here
        monkeypatch.setattr(checkpoint.os, "fsync", _enospc)
        write = lambda: checkpoint.save_atomic({"epoch": 2}, p)  # noqa: E731
    else:
        def half(f):
            f.write(b"half a checkpoint")
            _enospc()

        write = lambda: checkpoint.write_atomic(p, half)  # noqa: E731
    with pytest.raises(OSError) as e:
        write()
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "No space left on device" in msg
    assert "earlier file is unchanged" in msg
    monkeypatch.undo()
    assert p.read_bytes() == before and checkpoint.load(p) == {"epoch": 1}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ck.pt"]  # no temp file left


def test_written_files_get_normal_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    p = tmp_path / "new.json"
    checkpoint.write_atomic(p, "{}")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    p.chmod(0o640)
    checkpoint.write_atomic(p, "{}")
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # a replaced file keeps its mode


def test_loading_a_directory_says_so(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        checkpoint.load(tmp_path)
