"""The study config: one validated object for files, overrides and keywords; every bad
input is a one-line ValueError raised before any work (issue 10, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparse_adv_fast as saf
from sparse_adv_fast.pipeline import arms as A
from sparse_adv_fast.pipeline import modelio, study_tasks
from sparse_adv_fast.pipeline import study_config as sc
from sparse_adv_fast.pipeline.study import run_study

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_a_real_study() -> None:
    c = sc.StudyConfig()
    assert len(c.seeds) >= 3 and set(c.arms) == set(A.ARM_NAMES)
    assert c.imp_rate == 0.2
    assert c.hydra_scope == "layer"
    # 4 rounds at 20 %: 1 - 0.8^r, the last one the target of every pruning arm.
    assert c.sparsities == pytest.approx((0.2, 0.36, 0.488, 0.5904), abs=1e-12)
    assert c.segment * (c.imp_rounds + 1) == c.budget_epochs


def test_shipped_files_are_the_defaults_and_the_quick_preset() -> None:
    assert sc.load(ROOT / "configs/study/default.json") == sc.StudyConfig()
    quick = sc.load(ROOT / "configs/study/quick.json")
    assert quick == sc.load(quick=True)
    assert quick.quick and quick.seeds == (0,)


def test_precedence_file_then_quick_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"seeds": [3, 4, 5], "train_steps": 7}))
    c = sc.load(f, ["train_steps=5"])
    assert c.seeds == (3, 4, 5) and c.train_steps == 5
    q = sc.load(f, ["seeds=[9]"], quick=True)
    assert q.seeds == (9,) and q.train_steps == sc.QUICK["train_steps"]


def test_override_values() -> None:
    c = sc.load(overrides=["arms=dense_at,imp,random", "seeds=[1,2,3]", "eps=0.2",
                           "lr_grid.at=0.05,0.2", "data_dir=null", "sparsity=0.5"])
    assert c.arms == ("dense_at", "imp", "random")
    assert c.seeds == (1, 2, 3) and c.eps == 0.2 and c.data_dir is None
    assert c.lr_grid == {"at": (0.05, 0.2), "finetune": (0.02, 0.05)}
    assert c.sparsities[-1] == 0.5
    # A keyword and an override are the same thing with the same check.
    assert c == sc.StudyConfig(arms=("dense_at", "imp", "random"), seeds=(1, 2, 3), eps=0.2,
                               lr_grid={"at": [0.05, 0.2], "finetune": [0.02, 0.05]},
                               sparsity=0.5)


def test_identity_leaves_out_run_settings() -> None:
    a, b = sc.StudyConfig(workers=1), sc.StudyConfig(workers=2)
    assert a.identity() == b.identity() and "workers" not in a.identity()


def test_hydra_loss_trades_is_a_setting_of_the_result() -> None:
    c = sc.load(overrides=["hydra_loss=trades"])
    assert c.hydra_loss == "trades" and c == sc.StudyConfig(hydra_loss="trades")
    assert sc.StudyConfig().hydra_loss == "pgd"
    # In the identity: a study directory run with one loss refuses to resume with the other.
    assert c.identity()["hydra_loss"] == "trades"
    assert c.identity() != sc.StudyConfig().identity()
    with pytest.raises(ValueError, match=r"unknown hydra_loss 'foo'"):
        sc.StudyConfig(hydra_loss="foo")


class _HydraCtx(study_tasks.Ctx):
    """A study context whose start job is a fresh small CNN (no store) and whose train split
    is 48 random digits-shaped images."""

    def __init__(self, cfg: sc.StudyConfig) -> None:
        super().__init__(cfg, store=None)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(48, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (48,), generator=g)
        self._data = (torch.utils.data.TensorDataset(x, y), None, None)

    def load(self, key: str) -> dict:
        return {"ledger": [{"phase": "start-w1: train", "steps": 0}]}

    def model(self, key: str, field: str = "model") -> torch.nn.Module:
        torch.manual_seed(0)
        return modelio.build(self.arch(False))


@pytest.mark.parametrize("loss", ["pgd", "trades"])
def test_the_hydra_job_trains_scores_on_hydra_loss(loss: str, monkeypatch) -> None:
    # B = 4, one IMP round: L = 2, so the dense prefix B - 2L is empty and the job is the
    # score phase alone: 2 epochs of 1 batch of 48.
    cfg = sc.StudyConfig(hydra_loss=loss, budget_epochs=4, imp_rounds=1, train_steps=1,
                         batch_size=48, arms=("dense_at", "hydra"), seeds=(0,))
    calls = []
    real = saf.prune.hydra

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(saf.prune, "hydra", spy)
    with saf.backends.using(cfg.backend):  # as study._run_job runs every job
        res = study_tasks.job_hydra(_HydraCtx(cfg), seed=0, lr=0.1, start="start")
    assert [kw["loss"] for kw in calls] == [loss]
    assert res["ledger"][-1] == {"phase": "hydra: scores", "steps": 2, "epochs": 2,
                                 "lr": cfg.hydra_score_lr, "method": f"hydra-{loss}"}
    model = modelio.from_blob(res["model"])
    for m in saf.masks(model).values():  # hydra_scope "layer": each layer at the target
        assert int((~m).sum()) == round(cfg.sparsities[-1] * m.numel())


BAD = [
    (["arms=dense_at,bogus"], r"^config: unknown arm 'bogus'; choose from"),
    (["arms=random"],
     r"^config: arm 'random' starts from the tuned prefix of arm 'imp'; add 'imp'"),
    (["arms=dense_at,dense_at"], r"more than once"),
    (["imp_rounds=2", "sparsity=0.8"],
     r"^config: unreachable pruning schedule: 2 IMP rounds at rate 0.2 reach sparsity "
     r"0.3600, below the target 0.8; use imp_rounds=8"),
    (["imp_rounds=5", "sparsity=0.5"], r"IMP round 5 would prune nothing; use imp_rounds=4"),
    (["budget_epochs=3"],
     r"^config: budget too small for the rounds: budget_epochs=3 cannot hold 4 IMP"),
    (["budget_epochs=12"], r"does not split into 5 equal segments .*use 10 or 15"),
    (["iwi_ticket_source=dense_at"],
     r"^config: incompatible IWI pair: iwi_ticket needs a sparse source"),
    (["iwi_ticket_source=iwi_widen"], r"^config: incompatible IWI pair: .*not a pruning arm"),
    (["iwi_widen_source=large_scratch"],
     r"^config: incompatible IWI pair: iwi_widen needs a base-width source .*already 2x wide"),
    (["arms=dense_at,iwi_widen,imp", "iwi_widen_source=imp"], None),  # a valid pair
    (["arms=dense_at,iwi_ticket"],
     r"^config: arm 'iwi_ticket' starts from the tuned prefix of arm 'imp'"),
    (["epochs=3"], r"^override: unknown config key 'epochs'; did you mean 'start_epochs'\?"),
    (["lr_gird.at=0.1"], r"unknown config key 'lr_gird'; did you mean 'lr_grid'"),
    (["lr_grid.bogus=0.1"], r"^config: lr_grid: unknown family 'bogus'"),
    (["lr_grid.at=[]"], r"lr_grid\['at'\] must be a non-empty list"),
    (["lr_grid.at=-0.1"], r"lr_grid\['at'\] entry must be > 0"),
    (["eval_attacks=pgdx"], r"^config: eval_attacks: evaluate: unknown attack 'pgdx'"),
    (["seeds=[0,0]"], r"seeds must be distinct"),
    (["seeds=[]"], r"seeds must be a non-empty list"),
    (["imp_rate=1.0"], r"imp_rate must be in \(0, 1\)"),
    (["widen=1"], r"widen must be an int >= 2"),
    (["dataset=svhn"], r"unknown dataset 'svhn'; choose one of"),
    (["hydra_loss=foo"], r"^config: unknown hydra_loss 'foo'; choose one of \('pgd', 'trades'\)$"),
    (["hydra_loss=trades"], None),  # HYDRA's scores train on the TRADES loss too
    (["backend=fast"], r"unknown backend 'fast'; choose one of"),
    (["noequals"], r"is not of the form key=value"),
    (["eps.x=1"], r"only lr_grid has sub-keys"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_input_is_one_clear_line(overrides: list[str], message: str | None) -> None:
    if message is None:
        sc.load(overrides=overrides)
        return
    with pytest.raises(ValueError, match=message) as e:
        sc.load(overrides=overrides)
    assert "\n" not in str(e.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"seeds": [0, 1, 2], "armz": ["dense_at"]}))
    with pytest.raises(ValueError, match=r"bad.json: unknown config key 'armz'; did you mean"):
        sc.load(f)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"), ("[1, 2]", "must hold a mapping"),
    ('{"seeds": [0, 0]}', "seeds must be distinct"),
])
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        sc.load(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sc.load(tmp_path / "missing.json")


@pytest.mark.parametrize("bad", [
    {"arms": ["dense_at", "nope"]}, {"imp_rounds": 1, "sparsity": 0.9},
    {"budget_epochs": 1}, {"iwi_ticket_source": "large_scratch"}, {"colour": "red"},
])
def test_run_study_rejects_before_any_work(tmp_path: Path, bad: dict) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError):
        run_study(bad, out, progress=False)
    assert not out.exists()
