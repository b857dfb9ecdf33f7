"""``sparse-adv-fast study`` and ``demo`` (the study's small default) on the command line:
the config each resolves to, errors before any work, the printed table and verdicts,
resuming, interruption, and the shipped config files.

Resume identity at a job boundary and mid-job is tested on the library in
``tests/test_study.py`` (``test_rerun_after_deleting_jobs_is_identical``,
``test_a_job_killed_mid_training_resumes_to_the_same_result``); here the CLI's side of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

import sparse_adv_fast as saf
from sparse_adv_fast import cli
from sparse_adv_fast.pipeline import study
from sparse_adv_fast.pipeline import study_config as sc

pytestmark = pytest.mark.usefixtures("torch_backend")

ROOT = Path(__file__).resolve().parents[1]

# On top of --quick: two arms, one seed, 4 steps per epoch, 2-step attacks, 40 test images,
# in this process (workers=1): a few seconds per run.
TINY = ["arms=dense_at,imp", "train_subset=200", "batch_size=64", "val_size=40",
        "test_subset=40", "train_steps=1", "val_attacks=pgd2", "eval_attacks=pgd2", "workers=1"]


def _config(*argv):
    """The StudyConfig that ``sparse-adv-fast *argv`` would run (nothing is run)."""
    return cli._study_config(cli.parse_args([str(a) for a in argv]))


def _one_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in err


# ---- the shipped files are the defaults -----------------------------------------------------
def test_default_json_spells_out_every_default():
    # configs/ is not installed with the package: the CLI without CONFIG uses the dataclass
    # defaults, so the file a user copies must hold exactly those, every key written out.
    text = json.loads((ROOT / "configs/study/default.json").read_text())
    assert list(text) == list(sc.StudyConfig.keys())
    assert text == sc.StudyConfig().as_dict()
    assert json.loads((ROOT / "configs/study/quick.json").read_text()) == {"quick": True}


# ---- what each command line resolves to -----------------------------------------------------
def test_demo_is_the_study_with_the_default_config():
    default = sc.StudyConfig()
    assert _config("demo") == _config("study") == default
    assert _config("study", ROOT / "configs/study/default.json") == default
    assert _config("demo", "--quick") == _config("study", "--quick") == sc.load(quick=True)
    assert _config("study", ROOT / "configs/study/quick.json") == sc.load(quick=True)
    assert default.dataset == "digits" and len(default.seeds) >= 3


def test_demo_flags_are_shorthands_for_config_keys(tmp_path):
    c = _config("demo", "--seed", "5", "--dataset", "mnist", "--data-dir", tmp_path,
                "--eps", "0.2", "--method", "trades")
    assert c.seeds == (5, 6, 7) and c.dataset == "mnist" and c.data_dir == str(tmp_path)
    assert c.eps == 0.2 and c.method == "trades"
    assert _config("demo", "--quick", "--seed", "5").seeds == (5,)  # quick: one seed
    # key=value wins over a shorthand; --seed shifts whatever seed list the config has.
    assert _config("demo", "--method", "trades", "method=fgsm_rs").method == "fgsm_rs"
    assert _config("demo", "--seed", "4", "seeds=0,1").seeds == (4, 5)


def test_config_file_and_overrides_in_any_order(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"seeds": [3, 4, 5], "train_steps": 7}))
    want = sc.load(f, ["train_steps=5", "lr_grid.at=0.05,0.2"], quick=True)
    for argv in ([f, "--quick", "train_steps=5", "lr_grid.at=0.05,0.2"],
                 ["train_steps=5", "--quick", f, "lr_grid.at=0.05,0.2"],
                 ["--quick", "train_steps=5", "lr_grid.at=0.05,0.2", f]):
        assert _config("study", *argv) == want, argv
    # defaults < file < --quick < key=value
    assert want.seeds == sc.QUICK["seeds"] and want.train_steps == 5
    assert want.lr_grid == {"at": (0.05, 0.2), "finetune": (0.05,)}


# ---- bad input: one line, exit 2, nothing written --------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["study", "epochs=3"], "unknown config key 'epochs'; did you mean 'start_epochs'?"),
    (["study", "arms=dense_at,bogus"], "unknown arm 'bogus'"),
    (["study", "imp_rounds=2", "sparsity=0.8"], "unreachable pruning schedule"),
    (["study", "iwi_ticket_source=dense_at"], "incompatible IWI pair"),
    (["study", "a.json", "b.json"], "more than one CONFIG given ('a.json', 'b.json')"),
    (["study", "missing.json"], "missing.json"),
    (["demo", "s.json"], "demo takes no CONFIG (it is the default study), got 's.json'"),
    (["demo", "--seed", str(2**32 - 1)], "seeds must be a non-empty list of ints"),
    (["demo", "--dataset", "mnist", "--data-dir", "nope"], "'nope' for mnist does not exist"),
    (["study", "dataset=cifar10", "data_dir=nope"], "'nope' for cifar10 does not exist"),
    (["demo", "--eps", "2"], "eps must be in [0, 1]"),  # inputs live in [0, 1]
    (["study", "eps=2"], "config: eps must be in [0, 1]"),
    (["demo", "--sparsities", "0.5"], "unrecognized arguments: --sparsities"),
])
def test_bad_input_exits_2_before_any_work(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, *argv, "--out", tmp_path / "run")
    assert rc == 2 and _one_line(err) and words in err, err
    assert out == "" and list(tmp_path.iterdir()) == []


# ---- a run: table, verdicts, files; rerun, corrupt job, other settings, --fresh ---------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny study through the CLI: a config file, then --quick, then overrides."""
    base = tmp_path_factory.mktemp("cli_study")
    cfg = base / "tiny.json"
    cfg.write_text(json.dumps({"seeds": [0], "start_epochs": 1}))
    out = base / "run"
    argv = [str(cfg), "--quick", "--out", str(out), "--no-progress", *TINY]
    with saf.backends.using("torch"):
        rc = cli.main(["study", *argv])
    assert rc == 0
    return out, argv


def test_a_run_prints_the_table_and_verdicts_and_writes_its_files(run, capsys, tmp_path):
    out, argv = run
    res = json.loads((out / "results.json").read_text())
    assert list(res["arms"]) == ["dense_at", "imp"] and res["seeds"] == [0]
    assert res["config"]["quick"] is True and res["config"]["train_steps"] == 1
    for name in study.OUTPUTS:
        assert (out / name).is_file(), name
    # What the command prints is the report of this results.json (rerun: nothing retrained).
    rc, printed, err = run_cli(capsys, "study", *argv)
    assert rc == 0 and err == ""
    assert json.loads((out / "timing.json").read_text())["jobs_ran"] == []
    lines = printed.splitlines()
    assert lines[0].startswith("| arm | lr | sparsity % | clean % | robust (worst case) %")
    assert any(line.startswith("| dense AT (`dense_at`) |") for line in lines)
    assert any(line.startswith("| IMP, rewind to k") for line in lines)
    for claim in res["claims"]:
        assert f"**Claim {claim['id']}: {claim['text']}.** Verdict: **{claim['verdict']}**." \
            in printed
    assert lines[-1] == (f"wrote {', '.join(study.OUTPUTS)} and stages/ (one file per job) "
                         f"in {out}")


def test_a_corrupt_job_file_is_one_line_naming_it(run, capsys, tmp_path):
    out, argv = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    bad = copy / "stages" / "result.imp.s0.pt"
    bad.write_bytes(b"not a checkpoint")
    argv = [a if a != str(out) else str(copy) for a in argv]
    rc, _, err = run_cli(capsys, "study", *argv)
    assert rc == 1 and _one_line(err)
    assert "result.imp.s0.pt is corrupt" in err and err.startswith("sparse-adv-fast study:")


def test_other_settings_are_refused_and_fresh_starts_over(run, capsys, tmp_path):
    out, argv = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    argv = [a if a != str(out) else str(copy) for a in argv]
    rc, _, err = run_cli(capsys, "study", *argv, "train_steps=2")
    assert rc == 1 and _one_line(err) and "other settings" in err
    rc, _, err = run_cli(capsys, "study", *argv, "train_steps=2", "--fresh")
    assert rc == 0, err
    timing = json.loads((copy / "timing.json").read_text())
    assert timing["jobs_skipped"] == [] and "result.imp.s0" in timing["jobs_ran"]
    assert json.loads((copy / "results.json").read_text())["config"]["train_steps"] == 2


def test_an_interrupted_run_exits_130_and_the_same_command_resumes_it(run, capsys, tmp_path,
                                                                      monkeypatch):
    out, argv = run
    here = tmp_path / "run"
    argv = [a if a != str(out) else str(here) for a in argv]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # every training job done, then Ctrl-C
        m.setitem(study.JOBS, "result", interrupted)
        rc, _, err = run_cli(capsys, "study", *argv)
    assert rc == 130
    assert err.strip() == "sparse-adv-fast study: interrupted; rerun the same command to resume"
    assert not (here / "results.json").exists() and not (here / "run.lock").exists()
    rc, _, err = run_cli(capsys, "study", *argv)
    assert rc == 0, err
    timing = json.loads((here / "timing.json").read_text())
    assert sorted(timing["jobs_ran"]) == ["result.dense_at.s0", "result.imp.s0"]
    assert (here / "results.json").read_text() == (out / "results.json").read_text()


def test_the_demo_runs_the_study(capsys, tmp_path):
    out = tmp_path / "demo"
    rc, printed, _ = run_cli(capsys, "demo", "--quick", "--seed", "3", "--out", out,
                             "--no-progress", *TINY)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [3] and res["config"]["dataset"] == "digits"
    assert "| dense AT (`dense_at`) |" in printed and "**Claim 1:" in printed
