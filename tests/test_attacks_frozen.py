"""The frozen inference graph behind Square's score queries: used only when it answers like
the model (oracle: the eager model's logits), rebuilt when the weights change, and never
the judge of success."""

from __future__ import annotations

import sys

import torch
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.attacks import _frozen, square


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return saf.models.small_cnn().eval()


def test_graph_answers_like_the_model_on_any_batch_size():
    model, x = _cnn(), torch.rand(17, 1, 8, 8)
    with torch.no_grad():
        fwd = _frozen.query_forward(model, x)
        assert fwd is not model  # a plain CNN traces and freezes
        for n in (17, 5, 1):
            torch.testing.assert_close(fwd(x[:n]), model(x[:n]), rtol=1e-5, atol=1e-6)
        assert _frozen.query_forward(model, x) is fwd  # cached


def test_masked_layers_trace_through_their_custom_ops():
    model = saf.prune.magnitude(saf.sparsify(_cnn(1)), 0.8)
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        fwd = _frozen.query_forward(model, x)
        torch.testing.assert_close(fwd(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_weight_change_rebuilds_the_graph():
    model, x = _cnn(2), torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        old = _frozen.query_forward(model, x)
        model[-1].weight.mul_(-3.0)  # in place: same storage, new version
        new = _frozen.query_forward(model, x)
        assert new is not old
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-6)
        model.load_state_dict(_cnn(3).state_dict())
        torch.testing.assert_close(_frozen.query_forward(model, x)(x), model(x),
                                   rtol=1e-5, atol=1e-6)


class _BakedBatch(nn.Module):
    """``int(x.shape[0])`` becomes a constant in a trace: the one-row probe must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x):
        return self.lin(x.reshape(int(x.shape[0]), -1))


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x):
        return {"logits": self.lin(x.flatten(1))}


def test_models_the_graph_gets_wrong_stay_eager():
    x = torch.rand(8, 1, 4, 4)
    for model in (_BakedBatch().eval(), _DictOut().eval()):
        with torch.no_grad():
            assert _frozen.query_forward(model, x) is model


def test_off_training_mode_and_cuda_only_inputs_stay_eager():
    model, x = _cnn(4), torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert _frozen.query_forward(model, x, enabled=False) is model
        assert _frozen.query_forward(model.train(), x) is model
        assert _frozen.query_forward(model.eval(), x[:0]) is model


class _Liar(nn.Module):
    """Always class 0 for the eager model; the test hands square a graph that claims
    class 1, the way a graph that lost a Python-side branch would."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_square_confirms_with_the_model_what_the_graph_claims(monkeypatch):
    model = _Liar().eval()
    x, y = torch.rand(5, 1, 4, 4), torch.zeros(5, dtype=torch.long)

    def lying_graph(xx):
        z = model.lin(xx.flatten(1))
        return z.flip(1)  # says every point is class 1: "fooled" at once

    module = sys.modules["sparse_adv_fast.attacks.square"]  # the function shadows it
    monkeypatch.setattr(module, "query_forward", lambda m, xx, enabled=True: lying_graph)
    adv = square(model, x, y, eps=0.1, queries=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, x)  # nothing fools the real model; no claim is taken


def test_square_with_and_without_the_graph_breaks_the_points_the_closed_form_says():
    # z0 - z1 = mean(x) - 0.5 and class 2 is never predicted: a point is breakable in the
    # L∞ ball exactly when its mean is below 0.5 + eps. Points 0.02-0.04 above the
    # boundary fall, points 0.15-0.2 above it (more than eps = 0.1) stand.
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        lin[1].weight.zero_()
        lin[1].weight[0] = 1.0 / 16
        lin[1].bias.copy_(torch.tensor([0.0, 0.5, -10.0]))
    shift = torch.tensor([0.02, 0.03, 0.04, 0.15, 0.18, 0.2])
    x = (0.5 + shift[:, None, None, None]).expand(6, 1, 4, 4).contiguous()
    y = torch.zeros(6, dtype=torch.long)
    for frozen in (True, False):
        adv = square(lin, x, y, eps=0.1, queries=400, frozen_queries=frozen,
                     generator=torch.Generator().manual_seed(1))
        assert (adv - x).abs().max() <= 0.1 + 1e-6
        with torch.no_grad():
            broken = lin(adv).argmax(1) != y
        assert broken.tolist() == [True] * 3 + [False] * 3, frozen
