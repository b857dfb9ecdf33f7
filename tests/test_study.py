"""The controlled study end to end on a tiny config: equal steps actually taken, tuning on
validation, resumable and partial runs equal to a straight run, IWI dead zeros, outputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sparse_adv_fast.pipeline import stats, study, study_tasks
from sparse_adv_fast.pipeline.stages import StageError
from sparse_adv_fast.pipeline.study_config import StudyConfig

# 240 training samples in batches of 64: 4 steps per epoch; k = 1 epoch, B = 4 epochs
# (one IMP round of L = 2 epochs, then 2 epochs of training the rewound ticket).
TINY: dict[str, Any] = dict(
    seeds=(0,), arms=("dense_at", "imp", "random", "iwi_ticket"), start_epochs=1,
    budget_epochs=4, imp_rounds=1, train_steps=2, train_subset=300, batch_size=64,
    val_size=60, test_subset=60, lr_grid={"at": (0.05, 0.1), "finetune": (0.05,)},
    val_attacks=("pgd3",), eval_attacks=("pgd3",), workers=1, radius_points=30,
)
STEPS_PER_EPOCH = 4  # ceil(240 / 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("study") / "run"
    return out, study.run_study(StudyConfig(**TINY), out, progress=False)


def _text(out: Path) -> str:
    return (out / "results.json").read_text()


def test_every_arm_took_the_same_steps(tiny) -> None:
    _, res = tiny
    want = (TINY["start_epochs"] + TINY["budget_epochs"]) * STEPS_PER_EPOCH
    assert res["budget"]["steps_per_epoch"] == STEPS_PER_EPOCH
    for arm in TINY["arms"]:
        seeds = res["arms"][arm]["seeds"]
        assert set(seeds) == {"0"}
        row = seeds["0"]
        # Counted from fit's own iteration counters, phase by phase, start included.
        assert row["steps"] == want, (arm, row["ledger"])
        assert sum(p["steps"] for p in row["ledger"]) == want
        assert row["ledger"][0] == {"phase": "start-w1: train", "steps": STEPS_PER_EPOCH,
                                    "lrs": [0.1]}
        assert res["arms"][arm]["planned_steps"] == want
    imp = [(p["phase"], p["steps"]) for p in res["arms"]["imp"]["seeds"]["0"]["ledger"]]
    assert imp == [("start-w1: train", 4), ("rounds-at: round1", 8), ("imp: final", 8)]


def test_rewinding_restarts_the_schedule_at_k(tiny) -> None:
    # Frankle et al. 2020: the rewound ticket trains with the schedule from iteration k on
    # (what the round trained with), not from 0 (the start's constant rate).
    _, res = tiny
    lr = res["arms"]["imp"]["lr"]
    cosine = [lr, lr * (1 + math.cos(math.pi / 2)) / 2]  # per epoch, over L = 2 epochs
    start, round1, final = (p["lrs"] for p in res["arms"]["imp"]["seeds"]["0"]["ledger"])
    assert start == [0.1]  # the default start_lr, constant
    assert round1 == pytest.approx(cosine) and final == pytest.approx(cosine)
    dense = res["arms"]["dense_at"]["seeds"]["0"]["ledger"][1]["lrs"]
    d = res["arms"]["dense_at"]["lr"]
    assert dense == pytest.approx([d * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])


def test_sparsity_of_the_pruned_arms(tiny) -> None:
    _, res = tiny
    assert res["budget"]["imp_sparsities"] == [0.2]
    for arm in ("imp", "random"):
        assert res["arms"][arm]["seeds"]["0"]["sparsity"] == pytest.approx(0.2, abs=1e-3)
    assert res["arms"]["dense_at"]["seeds"]["0"]["sparsity"] < 0.01


def test_learning_rates_are_chosen_on_validation(tiny) -> None:
    _, res = tiny
    for arm in TINY["arms"]:
        t = res["tuning"][arm]
        grid = TINY["lr_grid"][t["family"]]
        assert t["grid"] == list(grid)
        scores = [t["val_worst_case"][f"{lr:g}"] for lr in grid]
        best = grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]
        assert t["selected_lr"] == best
        row = res["arms"][arm]["seeds"]["0"]
        assert row["lr"] == best and res["arms"][arm]["lr"] == best
        assert row["val_worst_case"] == t["val_worst_case"][f"{best:g}"]


def test_iwi_reports_how_many_inherited_zeros_stay_dead(tiny) -> None:
    _, res = tiny
    iwi = res["arms"]["iwi_ticket"]["seeds"]["0"]["iwi"]
    # The ticket's pruned weights (torch's count rule: round(0.2 * n)) are all zero at
    # inheritance; exact zeros among the survivors would only add to them.
    assert iwi["inherited_zeros"] >= round(0.2 * iwi["weights"])
    assert iwi["dead_fraction"] == iwi["still_zero"] / iwi["inherited_zeros"]
    assert 0.0 <= iwi["dead_fraction"] <= 1.0
    assert res["arms"]["iwi_ticket"]["dead_fraction"]["mean"] == iwi["dead_fraction"]


def test_first_order_radius_is_checked_against_fab(tiny) -> None:
    """Each result holds the first-order radius of its test points and its rank correlation
    with FAB's minimal perturbations, recomputed here from the saved model as the oracle."""
    from sparse_adv_fast import metrics
    from sparse_adv_fast.pipeline.stages import seed_stage

    out, res = tiny
    seed = res["arms"]["dense_at"]["seeds"]["0"]
    r = seed["radius"]
    assert 0 < r["n"] <= TINY["radius_points"] and r["median_radius"] > 0
    assert -1.0 <= r["spearman"] <= 1.0
    row = res["arms"]["dense_at"]
    assert row["radius_median_radius"]["mean"] == r["median_radius"]
    md = (out / "results.md").read_text()
    assert "## First-order radius" in md and "Spearman" in md
    # The oracle: the library's own measurement on the stored model and the same points.
    ctx = study_tasks.Ctx(StudyConfig(**TINY), study._store(out, StudyConfig(**TINY), False))
    model = ctx.model(study.train_key("dense_at", 0, row["lr"]))
    x, y = next(iter(ctx.data[2]))
    n = TINY["radius_points"]
    seed_stage(0, "dense_at/radius")
    direct = metrics.radius_vs_minimal_perturbation(model.eval(), x[:n], y[:n])
    assert direct["n"] == r["n"] and direct["spearman"] == pytest.approx(r["spearman"])


def test_outputs(tiny) -> None:
    out, res = tiny
    md = (out / "results.md").read_text()
    assert "| dense AT (`dense_at`)" in md and "**Claim 1:" in md and "## Verdicts" in md
    for png in ("study_robustness.png", "study_paired.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "config.json").read_text())
    assert info["seeds"] == [0] and info["config"]["arms"] == list(TINY["arms"])
    assert {"torch", "numpy", "python", "sparse_adv_fast"} <= set(info["versions"])
    assert json.loads(_text(out)) == json.loads(json.dumps(res))


def test_rerun_after_deleting_jobs_is_identical(tiny, tmp_path: Path) -> None:
    out, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for job in ("result.imp.s0", "train.random.s0.lr0.1", "rounds-at.s0.lr0.05"):
        (copy / "stages" / f"{job}.pt").unlink()
    study.run_study(StudyConfig(**TINY), copy, progress=False)
    ran = json.loads((copy / "timing.json").read_text())["jobs_ran"]
    assert "result.imp.s0" in ran and "train.dense_at.s0.lr0.1" not in ran
    assert _text(copy) == _text(out)


def test_a_job_killed_mid_training_resumes_to_the_same_result(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = tiny
    real = study_tasks.fit_stage

    class Killed(Exception):
        pass

    def dying(*args: Any, stage: str, **kw: Any) -> Any:
        if stage == "dense_at/final":  # a 2-epoch phase: die after its first epoch
            def die(epoch: int, _hist: Any) -> None:
                if epoch == 1:
                    raise Killed
            kw["callback"] = die
        return real(*args, stage=stage, **kw)

    run = tmp_path / "run"
    monkeypatch.setattr(study_tasks, "fit_stage", dying)
    with pytest.raises(Killed):
        study.run_study(StudyConfig(**TINY), run, progress=False)
    assert list((run / "stages").glob("train.dense_at.*.final.partial.pt"))
    monkeypatch.setattr(study_tasks, "fit_stage", real)
    study.run_study(StudyConfig(**TINY), run, progress=False)
    assert _text(run) == _text(out)
    assert not list((run / "stages").glob("*.partial.pt"))  # scratch removed when done


def test_an_arm_run_alone_equals_its_row_in_the_full_study(tiny, tmp_path: Path) -> None:
    # Each (seed, arm) draws from its own RNG state, not from what other arms drew first.
    _, res = tiny
    alone = study.run_study(StudyConfig(**{**TINY, "arms": ("dense_at",)}), tmp_path / "a",
                            progress=False)
    assert alone["arms"]["dense_at"]["seeds"] == res["arms"]["dense_at"]["seeds"]


def test_other_settings_in_the_same_directory_are_refused(tiny, tmp_path: Path) -> None:
    out, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(StageError, match="other settings"):
        study.run_study(StudyConfig(**{**TINY, "train_steps": 3}), copy, progress=False)
    # workers is a run setting: changing it resumes the same study.
    assert study.run_study(StudyConfig(**{**TINY, "workers": 2}), copy,
                           progress=False)["arms"] == tiny[1]["arms"]


# ---- verdicts from numbers (no training) ----------------------------------------------------


def _summary(arm: str, seed: int, worst: float) -> dict[str, Any]:
    return {"arm": arm, "seed": seed, "lr": 0.1, "val": {"worst_case": 0.5, "clean": 0.9},
            "steps": 30, "ledger": [{"phase": "x", "steps": 30}], "sparsity": 0.0,
            "params": 10, "test": {"clean": 0.9, "worst_case": worst, "robust": {}, "n": 100}}


def test_verdicts_are_computed_from_the_paired_differences() -> None:
    cfg = StudyConfig(arms=("dense_at", "oneshot", "imp", "random", "reinit", "hydra"),
                      lr_grid={"at": (0.1,), "finetune": (0.1,)})
    dense = [0.50, 0.60, 0.55]
    # imp: dense + (0.02, 0.03, 0.025) -> above 0; oneshot: dense - (0.05, 0.04, 0.06) ->
    # below 0; hydra: dense + (0.05, -0.05, 0.0) -> contains 0.
    delta = {"dense_at": (0, 0, 0), "imp": (0.02, 0.03, 0.025), "oneshot": (-0.05, -0.04, -0.06),
             "hydra": (0.05, -0.05, 0.0), "random": (0.0, 0.01, 0.0), "reinit": (0.0, 0.0, 0.01)}
    summaries = {}
    for arm, ds in delta.items():
        for seed, (base, d) in enumerate(zip(dense, ds, strict=True)):
            summaries[study.result_key(arm, seed)] = _summary(arm, seed, base + d)
            summaries[study.train_key(arm, seed, 0.1)] = _summary(arm, seed, base + d)
    res = study.aggregate(cfg, study.budget_plan(cfg, 10), summaries)
    imp = res["arms"]["imp"]["vs_dense_at"]
    ref = stats.interval([0.02, 0.03, 0.025])
    assert imp["mean"] == pytest.approx(ref["mean"]) and imp["half"] == pytest.approx(ref["half"])
    assert imp["verdict"] == "held"
    assert res["arms"]["oneshot"]["vs_dense_at"]["verdict"] == "not held"
    assert res["arms"]["hydra"]["vs_dense_at"]["verdict"] == "inconclusive"
    c1, c2, c3 = res["claims"]
    assert [k["verdict"] for k in c1["comparisons"]] == ["not held", "held", "inconclusive"]
    assert c1["verdict"] == "not held"
    # imp - reinit = (0.02, 0.03, 0.015) and imp - random = (0.02, 0.02, 0.025): both held;
    # natural_prune_at was not run, so claim 2 rests on those two.
    assert [k["baseline"] for k in c2["comparisons"]] == ["reinit", "random"]
    assert c2["verdict"] == "held"
    assert c3["verdict"] == "not tested" and c3["comparisons"] == []
    # Rows: mean +- t-interval of the per-seed robust accuracy.
    row = res["arms"]["dense_at"]["worst_case"]
    assert row["mean"] == pytest.approx(0.55) and row["half"] == pytest.approx(
        stats.interval(dense)["half"])
    assert torch.isfinite(torch.tensor(row["half"]))
