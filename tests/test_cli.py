"""The ``sparse-adv-fast`` command line: help, argument errors, train -> prune -> iwi -> eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli

import sparse_adv_fast as saf
from sparse_adv_fast import cli
from sparse_adv_fast.pipeline import commands, modelio

pytestmark = pytest.mark.usefixtures("torch_backend")

COMMANDS = ("demo", "study", "train", "prune", "iwi", "eval", "bench", "info")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(capsys, cmd):
    rc, out, _ = run_cli(capsys, cmd, "--help")
    assert rc == 0 and out.startswith(f"usage: sparse-adv-fast {cmd}")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["demo", "--method", "sgd"], "invalid choice: 'sgd'"),
        (["demo", "--eps", "2"], "eps must be in [0, 1]"),
        (["prune", "m.pt", "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["prune", "m.pt", "--sparsity", "abc"], "sparsity must be a number"),
        (["train", "--epochs", "0"], "expected a positive integer"),
        (["train", "--eps", "3"], "eps must be in [0, 1]"),
        (["eval", "m.pt", "--attacks", "pgd20x5,cw"], "unknown attack suite(s) ['cw']"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, words):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_data_dir_exits_2_before_any_work(capsys, tmp_path):
    missing = tmp_path / "nope"
    rc, _, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", str(missing),
                         "--out", str(tmp_path / "m.pt"))
    assert rc == 2 and str(missing) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()
    for argv in (["demo", "--dataset", "cifar10", "--data-dir", str(missing)],
                 ["study", "dataset=cifar10", f"data_dir={missing}"]):
        rc, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "o"))
        assert rc == 2 and "does not exist" in err and not (tmp_path / "o").exists()


def test_eval_attacks_take_every_suite_of_the_evaluator():
    from sparse_adv_fast.attacks.evaluate import SUITES

    ns = cli.parse_args(["eval", "m.pt", "--attacks", "AutoAttack, autoattack-rand,pgd7x2"])
    assert ns.attacks == ("autoattack", "autoattack-rand", "pgd7x2")
    assert cli.parse_args(["eval", "m.pt", "--attacks", ",".join(SUITES)]).attacks == SUITES


def test_module_entry_point_prints_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sparse_adv_fast", "prune", str(tmp_path / "absent.pt"),
         "--out", str(tmp_path / "p.pt")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SPARSE_ADV_FAST_BACKEND": "torch"},
    )
    assert r.returncode == 2, r.stderr  # a missing input is a usage error
    assert "absent.pt' does not exist" in r.stderr and "Traceback" not in r.stderr


def test_bench_without_a_source_checkout_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "SOURCE_ROOT", tmp_path)
    rc, _, err = run_cli(capsys, "bench")
    assert rc == 2 and "no benchmarks/ folder" in err and "source checkout" in err


def test_info_prints_backends(capsys):
    rc, out, _ = run_cli(capsys, "info")
    assert rc == 0 and "backends:" in out and "torch" in out


def test_not_a_model_checkpoint_is_a_clear_error(capsys, tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, p)
    rc, _, err = run_cli(capsys, "eval", str(p), "--attacks", "fgsm")
    assert rc == 2 and "not a sparse-adv-fast model checkpoint" in err


def test_imp_schedule_reaches_the_target_geometrically():
    assert commands.imp_schedule(0.875, 3) == pytest.approx((0.5, 0.75, 0.875))
    assert commands.imp_schedule(0.9, 1) == pytest.approx((0.9,))
    assert commands.imp_schedule(0.9, 2, start=0.6) == pytest.approx((0.8, 0.9))
    with pytest.raises(ValueError, match="already 0.9000 sparse"):
        commands.imp_schedule(0.5, 2, start=0.9)


@pytest.mark.slow
def test_train_prune_iwi_eval_chain(capsys, tmp_path):
    m, p, w = (str(tmp_path / n) for n in ("m.pt", "p.pt", "w.pt"))
    quick = ["--method", "natural", "--epochs", "1", "--no-progress"]
    assert run_cli(capsys, "train", "--out", m, *quick)[0] == 0
    net, blob = modelio.load_model(m)
    assert blob["arch"] == {"name": "small_cnn", "dataset": "digits", "width": 1,
                            "masked": False}

    rc, out, err = run_cli(capsys, "prune", m, "--sparsity", "0.75", "--out", p)
    assert rc == 0, err
    pruned, blob = modelio.load_model(p)
    assert blob["arch"]["masked"] is True
    assert saf.sparsity(pruned) == pytest.approx(0.75, abs=1e-3)
    # magnitude pruning kept the largest weights of the trained model, unchanged
    for name, layer in saf.nn.masked_layers(pruned).items():
        ref = net.get_submodule(name).weight
        assert torch.equal(layer.weight[layer.weight_mask], ref[layer.weight_mask])

    r, i = str(tmp_path / "r.pt"), str(tmp_path / "i.pt")
    rc, out, err = run_cli(capsys, "prune", m, "--method", "random", "--sparsity", "0.5",
                           "--scope", "layer", "--out", r)
    assert rc == 0, err
    assert all(v == pytest.approx(0.5, abs=0.01)
               for v in saf.layer_sparsity(modelio.load_model(r)[0]).values())
    rc, out, err = run_cli(capsys, "prune", p, "--method", "imp", "--sparsity", "0.9", "--rounds",
                           "2", "--train-method", "natural", "--epochs", "1", "--no-progress",
                           "--out", i)
    assert rc == 0, err
    ticket = modelio.load_model(i)[0]
    assert saf.sparsity(ticket) == pytest.approx(0.9, abs=1e-3)
    # the masks are nested: IMP started from the 75% checkpoint and pruned further
    for name, layer in saf.nn.masked_layers(ticket).items():
        assert not (layer.weight_mask & ~pruned.get_submodule(name).weight_mask).any()

    h = str(tmp_path / "h.pt")
    rc, out, err = run_cli(capsys, "prune", m, "--method", "hydra", "--sparsity", "0.6", "--steps",
                           "1", "--train-method", "natural", "--epochs", "1", "--no-progress",
                           "--out", h)
    assert rc == 0, err
    assert saf.sparsity(modelio.load_model(h)[0]) == pytest.approx(0.6, abs=1e-3)

    rc, out, err = run_cli(capsys, "iwi", m, "--mode", "widen", "--out", w, *quick)
    assert rc == 0, err
    wide, blob = modelio.load_model(w)
    assert blob["arch"]["width"] == 2 and blob["meta"]["iwi_mode"] == "widen"
    assert sum(t.numel() for t in wide.parameters()) > 2 * sum(t.numel() for t in net.parameters())

    rc, out, err = run_cli(capsys, "eval", p, "--attacks", "fgsm", "--max-batches", "1",
                           "--no-progress")
    assert rc == 0, err
    res = json.loads(out)
    assert res["sparsity"] == pytest.approx(0.75, abs=0.01) and res["eps"] == 0.1
    assert 0.0 <= res["robust"]["fgsm"] <= res["clean"] <= 1.0 and res["n"] == 128

    rc, out, err = run_cli(capsys, "eval", p, "--attacks", "autoattack", "--max-batches", "1",
                           "--batch-size", "16", "--no-progress")
    assert rc == 0, err
    res = json.loads(out)
    aa = res["details"]["autoattack"]
    after = list(aa["robust_after"].values())
    assert list(aa["robust_after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(b <= a for a, b in zip([res["clean"], *after], after, strict=False))
    assert after[-1] == pytest.approx(res["robust"]["autoattack"])
    assert isinstance(aa["gradient_masking"]["suspected"], bool)
