"""DDP on CPU (gloo): masks broadcast from rank 0 like any buffer, pruned weights stay zero."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparse_adv_fast as saf


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # ranks start from different weights and masks
        model = saf.sparsify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
        g = torch.Generator().manual_seed(100 + rank)
        saf.apply_masks(model, {
            n: torch.rand(m.weight.shape, generator=g) < 0.5
            for n, m in saf.nn.masked_layers(model).items()
        })
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            ddp(torch.randn(4, 6)).sum().backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_broadcasts_masks_and_keeps_pruned_weights_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ADV_FAST_BACKEND", "torch")
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    # rank 0's masks won (DDP broadcasts buffers from rank 0) and its zeros survived training
    for k in a:
        if k.endswith("weight_mask"):
            assert torch.all(a[k.replace("weight_mask", "weight")][~a[k]] == 0)
