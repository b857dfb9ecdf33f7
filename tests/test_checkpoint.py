"""Atomic checkpoint I/O: round trip, no partial files, clear errors on corrupt files."""

from __future__ import annotations

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
