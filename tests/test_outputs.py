"""No lost work: output paths are checked before any work, and a failed write keeps the
earlier file (one-line errors)."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import run_cli

import sparse_adv_fast as saf
from sparse_adv_fast import checkpoint
from sparse_adv_fast.pipeline import commands, modelio, outputs
from sparse_adv_fast.pipeline.commands import run_dir
from sparse_adv_fast.pipeline.outputs import OutputPathError, check_output_dir, check_output_file

pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture
def model_file(tmp_path):
    arch = modelio.arch_spec("small_cnn", "digits", 1)
    path = tmp_path / "m.pt"
    modelio.save_model(modelio.build(arch), arch, path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any training or evaluation starts."""
    def started(*a, **k):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(saf.train, "fit", started)
    monkeypatch.setattr(saf.train, "evaluate", started)


@pytest.fixture
def unwritable(monkeypatch):
    """Creating files fails with EACCES (tests may run as root, where chmod does not bite)."""
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)


def _one_line_error(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err


# ---- the checks -------------------------------------------------------------------------------
def test_output_file_checks(tmp_path, model_file, unwritable):
    with pytest.raises(OutputPathError, match="is a directory; give a file name"):
        check_output_file(tmp_path)
    with pytest.raises(OutputPathError, match="folder .*nope.* does not exist"):
        check_output_file(tmp_path / "nope" / "x.pt")
    with pytest.raises(OutputPathError, match="is not a folder"):
        check_output_file(model_file / "x.pt")
    with pytest.raises(OutputPathError, match="--json .* is the input .*would destroy"):
        check_output_file(model_file, flag="--json", inputs=[None, model_file])
    with pytest.raises(OutputPathError, match="cannot create files in .*Permission denied"):
        check_output_file(tmp_path / "new.pt")


def test_an_input_reached_by_another_name_is_still_the_input(tmp_path, model_file,
                                                              monkeypatch):
    link = tmp_path / "link.pt"
    link.symlink_to(model_file)
    monkeypatch.chdir(tmp_path)
    for other in (link, "./m.pt", tmp_path / "sub" / ".." / "m.pt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(OutputPathError, match="is the input"):
            check_output_file(other, inputs=[model_file])
    assert check_output_file(tmp_path / "other.pt", inputs=[model_file]).name == "other.pt"


def test_output_dir_checks(tmp_path, model_file, unwritable):
    with pytest.raises(OutputPathError, match="exists and is not a directory"):
        check_output_dir(model_file)
    with pytest.raises(OutputPathError, match="cannot create files"):
        check_output_dir(tmp_path / "a" / "b")


def test_the_probe_leaves_nothing_behind(tmp_path):
    check_output_file(tmp_path / "x.pt")
    check_output_dir(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []


# ---- the commands check before any work ---------------------------------------------------------
def test_eval_json_onto_the_model_is_refused_and_the_model_kept(capsys, model_file, no_work):
    before = model_file.read_bytes()
    rc, _, err = run_cli(capsys, "eval", model_file, "--json", model_file)
    assert rc == 2 and _one_line_error(err) and "is the input" in err
    assert model_file.read_bytes() == before


@pytest.mark.parametrize("cmd", [["prune"], ["iwi"], ["prune", "--method", "imp"]])
def test_prune_and_iwi_onto_their_input_are_refused(capsys, model_file, no_work, cmd):
    before = model_file.read_bytes()
    rc, _, err = run_cli(capsys, cmd[0], model_file, *cmd[1:], "--out", model_file)
    assert rc == 2 and _one_line_error(err) and "--out" in err and "is the input" in err
    assert model_file.read_bytes() == before


@pytest.mark.parametrize("argv", [
    ["train", "--out", "{d}"],
    ["iwi", "{m}", "--out", "{d}"],
    ["eval", "{m}", "--json", "{d}"],
])
def test_a_directory_as_output_file_is_refused(capsys, tmp_path, model_file, no_work, argv):
    rc, _, err = run_cli(capsys, *[a.format(d=tmp_path, m=model_file) for a in argv])
    assert rc == 2 and _one_line_error(err) and "is a directory" in err


def test_unwritable_outputs_fail_before_any_work(capsys, tmp_path, model_file, no_work,
                                                 unwritable):
    for argv in (["train", "--out", tmp_path / "m2.pt"],
                 ["prune", model_file, "--method", "imp", "--out", tmp_path / "p.pt"],
                 ["eval", model_file, "--json", tmp_path / "r.json"],
                 ["demo", "--quick", "--out", tmp_path / "run"],
                 ["study", "--out", tmp_path / "run"]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and _one_line_error(err) and "cannot create files" in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_seed_out_of_range_writes_no_settings_file(capsys, tmp_path):
    for seed in ("-1", str(2**32), "1.5"):
        rc, _, err = run_cli(capsys, "demo", "--quick", "--seed", seed, "--out", tmp_path / "run")
        assert rc == 2 and _one_line_error(err) and "seed" in err
        rc, _, err = run_cli(capsys, "train", "--seed", seed, "--out", tmp_path / "m.pt")
        assert rc == 2 and "seed" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="seed"):
        commands.train(dataset="digits", model="small_cnn", width=1, method="natural",
                       epochs=1, eps=None, lr=0.1, steps=1, batch_size=64, seed=-3,
                       data_dir=None, out=str(tmp_path / "m.pt"))
    assert list(tmp_path.iterdir()) == []


# ---- a full disk keeps the earlier files ------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_at_eval_json_keeps_the_earlier_report(capsys, tmp_path, model_file,
                                                         monkeypatch):
    report = tmp_path / "r.json"
    report.write_text('{"earlier": true}\n')
    monkeypatch.setattr(checkpoint.os, "fsync", _enospc)
    rc, _, err = run_cli(capsys, "eval", model_file, "--attacks", "fgsm", "--max-batches", "1",
                         "--no-progress", "--json", report)
    assert rc == 1 and _one_line_error(err)
    assert f"cannot write {report}: No space left on device" in err
    assert report.read_text() == '{"earlier": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "r.json"]


def test_full_disk_at_the_final_save_keeps_the_earlier_model_and_therun_cli(capsys, tmp_path,
                                                                          model_file,
                                                                          monkeypatch):
    out = tmp_path / "t.pt"
    out.write_bytes(model_file.read_bytes())  # the result of an earlier run
    before = out.read_bytes()
    real_save = checkpoint.torch.save

    def save(obj, f, *a, **k):  # fit's epoch checkpoints succeed; the model file does not
        if isinstance(obj, dict) and obj.get("kind") == modelio.KIND:
            f.write(b"half a model")
            _enospc()
        return real_save(obj, f, *a, **k)

    argv = ["train", "--method", "natural", "--epochs", "1", "--batch-size", "256",
            "--no-progress", "--out", out]
    monkeypatch.setattr(checkpoint.torch, "save", save)
    rc, _, err = run_cli(capsys, *argv)
    monkeypatch.undo()
    saf.backends.use("torch")
    assert rc == 1 and _one_line_error(err)
    assert f"cannot write {out}: No space left on device; the earlier file is unchanged" in err
    assert out.read_bytes() == before
    assert (run_dir(out) / "stages" / "train.partial.pt").exists()  # the training is kept
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # space freed: the same command finishes from the kept run without training again
    fits = []
    real_fit = saf.train.fit
    monkeypatch.setattr(saf.train, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "resuming" in err and out.read_bytes() != before and not run_dir(out).exists()
    assert fits == [1]
    ckpt = modelio.load_model(out)[1]
    assert ckpt["meta"]["history"]["resumed_from_epoch"] == 1


def test_stage_results_and_plots_are_written_through_the_one_helper(tmp_path, monkeypatch):
    from sparse_adv_fast.pipeline import plots, study, study_report
    from sparse_adv_fast.pipeline.stages import StageRunner
    from sparse_adv_fast.pipeline.study_config import StudyConfig

    written = []
    real = checkpoint.write_atomic

    def spy(path, content):
        written.append(os.path.basename(path))
        return real(path, content)

    monkeypatch.setattr(checkpoint, "write_atomic", spy)
    monkeypatch.setattr(study_report, "write_atomic", spy)
    monkeypatch.setattr(plots, "write_atomic", spy)
    r = StageRunner(tmp_path, config={"a": 1}, log=lambda m: None)
    r.run("s1", lambda: 1)
    # A one-arm, one-seed study's results from made-up job summaries (nothing trained).
    cfg = StudyConfig(arms=("dense_at",), seeds=(0,), lr_grid={"at": (0.1,)})
    summary = {"arm": "dense_at", "seed": 0, "lr": 0.1, "steps": 30, "sparsity": 0.0,
               "val": {"worst_case": 0.5, "clean": 0.9}, "ledger": [{"phase": "x", "steps": 30}],
               "params": 10, "test": {"clean": 0.9, "worst_case": 0.5, "robust": {}, "n": 10}}
    res = study.aggregate(cfg, study.budget_plan(cfg, 3),
                          {study.train_key("dense_at", 0, 0.1): summary,
                           study.result_key("dense_at", 0): summary})
    study_report.write_all(res, tmp_path)
    assert written == ["run.json", "s1.pt", "results.json", "results.md", *study_report.PLOTS]
