"""One run per output directory: a second run fails at once, a dead run's lock is taken over."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import run_cli

from sparse_adv_fast.pipeline import lock as lockmod
from sparse_adv_fast.pipeline import modelio
from sparse_adv_fast.pipeline.commands import run_dir
from sparse_adv_fast.pipeline.lock import RunLock, RunLockedError

pytestmark = pytest.mark.usefixtures("torch_backend")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / lockmod.LOCK_NAME).write_text(
        json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time()}))


# ---- the lock itself ------------------------------------------------------------------------
@pytest.fixture(params=["flock", "exclusive-create"])
def mechanism(request, monkeypatch):
    """Both ways the lock works: flock, and the O_EXCL + pid-liveness fallback used where
    the filesystem refuses flock (simulated by flock raising ENOLCK)."""
    if request.param == "exclusive-create":
        def no_flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(lockmod.fcntl, "flock", no_flock)
    return request.param


def test_second_holder_is_refused_at_once_naming_the_first(tmp_path, mechanism):
    with RunLock(tmp_path / "run"):
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path / "run").acquire()
        assert time.perf_counter() - t0 < 1.0  # never waits
    msg = str(e.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and "choose another --out" in msg
    assert "\n" not in msg
    # released: the next run gets it, and the lock file is gone after release
    with RunLock(tmp_path / "run"):
        pass
    assert not (tmp_path / "run" / lockmod.LOCK_NAME).exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, mechanism):
    folder = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(folder, dead)
    notes: list[str] = []
    with RunLock(folder, log=notes.append) as lk:
        assert lk.took_over["pid"] == dead
        owner = json.loads((folder / lockmod.LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert len(notes) == 1 and f"pid {dead}" in notes[0] and "no longer running" in notes[0]


def test_fallback_refuses_a_live_pid_and_another_hosts_lock(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lockmod.fcntl, "flock", no_flock)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "a", live.pid)
        with pytest.raises(RunLockedError, match=f"pid {live.pid}"):
            RunLock(tmp_path / "a").acquire()
    finally:
        live.kill()
        live.wait()
    # a pid on another host cannot be checked from here: never taken over
    _write_lock(tmp_path / "b", _dead_pid(), host="some-other-host")
    with pytest.raises(RunLockedError, match="some-other-host"):
        RunLock(tmp_path / "b").acquire()


def test_lock_held_by_a_killed_process_is_freed(tmp_path):
    """A real second process holds the lock; while it lives we are refused; SIGKILL (no
    cleanup runs) leaves the file behind, and the next run takes it over."""
    folder = tmp_path / "run"
    code = textwrap.dedent(f"""
        import sys, time
        from sparse_adv_fast.pipeline.lock import RunLock
        RunLock({str(folder)!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / lockmod.LOCK_NAME).exists()  # stale
    with RunLock(folder, log=lambda m: None) as lk:
        assert lk.took_over["pid"] == holder.pid


# ---- commands honour it -----------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["demo", "study"])
def test_a_study_into_a_locked_dir_fails_at_once_and_fresh_deletes_nothing(tmp_path, capsys,
                                                                           cmd):
    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "run.json").write_text("{}")
    (out / "stages" / "start.s0.w1.pt").write_bytes(b"a finished job of the running study")
    with RunLock(out):
        for extra in ([], ["--fresh"]):
            t0 = time.perf_counter()
            rc, _, err = run_cli(capsys, cmd, "--quick", "--out", str(out), "--no-progress",
                                 *extra)
            assert time.perf_counter() - t0 < 10  # refused before any training
            assert rc == 1 and len(err.strip().splitlines()) == 1
            assert "is in use by another run" in err and f"pid {os.getpid()}" in err
    assert (out / "stages" / "start.s0.w1.pt").read_bytes() == (
        b"a finished job of the running study")
    assert sorted(p.name for p in out.rglob("*")) == ["run.json", "stages", "start.s0.w1.pt"]


def test_train_into_a_locked_out_fails_at_once(tmp_path, capsys):
    out = tmp_path / "m.pt"
    with RunLock(run_dir(out)):
        rc, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", str(out), "--no-progress")
    assert rc == 1 and "is in use by another run" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


KILL_AFTER_EPOCH_1 = textwrap.dedent("""
    import sys, time
    import sparse_adv_fast.train as t
    real = t.fit
    def fit(*a, **k):
        def hold(epoch, history):
            if epoch == 1:  # epoch 1 is checkpointed: announce it, wait to be killed
                print("epoch1", flush=True)
                time.sleep(120)
        k["callback"] = hold
        return real(*a, **k)
    t.fit = fit
    from sparse_adv_fast import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_sigkilled_train_is_resumed_by_the_next_run_to_the_same_weights(tmp_path, capsys):
    argv = ["train", "--method", "pgd", "--steps", "1", "--epochs", "2", "--batch-size", "256",
            "--no-progress"]
    killed, straight = tmp_path / "k.pt", tmp_path / "s.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_AFTER_EPOCH_1, *argv, "--out", str(killed)],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "SPARSE_ADV_FAST_BACKEND": "torch"},
    )
    try:
        assert proc.stdout.readline().strip() == "epoch1"
        # while it runs, a second train into the same --out is refused
        rc, _, err = run_cli(capsys, *argv, "--out", str(killed))
        assert rc == 1 and f"pid {proc.pid}" in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not killed.exists()
    assert (run_dir(killed) / lockmod.LOCK_NAME).exists()  # left behind by the killed run

    rc, _, err = run_cli(capsys, *argv, "--out", str(killed))
    assert rc == 0, err
    assert "took over the lock" in err and "resuming the interrupted run" in err
    assert run_cli(capsys, *argv, "--out", str(straight))[0] == 0
    a = modelio.load_model(killed)[0].state_dict()
    b = modelio.load_model(straight)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
