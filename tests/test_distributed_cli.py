"""The CLI under torchrun (2 gloo CPU processes): a killed training run resumes to the
weights of an uninterrupted one, sharded ``eval`` equals the single-process ``eval``, and
bad input stops every rank with a one-line error and no output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sparse_adv_fast import backends

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")]

TRAIN = ("train", "--dataset", "digits", "--model", "mlp", "--method", "pgd", "--epochs",
         "3", "--steps", "2", "--batch-size", "64", "--no-progress")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SPARSE_ADV_FAST_BACKEND="torch")
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*argv: object, nproc: int = 2) -> list[str]:
    """The command line of ``torchrun --standalone --nproc_per_node=nproc -m
    sparse_adv_fast argv`` (single machine, a free rendezvous port chosen by torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "sparse_adv_fast", *map(str, argv)]


def _run(*argv: object, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(*argv, nproc=nproc), env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def test_killed_torchrun_training_resumes_to_the_uninterrupted_weights(tmp_path):
    straight = _run(*TRAIN, "--out", tmp_path / "straight.pt")
    assert straight.returncode == 0, straight.stderr
    assert straight.stdout.count("saved ") == 1  # rank 0 alone reports and writes
    cfg = json.loads((tmp_path / "straight.pt.config.json").read_text())
    assert cfg["world_size"] == 2

    out = tmp_path / "killed.pt"
    ckpt = tmp_path / "killed.pt.ckpt" / "stages" / "train.partial.pt"
    job = subprocess.Popen(torchrun(*TRAIN, "--out", out), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not ckpt.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.exists(), "no epoch checkpoint appeared"
        # The whole job dies at once, mid-run, as on a lost machine: torchrun starts each
        # rank in a session of its own, so the ranks are killed by pid.
        ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(job.pid)],
                               capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2
        for pid in [*ranks, job.pid]:
            os.kill(int(pid), signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    assert not out.exists()
    resumed = _run(*TRAIN, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run" in resumed.stderr
    a, b = _weights(tmp_path / "straight.pt"), _weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the resume"
    assert not (tmp_path / "killed.pt.ckpt").exists()  # cleaned up once written


def test_torchrun_eval_equals_single_process_eval(tmp_path, capsys):
    from conftest import run_cli

    model = tmp_path / "m.pt"
    with backends.using("torch"):
        rc, _, err = run_cli(capsys, "train", "--dataset", "digits", "--model", "mlp",
                             "--epochs", "1", "--steps", "2", "--out", model, "--no-progress")
        assert rc == 0, err
        # 10 batches of 36 test digits: ranks 0 and 1 take 5 each; the last batch is short
        ev = ("eval", model, "--attacks", "pgd3x2,fgsm", "--batch-size", "36",
              "--no-progress")
        rc, single, err = run_cli(capsys, *ev)
        assert rc == 0, err
    two = _run(*ev, "--json", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    a, b = json.loads(single), json.loads((tmp_path / "two.json").read_text())
    assert a == b
    assert a["n"] == 360 and 0 < a["worst_case"] < a["clean"]
    # More ranks than batches to evaluate: refused on every rank before any attack runs.
    res = _run(*ev, "--max-batches", "1", "--json", tmp_path / "one.json")
    assert res.returncode != 0, res.stderr  # torchrun's own status; each rank exits with 2
    for rank in (0, 1):
        assert f"[rank {rank}/2] error: evaluate: 1 batch(es) cannot be shared by 2 ranks" \
            in res.stderr
    assert not (tmp_path / "one.json").exists()


def test_bad_input_under_torchrun_stops_every_rank_in_one_line(tmp_path):
    out = tmp_path / "m.pt"
    res = _run(*TRAIN[:-3], "--batch-size", "63", "--out", out, timeout=120)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    for rank in (0, 1):
        assert any(f"[rank {rank}/2] error: fit: the global batch size 63 does not split "
                   "evenly over 2 ranks" in ln for ln in lines), res.stderr
    assert not out.exists()


def test_missing_rendezvous_is_a_one_line_error(tmp_path):
    env = dict(_env(), WORLD_SIZE="2", RANK="0")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    res = subprocess.run([sys.executable, "-m", "sparse_adv_fast", *TRAIN, "--out",
                          tmp_path / "m.pt"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(
        "sparse-adv-fast train: error: WORLD_SIZE=2 asks for a distributed run but "
        "MASTER_ADDR and MASTER_PORT (the rendezvous endpoint) is not set")
    assert not (tmp_path / "m.pt").exists()


def test_torchrun_study_writes_the_single_process_results(tmp_path):
    from test_study import TINY

    from sparse_adv_fast.pipeline import study
    from sparse_adv_fast.pipeline.study_config import StudyConfig

    cfg = {**TINY, "arms": ("dense_at", "imp")}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    two = _run("study", tmp_path / "tiny.json", "--out", tmp_path / "two", "--no-progress")
    assert two.returncode == 0, two.stderr
    timing = json.loads((tmp_path / "two" / "timing.json").read_text())
    assert timing["ranks"] == 2 and timing["jobs_ran"]
    with backends.using("torch"):
        study.run_study(StudyConfig(**cfg), tmp_path / "one", progress=False)
    assert (tmp_path / "two" / "results.json").read_text() == \
        (tmp_path / "one" / "results.json").read_text()
