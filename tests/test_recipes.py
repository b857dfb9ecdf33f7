"""Shipped recipes (configs/) and the CLI --config path, on fake MNIST written as real IDX
files with class-dependent stroke patterns (learnable, robustly at eps 0.3): the MNIST
recipe learns; the old defaults collapse and the detector stops them with advice."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from sparse_adv_fast import config
from sparse_adv_fast.pipeline import modelio
from sparse_adv_fast.pipeline.command_config import COMMANDS

pytestmark = pytest.mark.usefixtures("torch_backend")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _idx(arr: np.ndarray) -> bytes:
    return (struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    """Ten classes, each a fixed pattern of 4x4 bright cells (~0.9) on a dim noisy
    background (<= 0.16): separable with a margin above eps 0.3."""
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    cells = rng.random((10, 7, 7)) < 0.3
    tmpl = np.kron(cells, np.ones((4, 4)))
    for split, n in (("train", 400), ("t10k", 100)):
        y = rng.integers(0, 10, n)
        x = tmpl[y] * 255 * rng.uniform(0.8, 1.0, (n, 1, 1)) + rng.uniform(0, 40, (n, 28, 28))
        (folder / f"{split}-images-idx3-ubyte").write_bytes(_idx(np.clip(x, 0, 255)))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(_idx(y))
    return folder


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.json")), ids=lambda p: p.name)
def test_shipped_train_recipes_are_valid_and_follow_the_literature(path):
    c = COMMANDS["train"].from_dict(config.read_file(path), str(path))
    if c.dataset == "mnist":
        assert c.eps == 0.3
    else:
        assert c.dataset == "cifar10" and c.eps == pytest.approx(8 / 255)
        assert c.augment and c.momentum == 0.9 and c.optimizer == "sgd"
    if c.method == "fgsm_rs":
        assert c.alpha == pytest.approx(1.25 * c.eps) and c.schedule == "cyclic"
    if c.method == "pgd" and c.dataset == "cifar10":
        assert (c.steps, c.alpha) == (10, pytest.approx(2 / 255))


def test_prune_recipe_is_valid():
    path = CONFIGS / "prune" / "cifar10_hydra.json"
    c = COMMANDS["prune"].from_dict(config.read_file(path), str(path))
    assert (c.method, c.scope, c.train_method) == ("hydra", "layer", "pgd")


def test_mnist_recipe_learns_and_saves_its_resolved_config(capsys, tmp_path, fake_mnist):
    out = tmp_path / "m.pt"
    # The recipe's optimiser, schedule, radius and warm-up; a 3-step attack (step 0.1) and
    # half width keep the test short.
    rc, stdout, err = run_cli(capsys, "train", "--config", CONFIGS / "train" / "mnist_pgd.json",
                              "--data-dir", fake_mnist, "--epochs", "2", "--steps", "3",
                              "--alpha", "0.1", "--width", "0.5", "--no-progress", "--out", out)
    assert rc == 0, err
    hist = modelio.load_model(out)[1]["meta"]["history"]["epochs"]
    assert hist[-1]["val_clean_acc"] > 0.5 and hist[-1]["train_acc"] > 0.3  # chance: 0.1
    rec = json.loads((tmp_path / "m.pt.config.json").read_text())
    fit = rec["fit"]
    assert (fit["optimizer"], fit["schedule"], fit["eps"], fit["eps_warmup"]) == (
        "adam", "cyclic", 0.3, 1.0)
    assert (fit["epochs"], fit["steps"], fit["alpha"]) == (2, 3, 0.1)  # flags beat the file
    assert rec["seed"] == 0 and {"torch", "sparse_adv_fast", "python"} <= set(rec["versions"])


def test_default_settings_collapse_and_are_stopped_with_advice(capsys, tmp_path, fake_mnist):
    # The run: PGD-AT at eps 0.3, SGD, no warm-up (lr 0.5 collapses at once here;
    # the default 0.05 does too at full width, within two epochs).
    out = tmp_path / "m.pt"
    rc, _, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", fake_mnist,
                         "--epochs", "2", "--steps", "3", "--width", "0.5", "--lr", "0.5",
                         "--no-progress", "--out", out)
    lines = [ln for ln in err.strip().splitlines() if "sparse-adv-fast train" in ln]
    assert rc == 1 and len(lines) == 1, err
    assert "training collapsed" in lines[0] and "lower lr" in lines[0]
    assert "eps warm-up" in lines[0] and "normalisation" in lines[0]
    assert not out.exists()


def test_config_file_errors_exit_2_before_any_work(capsys, tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epoch": 3}))
    rc, _, err = run_cli(capsys, "train", "--config", f, "--out", tmp_path / "m.pt")
    assert rc == 2 and "did you mean 'epochs'" in err and len(err.strip().splitlines()) == 1
    f.write_text(json.dumps({"lr": -1}))
    rc, _, err = run_cli(capsys, "prune", "m.pt", "--config", f, "--out", tmp_path / "p.pt")
    assert rc == 2 and "lr: expected a positive number, got -1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
