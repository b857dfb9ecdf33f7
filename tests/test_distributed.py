"""Data-parallel ``fit`` and sharded ``evaluate`` on 2 gloo CPU processes, against the same
calls in one process: the oracle is the single-process run."""

from __future__ import annotations

import importlib
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast import distributed as D

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")]

N, FEATURES, CLASSES = 64, 12, 3


def _data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, FEATURES, generator=g)
    y = (x[:, :CLASSES].argmax(1) + (x[:, -1] > 0.9).long()) % CLASSES
    return TensorDataset(x, y)


def _model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    net = saf.sparsify(nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES)))
    return saf.prune.magnitude(net, 0.5, scope="layer")


def _fit_natural(process_group=None) -> tuple[nn.Module, list[dict]]:
    net = _model()
    loader = DataLoader(_data(), batch_size=16, shuffle=False)
    hist = saf.train.fit(net, loader, "natural", epochs=3, lr=0.1, progress=False,
                         process_group=process_group)
    return net, hist.epochs


def _fit_batchnorm(process_group=None) -> nn.Module:
    """One natural step on the whole data set (one global batch) through a BatchNorm."""
    torch.manual_seed(3)
    net = nn.Sequential(saf.nn.MaskedLinear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(),
                        saf.nn.MaskedLinear(16, CLASSES))
    saf.train.fit(net, DataLoader(_data(), batch_size=N), "natural", epochs=1, lr=0.1,
                  progress=False, process_group=process_group)
    return net


def _evaluate(process_group=None) -> dict:
    net = nn.Linear(FEATURES, CLASSES)  # the labelling rule, mostly: argmax of x[:3]
    with torch.no_grad():
        net.weight.zero_()
        net.weight[:, :CLASSES] = 5 * torch.eye(CLASSES)
        net.bias.zero_()
    # 45 samples in batches of 10: 5 batches, the last one short; rank 0 gets 3, rank 1 2.
    data = _Reads(_data(45, seed=3))
    loader = DataLoader(data, batch_size=10, shuffle=False)
    out = saf.train.evaluate(net, loader, attacks=("pgd5x2", "fgsm", "apgd-ce"), eps=0.05,
                             seed=7, process_group=process_group)
    return out, sorted(data.read)


class _Reads(torch.utils.data.Dataset):
    """A dataset that remembers which samples were loaded."""

    def __init__(self, data: TensorDataset) -> None:
        self.data, self.read = data, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.read.append(i)
        return self.data[i]


# ---- the 2-process side -------------------------------------------------------------------
def _entry(rank: int, world: int, store: str, out: str, job: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    result: dict = {}
    try:
        with backends.using("torch"):
            result = JOBS[job](rank)
    except Exception as e:  # the parent asserts on what each rank raised
        result = {"error": type(e).__name__, "message": str(e),
                  "trace": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"{job}.rank{rank}.pt"))


def _job_fit(rank: int) -> dict:
    net, epochs = _fit_natural(dist.group.WORLD)
    # The DDP-wrapped model path, PGD-AT with a checkpoint: ranks attack their own shards.
    pgd_net = _model(seed=2)
    ddp = nn.parallel.DistributedDataParallel(pgd_net)
    loader = DataLoader(_data(), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(4))
    ckpt = os.path.join(os.environ["SAF_TEST_OUT"], "pgd.ckpt")
    hist = saf.train.fit(ddp, loader, "pgd", epochs=2, lr=0.05, eps=0.1, steps=3,
                         progress=False, checkpoint=ckpt)
    return {"natural": net.state_dict(), "epochs": epochs, "pgd": pgd_net.state_dict(),
            "pgd_epochs": hist.epochs, "bn": _fit_batchnorm(dist.group.WORLD).state_dict()}


def _job_evaluate(rank: int) -> dict:
    result, read = _evaluate(dist.group.WORLD)
    return {"result": result, "read": read}


def _job_fail(rank: int) -> dict:
    out = os.environ["SAF_TEST_OUT"]
    errors = {}
    # A bad setting on rank 1 only: both ranks must stop at fit's checks.
    try:
        saf.train.fit(_model(), DataLoader(_data(), batch_size=16), "natural", epochs=1,
                      lr=0.1 if rank == 0 else -1.0, progress=False,
                      checkpoint=os.path.join(out, "never.ckpt"),
                      process_group=dist.group.WORLD)
    except Exception as e:
        errors["fit"] = f"{type(e).__name__}: {e}"
    # A loader that breaks on rank 1's shard only (batch 1): both ranks stop.
    good = [(torch.rand(4, FEATURES), torch.zeros(4, dtype=torch.long))] * 2
    bad = [good[0], "not a batch"]
    try:
        saf.train.evaluate(_model(), bad if rank == 1 else good, attacks=("fgsm",), eps=0.1,
                           process_group=dist.group.WORLD)
    except Exception as e:
        errors["evaluate"] = f"{type(e).__name__}: {e}"
    # A global batch of 15 does not split over 2 ranks.
    try:
        saf.train.fit(_model(), DataLoader(_data(), batch_size=15), "natural", epochs=1,
                      progress=False, process_group=dist.group.WORLD)
    except Exception as e:
        errors["batch"] = f"{type(e).__name__}: {e}"
    return errors


JOBS = {"fit": _job_fit, "evaluate": _job_evaluate, "fail": _job_fail}


def _spawn(tmp_path, job: str, world: int = 2) -> list[dict]:
    os.environ["SAF_TEST_OUT"] = str(tmp_path)  # inherited by the spawned ranks
    try:
        mp.start_processes(_entry, args=(world, str(tmp_path / f"{job}.store"), str(tmp_path),
                                         job), nprocs=world, start_method="spawn")
    finally:
        os.environ.pop("SAF_TEST_OUT", None)
    out = [torch.load(tmp_path / f"{job}.rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(out):
        assert "trace" not in res, f"rank {r} failed:\n{res['trace']}"
    return out


# ---- the tests ----------------------------------------------------------------------------
def test_fit_data_parallel_matches_single_process_and_keeps_ranks_equal(tmp_path):
    ranks = _spawn(tmp_path, "fit")
    with backends.using("torch"):
        ref, ref_epochs = _fit_natural()
    ref_state = ref.state_dict()
    for res in ranks:
        # Same global batches (16 = 2 x 8), gradients averaged: the single-process run.
        for k, v in ref_state.items():
            torch.testing.assert_close(res["natural"][k], v, rtol=1e-5, atol=1e-6,
                                       msg=f"{k} differs from the single-process run")
        for mine, theirs in zip(res["epochs"], ref_epochs, strict=True):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
            assert mine["train_acc"] == theirs["train_acc"]
    a, b = ranks
    for key in ("natural", "pgd"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}: {k} differs between ranks"
        for k, mask in a[key].items():
            if k.endswith("weight_mask"):
                assert 0 < mask.float().mean() < 1
                assert torch.all(a[key][k.replace("weight_mask", "weight")][~mask] == 0)
    def numbers(epochs):
        return [{k: v for k, v in e.items() if k != "time"} for e in epochs]

    assert numbers(a["pgd_epochs"]) == numbers(b["pgd_epochs"])  # summed over ranks
    # BatchNorm statistics: each rank's shard moves its running mean; the epoch ends with
    # their mean on every rank, which for one step over equal shards is the momentum times
    # the full batch's mean, as in one process.
    with backends.using("torch"):
        ref_bn = _fit_batchnorm().state_dict()
    for k in ("1.running_mean", "1.running_var"):
        assert torch.equal(a["bn"][k], b["bn"][k]), f"{k} differs between ranks"
    torch.testing.assert_close(a["bn"]["1.running_mean"], ref_bn["1.running_mean"],
                               rtol=1e-5, atol=1e-6)
    ckpt = torch.load(tmp_path / "pgd.ckpt", weights_only=False)
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2  # every rank's RNG
    assert ckpt["config"]["world_size"] == 2 and ckpt["config"]["batch_size"] == 16
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


def test_evaluate_sharded_equals_single_process(tmp_path):
    ranks = _spawn(tmp_path, "evaluate")
    with backends.using("torch"):
        ref, read = _evaluate()
    assert ref["n"] == 45 and read == list(range(45))
    for res in ranks:
        assert res["result"] == ref
    # Each rank loads its own batches only: rank 0 batches 0, 2, 4; rank 1 batches 1, 3.
    assert ranks[0]["read"] == [*range(0, 10), *range(20, 30), *range(40, 45)]
    assert ranks[1]["read"] == [*range(10, 20), *range(30, 40)]
    assert 0 < ref["worst_case"] < ref["clean"]  # the attacks did something to compare


def test_a_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    rank0, rank1 = _spawn(tmp_path, "fail")
    assert rank1["fit"].startswith("ValueError: fit: lr")
    assert rank0["fit"].startswith("DistributedError: fit's checks failed on rank 1: "
                                   "ValueError: fit: lr")
    assert not (tmp_path / "never.ckpt").exists()
    assert rank1["evaluate"].startswith("TypeError: evaluate: the loader must yield")
    assert "evaluate failed on rank 1: TypeError" in rank0["evaluate"]
    for res in (rank0, rank1):
        assert "the global batch size 15 does not split evenly over 2 ranks" in res["batch"]


def test_single_process_world_and_digest():
    assert not D.SINGLE.active and D.SINGLE.main and D.SINGLE.tag() == ""
    a = torch.tensor([1.0, 2.0, 3.0])
    b = a.clone()
    b[1] = torch.nextafter(b[1], torch.tensor(9.0))  # one ulp
    assert torch.equal(D.digest(a), D.digest(a.clone()))
    assert not torch.equal(D.digest(a), D.digest(b))
    assert not torch.equal(D.digest(a), D.digest(a.flip(0)))  # position matters
    m = torch.tensor([True, False, True])
    assert not torch.equal(D.digest(m), D.digest(m.flip(0)[[1, 0, 2]]))


def test_missing_rendezvous_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(D.DistributedError, match="MASTER_ADDR and MASTER_PORT .* not set"):
        D.init_from_env()
    monkeypatch.setenv("RANK", "five")
    with pytest.raises(D.DistributedError, match="RANK='five' is not an integer"):
        D.init_from_env()


def test_sync_batchnorm_is_refused_on_cpu_and_a_no_op_in_one_process():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    cfg = saf.train.TrainConfig(sync_batchnorm=True)
    assert json.loads(json.dumps(cfg.as_dict()))["sync_batchnorm"] is True
    fit_mod = importlib.import_module("sparse_adv_fast.train.fit")
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA"):
        fit_mod._sync_batchnorm(net, cfg, D.World(rank=0, size=2), torch.device("cpu"))
    fit_mod._sync_batchnorm(net, cfg, D.SINGLE, torch.device("cpu"))
    assert type(net[1]) is nn.BatchNorm2d  # unchanged either way
    data = TensorDataset(torch.rand(8, 1, 4, 4), torch.randint(0, 2, (8,)))
    saf.train.fit(net, DataLoader(data, batch_size=4), "natural", epochs=1,
                  sync_batchnorm=True, progress=False)
