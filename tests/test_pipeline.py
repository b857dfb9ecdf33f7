"""The resumable stage runner, model checkpoints, per-stage seeds, and the training commands
killed and resumed. (The study's own resume identity, at a job boundary and mid-job, is in
``tests/test_study.py``; its command line in ``tests/test_cli_study.py``.)"""

from __future__ import annotations

import pytest
import torch

import sparse_adv_fast as saf
from sparse_adv_fast import cli
from sparse_adv_fast.pipeline import modelio
from sparse_adv_fast.pipeline.stages import StageError, StageRunner

pytestmark = pytest.mark.usefixtures("torch_backend")


# ---- stage runner ---------------------------------------------------------------------------
class Counter:
    def __init__(self, value):
        self.calls = 0
        self.value = value

    def __call__(self):
        self.calls += 1
        return self.value


def _runner(tmp_path, logs=None, **kw):
    log = (lambda m: None) if logs is None else logs.append
    return StageRunner(tmp_path, config=kw.pop("config", {"a": 1}), log=log, **kw)


def test_stage_runs_once_and_is_loaded_on_rerun(tmp_path):
    fn = Counter({"x": torch.arange(3), "v": 1.5})
    r1 = _runner(tmp_path)
    assert r1.run("s1", fn)["v"] == 1.5
    logs: list[str] = []
    r2 = _runner(tmp_path, logs)
    out = r2.run("s1", fn)
    assert fn.calls == 1
    assert torch.equal(out["x"], torch.arange(3))
    assert r2.skipped == ["s1"] and r2.ran == []
    assert any("s1" in m and "skipped" in m for m in logs)


def test_fresh_discards_finished_stages_but_not_other_files(tmp_path):
    fn = Counter(1)
    _runner(tmp_path).run("s1", fn)
    (tmp_path / "notes.txt").write_text("mine")
    r = _runner(tmp_path, fresh=True)
    assert not r.done("s1")
    r.run("s1", fn)
    assert fn.calls == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_stage_saves_nothing_and_reruns(tmp_path):
    r = _runner(tmp_path)

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        r.run("s1", boom)
    assert not r.done("s1")
    assert not [p for p in r.stage_dir.iterdir() if p.name.startswith(".")]  # no temp left


def test_corrupt_stage_file_is_a_clear_error_naming_it(tmp_path):
    r = _runner(tmp_path)
    r.run("s1", Counter(1))
    path = r.path("s1")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(StageError, match=r"stage file .*s1\.pt is corrupt.*--fresh"):
        _runner(tmp_path).run("s1", Counter(2))


def test_foreign_file_under_a_stage_name_is_rejected(tmp_path):
    r = _runner(tmp_path)
    from sparse_adv_fast import checkpoint as saf_ckpt
    saf_ckpt.save_atomic({"stage": "other", "result": 1}, r.path("s1"))
    with pytest.raises(StageError, match="not a result of stage 's1'"):
        r.run("s1", Counter(2))


def test_other_settings_in_the_same_dir_are_refused(tmp_path):
    _runner(tmp_path, config={"epochs": 3}).run("s1", Counter(1))
    with pytest.raises(StageError, match=r"other settings \(epochs: 3 -> 4\).*--fresh"):
        _runner(tmp_path, config={"epochs": 4})
    assert _runner(tmp_path, config={"epochs": 4}, fresh=True).ran == []


def test_bad_stage_names_and_config_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="config must be a dict"):
        StageRunner(tmp_path, config=[1])
    r = _runner(tmp_path)
    with pytest.raises(ValueError, match="stage name"):
        r.run("../evil", Counter(1))


def test_out_path_that_is_a_file_is_an_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StageError, match="not a directory"):
        StageRunner(f, config={})


# ---- model checkpoints ----------------------------------------------------------------------
def test_model_checkpoint_round_trip_keeps_masks_and_arch(tmp_path):
    arch = modelio.arch_spec("small_cnn", "digits", 1)
    net = saf.sparsify(modelio.build(arch))
    saf.prune.magnitude(net, 0.7)
    modelio.save_model(net, arch, tmp_path / "m.pt", note="x")
    back, blob = modelio.load_model(tmp_path / "m.pt")
    assert blob["arch"]["masked"] is True and blob["meta"] == {"note": "x"}
    assert saf.sparsity(back) == pytest.approx(saf.sparsity(net))
    for (k, a), (k2, b) in zip(net.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(net.eval()(x), back.eval()(x))


def test_non_model_checkpoint_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a sparse-adv-fast model checkpoint"):
        modelio.from_blob({"state_dict": {}}, where="checkpoint 'x.pt'")


# ---- per-stage random state and resume identity ---------------------------------------------
def test_stage_seeds_are_distinct_per_seed_and_stage_and_checked():
    from sparse_adv_fast.pipeline.stages import check_seed, stage_seed

    names = ["dense", "imp_78.5", "imp_87.5", "eval_dense", "dense/fit"]
    seeds = {(s, n): stage_seed(s, n) for s in (0, 1, 2**32 - 1) for n in names}
    assert len(set(seeds.values())) == len(seeds)  # a sum of characters would collide here
    assert stage_seed(3, "dense") == stage_seed(3, "dense") and 0 <= stage_seed(3, "x") < 2**64
    for bad in (-1, 2**32, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            check_seed(bad)


def test_seed_stage_reseeds_the_loader_generator_whatever_it_drew_before():
    from sparse_adv_fast.pipeline.stages import seed_stage

    loader = torch.utils.data.DataLoader(list(range(20)), batch_size=5, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seed_stage(7, "imp_50", loader)
    first = [b.tolist() for b in loader]
    for _ in range(3):  # what earlier stages of this process drew
        list(loader)
    seed_stage(7, "imp_50", loader)
    assert [b.tolist() for b in loader] == first
    seed_stage(7, "imp_80", loader)
    assert [b.tolist() for b in loader] != first


def _interrupt_fit(monkeypatch, stage, *, after_epoch=None):
    """Make ``saf.train.fit`` raise KeyboardInterrupt in the fit writing ``<stage>.partial.pt``:
    at its start (``after_epoch=None``: killed in the first epoch, nothing saved) or after
    epoch ``after_epoch``'s checkpoint (killed mid-stage). Once; later calls run normally."""
    real = saf.train.fit
    fired = []

    def fit(model, loaders, **kw):
        if not fired and str(kw.get("checkpoint", "")).endswith(f"{stage}.partial.pt"):
            fired.append(1)
            if after_epoch is None:
                raise KeyboardInterrupt

            def stop(epoch, history):
                if epoch == after_epoch:
                    raise KeyboardInterrupt

            kw["callback"] = stop
        return real(model, loaders, **kw)

    monkeypatch.setattr(saf.train, "fit", fit)
    return fired


TINY = ["--epochs", "2", "--batch-size", "256", "--no-progress"]


def _weights(path):
    return modelio.load_model(path)[0].state_dict()


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "m.pt"
    with saf.backends.using("torch"):
        assert cli.main(["train", "--method", "natural", *TINY, "--out", str(path)]) == 0
    return path


@pytest.mark.slow
@pytest.mark.parametrize("cmd, stage", [
    (["train", "--method", "pgd", "--steps", "1"], "train"),
    (["prune", "{m}", "--method", "imp", "--rounds", "2", "--sparsity", "0.75",
      "--train-method", "pgd", "--steps", "1"], "imp_round2"),
    (["prune", "{m}", "--method", "hydra", "--sparsity", "0.5", "--train-method", "natural",
      "--steps", "1"], "finetune"),
    (["iwi", "{m}", "--mode", "widen", "--method", "pgd", "--steps", "1"], "iwi"),
])
def test_killed_command_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, capsys,
                                                              dense_ckpt, cmd, stage):
    from sparse_adv_fast.pipeline.commands import run_dir

    argv = [a.format(m=dense_ckpt) for a in cmd] + TINY
    straight, killed = tmp_path / "straight.pt", tmp_path / "killed.pt"
    assert cli.main([*argv, "--out", str(straight)]) == 0
    assert not run_dir(straight).exists()  # removed once the output is written

    with monkeypatch.context() as m:
        fired = _interrupt_fit(m, stage, after_epoch=1)
        assert cli.main([*argv, "--out", str(killed)]) == 130
    assert fired and not killed.exists()
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert (run_dir(killed) / "stages" / f"{stage}.partial.pt").exists()

    # Other settings are refused (the resumed run would mix two configurations) ...
    assert cli.main([*argv, "--lr", "0.01", "--out", str(killed)]) == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "lr: 0.05 -> 0.01" in err and "--fresh" in err

    # ... the same command resumes and ends exactly where the uninterrupted run did.
    assert cli.main([*argv, "--out", str(killed)]) == 0
    assert "resuming the interrupted run" in capsys.readouterr().err
    assert _same_weights(killed, straight)
    assert not run_dir(killed).exists()


def test_fresh_discards_an_interrupted_run_and_starts_over(tmp_path, monkeypatch, capsys):
    from sparse_adv_fast.pipeline.commands import run_dir

    out = tmp_path / "m.pt"
    argv = ["train", "--method", "natural", *TINY, "--out", str(out)]
    with monkeypatch.context() as m:
        _interrupt_fit(m, "train", after_epoch=1)
        assert cli.main(argv) == 130
    assert cli.main([*argv, "--fresh", "--lr", "0.01"]) == 0
    err = capsys.readouterr().err
    assert "resuming" not in err and not run_dir(out).exists()
    assert modelio.load_model(out)[1]["meta"]["history"]["resumed_from_epoch"] is None


def test_prune_imp_rewinds_to_the_early_weights_train_kept(dense_ckpt, tmp_path, monkeypatch):
    """Lottery-ticket rewinding (Frankle et al. 2020): each IMP round after the first
    starts from the weights ``train`` saved after its first epoch, masked — not from the
    trained weights (that would be pruning plus fine-tuning)."""
    from sparse_adv_fast.pipeline import commands

    blob = saf.checkpoint.load(dense_ckpt)
    early = blob["meta"]["rewind_state"]
    assert blob["meta"]["rewind_at"] >= 1
    trained = blob["state_dict"]
    assert any(not torch.equal(early[k], trained[k]) for k in trained)

    starts = []
    real = commands.fit_stage

    def record(model, loaders, *, stage, **kw):
        starts.append((stage, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real(model, loaders, stage=stage, **kw)

    monkeypatch.setattr(commands, "fit_stage", record)
    out = tmp_path / "imp.pt"
    assert cli.main(["prune", str(dense_ckpt), "--method", "imp", "--rounds", "2",
                     "--sparsity", "0.75", "--train-method", "natural", *TINY,
                     "--out", str(out)]) == 0
    stage, state = next((s, st) for s, st in starts if s == "imp_round2")
    for name, mask in ((k[: -len("_mask")], v) for k, v in state.items()
                       if k.endswith("weight_mask")):
        assert not bool(mask.all())
        torch.testing.assert_close(state[name], early[name] * mask, rtol=0, atol=0)
    # The output carries the rewind point on, so it can be pruned further by IMP.
    assert saf.checkpoint.load(out)["meta"]["rewind_at"] == blob["meta"]["rewind_at"]


def test_prune_imp_without_a_rewind_point_is_refused(tmp_path, capsys):
    model = saf.models.build("small_cnn", "digits")
    path = tmp_path / "bare.pt"
    modelio.save_model(model, modelio.arch_spec("small_cnn", "digits"), path)
    rc = cli.main(["prune", str(path), "--method", "imp", "--sparsity", "0.5", *TINY,
                   "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no early-training weights to rewind to" in err[0]
    assert not (tmp_path / "o.pt").exists()
