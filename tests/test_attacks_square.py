"""Square Attack: the threat model (never outside the eps-ball or the box), black-box
access only (forwards without gradients, a bounded number of queries), the paper's
p-schedule, and strength against torchattacks' Square on a small trained model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_adv_fast.attacks import Square, square
from sparse_adv_fast.attacks.square import p_schedule
from tests.test_autoattack import at_blobs

pytestmark = pytest.mark.usefixtures("one_thread")


class QueryLog(nn.Module):
    """Wraps a model; records every query and fails on any gradient access."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        assert not torch.is_grad_enabled(), "Square must only query the model"
        assert not x.requires_grad
        self.rows += x.shape[0]
        return self.model(x)


def test_p_schedule_is_the_papers():
    # p_init halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000.
    assert [p_schedule(i) for i in (0, 10, 11, 50, 51, 200, 201)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]
    assert p_schedule(4000) == pytest.approx(0.8 / 64)
    assert p_schedule(4999) == pytest.approx(0.8 / 128)
    assert p_schedule(9000) == pytest.approx(0.8 / 512)
    # Rescaled to a 1000-query budget, iteration 100 sits where 1000 sits in 10 000.
    assert p_schedule(101, 1000, rescale=True) == pytest.approx(0.8 / 32)


@pytest.mark.parametrize("shape", [(1, 6, 6), (2, 5, 7), (36,)])
def test_threat_model_and_black_box_access(shape):
    model, x, y = at_blobs()
    x, y = x[:40], y[:40]
    d = 36
    net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), d),
                        model[1:]) if shape != (1, 6, 6) else model
    torch.manual_seed(0)
    xs = torch.rand(40, *shape)
    xs[:, ..., 0] = 0.0  # inputs at the box edges: clipping must hold
    xs[:, ..., -1] = 1.0
    with torch.no_grad():
        ys = net(xs).argmax(1)
    log = QueryLog(net)
    eps, queries = 0.1, 150
    torch.manual_seed(1)
    x_adv = square(log, xs, ys, eps=eps, queries=queries)
    assert x_adv.shape == xs.shape
    assert float((x_adv - xs).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # One clean query + (1 init + queries) per attacked sample at most.
    assert log.rows <= 40 + 40 * (queries + 1)
    with torch.no_grad():
        fooled = net(x_adv).argmax(1) != ys
    assert bool(fooled.any())  # it does something
    assert torch.equal(x_adv[~fooled], xs[~fooled])  # as the reference: x where it failed
    torch.manual_seed(1)
    again = Square(net, eps=eps, queries=queries)(xs, ys)
    torch.manual_seed(1)
    assert torch.equal(again, square(net, xs, ys, eps=eps, queries=queries))  # seeded


def test_at_least_as_strong_as_torchattacks_square():
    import torchattacks  # the peer oracle (dev extra)
    model, x, y = at_blobs()
    x, y = x[:120], y[:120]
    eps, queries = 0.12, 1000
    torch.manual_seed(0)
    ours = square(model, x, y, eps=eps, queries=queries)
    ta = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=queries, n_restarts=1,
                             seed=0, resc_schedule=False)
    theirs = ta(x, y)
    with torch.no_grad():
        acc = [(model(a).argmax(1) == y).float().mean().item() for a in (x, ours, theirs)]
    assert acc[2] < acc[0] - 0.1  # the peer breaks a good share
    # Per-sample windows and no repeated query make ours stronger per query than the
    # reference's one window per batch; allow 2 of 120 samples of random-search noise.
    assert acc[1] <= acc[2] + 2 / 120 + 1e-9


def test_bad_arguments():
    model, x, y = at_blobs()
    with pytest.raises(ValueError, match="linf"):
        square(model, x[:2], y[:2], eps=0.1, norm="l2")
    with pytest.raises(ValueError, match="p_init"):
        square(model, x[:2], y[:2], eps=0.1, p_init=0.0)
    with pytest.raises(ValueError, match="eps"):
        Square(model, eps=-1.0)
