"""select_restarts against a hand-written per-sample loop and hand-made cases."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from sparse_adv_fast.ops.restart_select import restart_index, select_restarts


def _loop_select(cands, losses, restarts, fooled=None):
    """Oracle: the rule spelled out one sample at a time."""
    b = cands.shape[0] // restarts
    out = []
    for i in range(b):
        rows = [r * b + i for r in range(restarts)]
        pick = None
        if fooled is not None:
            pick = next((j for j in rows if bool(fooled[j])), None)
        if pick is None:
            best = rows[0]
            for j in rows[1:]:
                if losses[j] > losses[best]:  # strict: earliest restart wins ties
                    best = j
            pick = best
        out.append(cands[pick])
    return torch.stack(out)


@pytest.mark.parametrize("restarts,b", [(1, 3), (2, 1), (3, 5), (4, 7)])
@pytest.mark.parametrize("with_fooled", [False, True])
def test_matches_loop(restarts, b, with_fooled):
    cands = torch.randn(restarts * b, 3, 4, 2)
    losses = torch.randn(restarts * b)
    fooled = torch.rand(restarts * b) < 0.3 if with_fooled else None
    got = select_restarts(cands, losses, restarts, fooled)
    assert got.shape == (b, 3, 4, 2)
    assert torch.equal(got, _loop_select(cands, losses, restarts, fooled))


def test_ties_go_to_earliest_restart():
    cands = torch.arange(6.0).reshape(6, 1)  # R=3, B=2: row value = row index
    losses = torch.tensor([1.0, 5.0, 1.0, 5.0, 0.0, 5.0])
    assert select_restarts(cands, losses, 3).flatten().tolist() == [0.0, 1.0]
    assert torch.equal(select_restarts(cands, losses, 3), _loop_select(cands, losses, 3))


def test_fooled_beats_higher_loss_and_first_fooled_wins():
    # R=3, B=3. Sample 0: restarts 1 and 2 fool -> restart 1 despite restart 0's loss.
    # Sample 1: none fools -> highest loss (restart 2). Sample 2: only restart 0 fools.
    cands = torch.arange(9.0).reshape(9, 1)
    losses = torch.tensor([9.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 9.0])
    fooled = torch.tensor([False, False, True, True, False, False, True, False, False])
    got = select_restarts(cands, losses, 3, fooled).flatten().tolist()
    assert got == [3.0, 7.0, 2.0]
    assert restart_index(losses, 3, fooled).tolist() == [1, 2, 0]


def test_single_restart_is_identity_copy():
    cands = torch.randn(4, 2)
    got = select_restarts(cands, torch.randn(4), 1)
    assert torch.equal(got, cands)


def test_batched_rows_layout_is_restart_major():
    # Stack restarts like an attack does: torch.cat of R tensors of [B, ...].
    per_restart = [torch.full((2, 3), float(r)) for r in range(3)]
    losses = torch.tensor([0.0, 2.0, 5.0, 1.0, 1.0, 0.5])  # sample 0 -> r1, sample 1 -> r0
    got = select_restarts(torch.cat(per_restart), losses, 3)
    assert got[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"restarts": 0}, ValueError, "restarts must be >= 1"),
        ({"restarts": 2.0}, TypeError, "restarts must be an int"),
        ({"restarts": 4}, ValueError, "not a multiple"),
        ({"losses": torch.zeros(5)}, ValueError, "losses must have shape"),
        ({"losses": torch.zeros(6, dtype=torch.bool)}, TypeError, "real numbers"),
        ({"fooled": torch.zeros(6)}, TypeError, "fooled must be a bool"),
        ({"fooled": torch.zeros(3, dtype=torch.bool)}, ValueError, "fooled must have shape"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = {"candidates": torch.zeros(6, 2), "losses": torch.zeros(6), "restarts": 3,
            "fooled": None}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        select_restarts(**args)


@requires_cuda
def test_cuda_matches_loop():
    cands = torch.randn(3 * 5, 4)
    losses = torch.randn(15)
    fooled = torch.rand(15) < 0.3
    got = select_restarts(cands.cuda(), losses.cuda(), 3, fooled.cuda())
    assert torch.equal(got.cpu(), _loop_select(cands, losses, 3, fooled))


def test_row_chunks_cover_rows_in_whole_batches():
    from sparse_adv_fast.ops.restart_select import MIN_CPU_ROWS, row_chunks

    cpu = torch.device("cpu")
    for b, r in ((1, 4), (5, 3), (16, 4), (20, 3), (64, 2), (7, 1)):
        chunks = row_chunks(r * b, r, cpu)
        covered = [i for s in chunks for i in range(s.start, s.stop)]
        assert covered == list(range(r * b)), (b, r)
        for s in chunks[:-1]:  # full chunks: whole batches of >= MIN_CPU_ROWS rows
            size = s.stop - s.start
            assert size % b == 0 and size >= min(MIN_CPU_ROWS, r * b), (b, r, size)
        assert max(s.stop - s.start for s in chunks) <= max(b, MIN_CPU_ROWS + b), (b, r)
    assert row_chunks(80, 4, torch.device("cuda")) == [slice(0, 80)]  # GPUs take all rows
    assert row_chunks(0, 3, cpu) == []
