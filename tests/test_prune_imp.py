"""IMP with rewinding on a tiny model with a deterministic train_fn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.prune import Ticket

pytestmark = pytest.mark.usefixtures("torch_backend")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _trainer(seed: int = 5):
    """Adds a fixed tensor to every parameter: deterministic, and changes magnitudes."""
    g = torch.Generator().manual_seed(seed)
    calls = []

    def train(model: nn.Module) -> None:
        calls.append(saf.sparsity(model))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            model[1].running_mean.add_(1.0)

    return train, calls


def _n(model) -> int:
    return sum(m.weight.numel() for m in saf.nn.masked_layers(model).values())


def test_masks_nested_rewound_exactly_and_counts():
    model = saf.sparsify(_net())
    rewind = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # training "after the rewind point" happened already
        for p in model.parameters():
            p.mul_(2.0)
    train, calls = _trainer()
    seen = []
    tickets = saf.prune.imp(model, train, sparsities=(0.5, 0.8, 0.9), rewind_state=rewind,
                            on_ticket=seen.append)
    assert [t.sparsity for t in tickets] == [0.5, 0.8, 0.9] and seen == tickets
    n = _n(model)
    assert calls == [0.0, round(0.5 * n) / n, round(0.8 * n) / n]  # trains from the ticket
    prev = None
    for t in tickets:
        assert isinstance(t, Ticket)
        assert sum(int((~m).sum()) for m in t.masks.values()) == round(t.sparsity * n)
        assert t.achieved == round(t.sparsity * n) / n
        if prev is not None:
            for k in t.masks:
                assert not torch.any(t.masks[k] & ~prev.masks[k])
        for name, m in t.masks.items():
            assert torch.equal(t.state_dict[f"{name}.weight"], rewind[f"{name}.weight"] * m)
            assert torch.equal(t.state_dict[f"{name}.weight_mask"], m)
            assert torch.equal(t.state_dict[f"{name}.bias"], rewind[f"{name}.bias"])
        assert torch.equal(t.state_dict["1.running_mean"], rewind["1.running_mean"])
        prev = t
    # the model ends as the last ticket
    for k, v in model.state_dict().items():
        assert torch.equal(v, tickets[-1].state_dict[k]), k


def test_masks_follow_trained_magnitudes():
    model = _net()  # dense: sparsified by imp
    rewind = {k: v.clone() for k, v in saf.sparsify(model).state_dict().items()}
    trained = {}

    def train(m):
        with torch.no_grad():
            m[0].weight.copy_(torch.arange(48.0).reshape(8, 6) * m[0].weight_mask)
            m[3].weight.copy_(-torch.arange(24.0).reshape(3, 8) * m[3].weight_mask)
        trained["w"] = [m[0].weight.clone(), m[3].weight.clone()]

    (t,) = saf.prune.imp(model, train, sparsities=(0.5,), rewind_state=rewind)
    w = torch.cat([x.abs().flatten() for x in trained["w"]])
    keep = torch.cat([t.masks["0"].flatten(), t.masks["3"].flatten()])
    assert torch.equal(keep, w >= w.sort().values[36])  # lowest 36 of 72 pruned


def test_default_rewinds_to_state_at_call_and_resume_matches_full_run():
    torch.manual_seed(3)
    base = saf.sparsify(_net())
    init = {k: v.clone() for k, v in base.state_dict().items()}
    train, _ = _trainer(seed=7)
    full = saf.prune.imp(base, train, sparsities=(0.3, 0.6, 0.85))
    for t in full:
        for name, m in t.masks.items():
            assert torch.equal(t.state_dict[f"{name}.weight"], init[f"{name}.weight"] * m)

    # a run killed after round 1, resumed on a fresh model with the same train stream
    train2, _ = _trainer(seed=7)
    fresh = saf.sparsify(_net())
    fresh.load_state_dict(init)
    first = saf.prune.imp(fresh, train2, sparsities=(0.3,))
    again = saf.sparsify(_net())
    resumed = saf.prune.imp(again, train2, sparsities=(0.3, 0.6, 0.85), start_from=first)
    assert len(resumed) == 3 and resumed[0] is first[0]
    for a, b in zip(full, resumed, strict=True):
        for k in a.masks:
            assert torch.equal(a.masks[k], b.masks[k])
        for k in a.state_dict:
            assert torch.equal(a.state_dict[k], b.state_dict[k])


def test_layer_scope_and_ticket_checkpoint_round_trip(tmp_path):
    model = saf.sparsify(_net())
    train, _ = _trainer()
    saved = []
    tickets = saf.prune.imp(model, train, sparsities=(0.5, 0.75), scope="layer",
                            on_ticket=lambda t: saved.append(t.to_dict()))
    for t in tickets:
        for m in t.masks.values():
            assert int((~m).sum()) == round(t.sparsity * m.numel())
    torch.save(saved, tmp_path / "tickets.pt")
    loaded = [Ticket.from_dict(d) for d in torch.load(tmp_path / "tickets.pt", weights_only=True)]
    assert [t.sparsity for t in loaded] == [0.5, 0.75]
    for a, b in zip(tickets, loaded, strict=True):
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_rewind_fn_is_called_and_masks_kept():
    model = saf.sparsify(_net())
    zero = {k: torch.zeros_like(v) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}
    calls = []

    def rewind(m):
        calls.append(1)
        m.load_state_dict(zero)  # includes all-ones masks: imp must re-apply the ticket's

    train, _ = _trainer()
    tickets = saf.prune.imp(model, train, sparsities=(0.4, 0.7), rewind_fn=rewind)
    assert len(calls) == 2
    assert torch.equal(saf.masks(model)["0"], tickets[-1].masks["0"])
    assert saf.sparsity(model) == tickets[-1].achieved


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsities": (0.5, 0.5)}, "increasing"),
        ({"sparsities": (0.5, 1.0)}, "sparsity"),
        ({"sparsities": ()}, "empty"),
        ({"scope": "net"}, "scope"),
        ({"rewind_state": {}, "rewind_fn": lambda m: None}, "not both"),
        ({"rewind_state": {"nope": torch.zeros(1)}}, "rewind_state"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = saf.sparsify(_net())
    with pytest.raises(ValueError, match=match):
        saf.prune.imp(model, lambda m: None, **kwargs)
    assert saf.sparsity(model) == 0.0


def test_start_from_must_match_sparsities():
    model = saf.sparsify(_net())
    t = Ticket(0.4, saf.masks(model), model.state_dict())
    with pytest.raises(ValueError, match="start_from"):
        saf.prune.imp(model, lambda m: None, sparsities=(0.5, 0.8), start_from=[t])
