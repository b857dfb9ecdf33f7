"""Data-parallel throughput: N gloo processes against 1, for a PGD-AT epoch and a robust
evaluation, in images/s, on the same global batch and the same total number of CPU threads.

What is timed, inside the ranks (after a barrier, until a barrier, so process start-up and
imports are not counted):

* ``at_epoch``  one ``saf.train.fit(..., "pgd", epochs=1)`` epoch: PGD-7 inner attack on each
  rank's shard, DDP all-reduce of the gradients, the per-step mask check;
* ``evaluate``  ``saf.train.evaluate(..., attacks=("pgd10",), seed=0)``: batch *i* on rank
  *i % N*, per-sample results gathered.

Model: ``saf.models.resnet18(width=1/4)`` on CIFAR shapes, layer-wise 90 % sparse (first conv
and last linear dense), random data. Global batch ``SAF_DIST_BATCH`` (default 32),
``SAF_DIST_BATCHES`` batches (default 4), ``SAF_DIST_ROUNDS`` timed rounds (default 3)
after one warm-up; ``extra_info`` holds the median images/s and the spread over the rounds.

Each world gets ``os.cpu_count() // N`` torch threads per rank (``SAF_DIST_THREADS`` total
to override), so 1 process and N processes use the same cores: on a machine with 2 cores
two ranks cannot beat one rank with two threads, and the ratio measures the cost of the
collectives and of smaller per-rank GEMMs. On a multi-GPU node (``nccl``, one GPU a rank)
the same file measures real scale-out.

Run: ``python -m pytest benchmarks/bench_distributed.py --benchmark-only -s``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import sparse_adv_fast as saf

BATCH = int(os.environ.get("SAF_DIST_BATCH", "32"))
BATCHES = int(os.environ.get("SAF_DIST_BATCHES", "4"))
ROUNDS = int(os.environ.get("SAF_DIST_ROUNDS", "3"))
THREADS = int(os.environ.get("SAF_DIST_THREADS", str(os.cpu_count() or 1)))
EPS = 8 / 255
RESULTS: dict[tuple[str, int], dict[str, float]] = {}

pytestmark = [pytest.mark.end_to_end,
              pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = saf.models.resnet18(width=0.25)
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    saf.sparsify(net, exclude=(convs[0], linears[-1]))
    return saf.prune.magnitude(net, 0.9, scope="layer")


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    n = BATCH * BATCHES
    data = TensorDataset(torch.rand(n, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=BATCH, shuffle=False)


def _at_epoch(model, loader, group) -> None:
    saf.train.fit(model, loader, "pgd", epochs=1, lr=0.01, eps=EPS, steps=7,
                  progress=False, process_group=group)


def _evaluate(model, loader, group) -> None:
    saf.train.evaluate(model, loader, attacks=("pgd10",), eps=EPS, seed=0,
                       process_group=group)


TASKS = {"at_epoch": _at_epoch, "evaluate": _evaluate}


def _rank(rank: int, world: int, store: str, out: str, task: str) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.set_num_threads(max(1, THREADS // world))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        times = []
        for i in range(ROUNDS + 1):  # the first round warms caches and dispatch
            model, loader = _model(), _loader()  # the same start every round, not timed
            dist.barrier()
            t = time.perf_counter()
            TASKS[task](model, loader, dist.group.WORLD)
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t)
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def _run(task: str, world: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), out, task),
                           nprocs=world, start_method="spawn")
        return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("task", list(TASKS))
def test_data_parallel(benchmark, task, world):
    benchmark.group = f"distributed-{task}"
    state: dict = {}
    benchmark.pedantic(lambda: state.update(times=_run(task, world)), rounds=1, iterations=1)
    speeds = [BATCH * BATCHES / t for t in state["times"]]
    row = {"images_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
           "ranks": world, "threads_per_rank": max(1, THREADS // world)}
    benchmark.extra_info.update(row)
    RESULTS[(task, world)] = row
    print(f"\n{task} world={world}: {row['images_per_s']:.1f} images/s "
          f"({row['min']:.1f}-{row['max']:.1f}), {row['threads_per_rank']} threads/rank")
    if (task, 1) in RESULTS and world != 1:
        print(f"{task}: {world} ranks / 1 rank = "
              f"{row['images_per_s'] / RESULTS[(task, 1)]['images_per_s']:.2f}x")
