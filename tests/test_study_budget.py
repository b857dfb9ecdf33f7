"""Iteration accounting of the study: every arm spends the same optimizer steps from the
same dense start (planned here; tests/test_study.py checks the steps actually taken)."""

from __future__ import annotations

import pytest

from sparse_adv_fast.pipeline import arms as A
from sparse_adv_fast.pipeline.study import budget_plan
from sparse_adv_fast.pipeline.study_config import StudyConfig


@pytest.mark.parametrize(("rounds", "budget", "start"), [(1, 2, 1), (2, 6, 2), (4, 10, 1),
                                                         (3, 12, 3)])
@pytest.mark.parametrize("spe", [1, 10, 7])
def test_every_arm_plans_the_same_steps(rounds: int, budget: int, start: int, spe: int) -> None:
    cfg = StudyConfig(imp_rounds=rounds, budget_epochs=budget, start_epochs=start)
    plan = budget_plan(cfg, spe)
    want = (start + budget) * spe  # k + B, counted by hand
    totals = {a: p["total_steps"] for a, p in plan["arms"].items()}
    assert set(totals) == set(A.ARM_NAMES)
    assert set(totals.values()) == {want}, totals
    for a, p in plan["arms"].items():
        assert p["phases"][0]["phase"] == "dense start (shared)"
        assert p["phases"][0]["steps"] == start * spe
        assert p["phases"][0]["wide"] == (a == "large_scratch")  # its own start at width w


def test_imp_rounds_and_final_segment_share_one_length() -> None:
    cfg = StudyConfig(imp_rounds=4, budget_epochs=10)
    phases = budget_plan(cfg, 10)["arms"]["imp"]["phases"]
    train = [p for p in phases[1:] if p["kind"] == "at"]
    # 4 rounds + the rewound ticket's training, 2 epochs each: B = (R + 1) L.
    assert [p["epochs"] for p in train] == [2, 2, 2, 2, 2]


@pytest.mark.parametrize(("source", "arm"), [("imp", "iwi_ticket"), ("hydra", "iwi_ticket"),
                                              ("dense_at", "iwi_widen"), ("oneshot", "iwi_widen")])
def test_iwi_charges_its_source_training(source: str, arm: str) -> None:
    key = "iwi_ticket_source" if arm == "iwi_ticket" else "iwi_widen_source"
    cfg = StudyConfig(**{key: source})
    plan = budget_plan(cfg, 10)["arms"]
    kinds = [p["kind"] for p in plan[arm]["phases"]]
    assert "inherit" in kinds
    # The source's prefix is inside the IWI arm's budget, and the total matches the control.
    src_prefix = A.prefix_phases(source, cfg.budget_epochs, cfg.segment, cfg.imp_rounds, 10)
    assert sum(p["steps"] for p in src_prefix) == (cfg.budget_epochs - cfg.segment) * 10
    control = "large_scratch" if arm == "iwi_widen" else "dense_at"
    assert plan[arm]["total_steps"] == plan[control]["total_steps"]


def test_imp_sparsities() -> None:
    assert A.imp_sparsities(0.2, 3, None) == (0.2, 0.36, 0.488)
    assert A.imp_sparsities(0.2, 3, 0.45) == (0.2, 0.36, 0.45)
    assert A.imp_sparsities(0.5, 1, 0.5) == (0.5,)
