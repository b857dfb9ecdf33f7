"""One-line errors with consistent exit statuses (2: what the user gave is wrong; 1: running
failed), non-finite models refused, divergence reported with the last good checkpoint kept,
and the pytest command line ``bench`` builds."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import run_cli

import sparse_adv_fast as saf
from sparse_adv_fast import checkpoint, cli
from sparse_adv_fast.finite import first_nonfinite
from sparse_adv_fast.pipeline import commands, modelio
from sparse_adv_fast.pipeline.commands import run_dir

pytestmark = pytest.mark.usefixtures("torch_backend")


def _one_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in err


ARCH = modelio.arch_spec("small_cnn", "digits", 1)


@pytest.fixture
def nan_model(tmp_path):
    """A model checkpoint whose third tensor (not the first) holds a NaN."""
    net = modelio.build(ARCH)
    name = [k for k, v in net.state_dict().items() if v.is_floating_point()][2]
    with torch.no_grad():
        net.state_dict()[name].view(-1)[0] = float("nan")
    path = tmp_path / "nan.pt"
    modelio.save_model(net, ARCH, path)
    return path, name


# ---- non-finite models --------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["eval", "{m}", "--attacks", "fgsm", "--max-batches", "1", "--no-progress"],
    ["prune", "{m}", "--sparsity", "0.5", "--out", "{o}"],
    ["prune", "{m}", "--method", "imp", "--out", "{o}"],
    ["iwi", "{m}", "--mode", "widen", "--out", "{o}"],
])
def test_a_nan_checkpoint_is_refused_naming_the_file_and_tensor(capsys, tmp_path, nan_model,
                                                                argv, monkeypatch):
    path, name = nan_model

    def started(*a, **k):
        raise AssertionError("work started on a NaN model")

    monkeypatch.setattr(saf.train, "evaluate", started)
    monkeypatch.setattr(saf.train, "fit", started)
    out = tmp_path / "out.pt"
    rc, stdout, err = run_cli(capsys, *[a.format(m=path, o=out) for a in argv])
    assert rc == 2 and _one_line(err) and stdout == ""
    assert str(path) in err and name in err and "non-finite" in err
    assert not out.exists() and not run_dir(out).exists()


def test_divergence_is_one_line_naming_the_output_and_the_bad_tensor(capsys, tmp_path):
    out = tmp_path / "m.pt"
    rc, _, err = run_cli(capsys, "train", "--method", "natural", "--epochs", "1", "--lr", "1e6",
                         "--batch-size", "64", "--no-progress", "--out", out)
    assert rc == 1 and _one_line(err)
    assert str(out) in err and "diverged" in err and "--lr" in err
    assert ".weight" in err or ".bias" in err  # the first non-finite tensor is named
    assert not out.exists()


@pytest.mark.slow
def test_divergence_keeps_the_last_good_epoch_and_the_run_resumes_from_it(capsys, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "m.pt"
    argv = ["train", "--method", "natural", "--epochs", "2", "--batch-size", "256",
            "--no-progress", "--out", out]
    real = saf.train.fit

    def poisoned(model, loaders, **kw):
        def poison(epoch, history):  # after epoch 1 is checkpointed, weights go NaN
            if epoch == 1:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

        return real(model, loaders, **dict(kw, callback=poison))

    monkeypatch.setattr(saf.train, "fit", poisoned)
    rc, _, err = run_cli(capsys, *argv)
    kept = run_dir(out) / "stages" / "train.partial.pt"
    assert rc == 1 and _one_line(err) and "diverged" in err
    assert f"the last finished epoch is kept in {kept}" in err
    saved = checkpoint.load(kept)
    assert saved["epoch"] == 1 and first_nonfinite(saved["model"]) is None
    assert not out.exists()

    monkeypatch.setattr(saf.train, "fit", real)  # e.g. the cause fixed: resume epoch 2
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    net, blob = modelio.load_model(out)
    assert first_nonfinite(net) is None and blob["meta"]["history"]["resumed_from_epoch"] == 1


# ---- malformed inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("arch, words", [
    ({"dataset": "digits", "width": 1, "masked": False}, "name"),
    ({"name": 3, "dataset": "digits", "width": 1, "masked": False}, "name"),
    ({"name": "small_cnn", "dataset": "digits", "width": "wide", "masked": False}, "width"),
    ({"name": "small_cnn", "dataset": "digits", "width": 1e9, "masked": False}, "width"),
    ("small_cnn", "arch"),
])
def test_a_checkpoint_with_a_bad_arch_is_a_one_line_usage_error(capsys, tmp_path, arch, words):
    path = tmp_path / "bad.pt"
    checkpoint.save_atomic({"kind": modelio.KIND, "arch": arch,
                            "state_dict": modelio.build(ARCH).state_dict(), "meta": {}}, path)
    for argv in (["eval", path, "--attacks", "fgsm"], ["prune", path, "--out", tmp_path / "p"]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and _one_line(err) and words in err, err
        assert str(path) in err


def test_garbage_and_missing_checkpoints_are_usage_errors(capsys, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    rc, _, err = run_cli(capsys, "eval", junk)
    assert rc == 2 and _one_line(err) and "junk.pt" in err and "cannot be loaded" in err
    rc, _, err = run_cli(capsys, "eval", tmp_path / "absent.pt")
    assert rc == 2 and _one_line(err) and "does not exist" in err


@pytest.mark.parametrize("cmd", [["eval"], ["prune", "--out", "p.pt"], ["iwi", "--out", "w.pt"]])
def test_a_directory_given_as_checkpoint_says_so(capsys, tmp_path, cmd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    rc, _, err = run_cli(capsys, cmd[0], "models", *cmd[1:])
    assert rc == 2 and _one_line(err) and "'models' is a directory" in err


def test_a_file_given_as_data_dir_says_so(capsys, tmp_path):
    f = tmp_path / "cifar.tar"
    f.write_bytes(b"x")
    rc, _, err = run_cli(capsys, "train", "--dataset", "cifar10", "--data-dir", f,
                         "--out", tmp_path / "m.pt")
    assert rc == 2 and _one_line(err) and "is a file, not a directory" in err


@pytest.mark.parametrize("argv, words", [
    (["train", "--width", "1e9"], "width must be a number in (0, 16]"),
    (["train", "--width", "0"], "width must be a number in (0, 16]"),
    (["train", "--width", "nan"], "width must be a number in (0, 16]"),
    (["train", "--width", "wide"], "expected a number, got 'wide'"),
    (["iwi", "m.pt", "--mode", "widen", "--width", "100"], "width must be a number in (0, 16]"),
    (["train", "--seed", "-1"], "seed must be an integer in [0, 2**32)"),
    (["demo", "--seed", str(2**32)], "seed must be an integer in [0, 2**32)"),
    (["prune", "m.pt", "--seed", "x"], "expected an integer, got 'x'"),
])
def test_absurd_width_and_seed_are_refused_at_parse_time(capsys, tmp_path, monkeypatch, argv,
                                                         words):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and _one_line(err) and words in err
    assert list(tmp_path.iterdir()) == []  # no settings file, no run directory


def test_interrupting_a_command_that_cannot_resume_does_not_promise_it(capsys, tmp_path,
                                                                        monkeypatch):
    arch = ARCH
    path = tmp_path / "m.pt"
    modelio.save_model(modelio.build(arch), arch, path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(saf.train, "evaluate", interrupted)
    rc, _, err = run_cli(capsys, "eval", path)
    assert rc == 130 and err.strip() == "sparse-adv-fast eval: interrupted"


# ---- bench: the pytest command line --------------------------------------------------------
@pytest.fixture
def bench_tree(tmp_path, monkeypatch):
    """A source tree with two benchmark files; subprocess calls recorded, not run."""
    bdir = tmp_path / "benchmarks"
    bdir.mkdir()
    for name in ("bench_masked_ops.py", "bench_end_to_end.py", "report.py"):
        (bdir / name).write_text("")
    monkeypatch.setattr(commands, "SOURCE_ROOT", tmp_path)
    calls = []
    monkeypatch.setattr(commands.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    return bdir, calls


def _pytest_args(calls, bdir):
    cmd = calls[0]
    assert cmd[:3] == [sys.executable, "-m", "pytest"] and "--benchmark-only" in cmd
    assert calls[1][1] == str(bdir / "report.py")  # then the ratio table
    return cmd[3:]


@pytest.mark.parametrize("argv, target, expect", [
    (["-k", "masked_linear"], "", ["-k", "masked_linear"]),
    (["--quick"], "", ["-m", "quick"]),
    (["--suite", "end_to_end"], "bench_end_to_end.py", []),
    (["--quick", "--suite", "end_to_end", "-k", "fwd", "--", "-x"], "bench_end_to_end.py",
     ["-m", "quick", "-k", "fwd", "-x"]),
])
def test_bench_passes_selection_flags_to_pytest(capsys, tmp_path, bench_tree, argv, target,
                                                expect):
    bdir, calls = bench_tree
    json_out = tmp_path / "b.json"
    rc, _, err = run_cli(capsys, "bench", "--json", json_out, *argv)
    assert rc == 0, err
    args = _pytest_args(calls, bdir)
    assert args[0] == str(bdir / target) if target else args[0] == str(bdir)
    assert f"--benchmark-json={json_out.resolve()}" in args
    rest = [a for a in args[1:] if a != "--benchmark-only" and not a.startswith("--benchmark-json")]
    assert rest == expect


def test_bench_unknown_suite_lists_the_suites(capsys, tmp_path, bench_tree):
    _, calls = bench_tree
    for bad in ("nope", "../x"):
        rc, _, err = run_cli(capsys, "bench", "--json", tmp_path / "b.json", "--suite", bad)
        assert rc == 2 and _one_line(err) and "end_to_end, masked_ops" in err
    assert calls == []


def test_an_unexpected_exception_is_one_line_and_debug_shows_it(capsys, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    modelio.save_model(modelio.build(ARCH), ARCH, path)

    def bug(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(saf.train, "evaluate", bug)
    rc, _, err = run_cli(capsys, "eval", path)
    assert rc == 1 and _one_line(err) and "internal error: KeyError: 'oops'" in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "eval", str(path)])
