"""Iterative magnitude pruning with weight rewinding (lottery tickets).

Frankle & Carbin 2019; Frankle et al. 2019 ("Stabilizing the lottery ticket hypothesis")
for rewinding to an early training state rather than to the initialisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ..nn import apply_masks, masked_layers, masks
from ._select import check_scope, check_sparsity, masked_model
from .magnitude import magnitude


@dataclass
class Ticket:
    """One IMP round: the target sparsity, the masks and the rewound (masked) weights."""

    sparsity: float
    masks: dict[str, Tensor]
    state_dict: dict[str, Tensor]

    def to_dict(self) -> dict[str, object]:
        """Plain dict of floats and tensors: ``torch.save`` it, ``torch.load`` it with
        ``weights_only=True``, rebuild with :meth:`from_dict`."""
        return {"sparsity": float(self.sparsity), "masks": dict(self.masks),
                "state_dict": dict(self.state_dict)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Ticket:
        """The Ticket saved by :meth:`to_dict`."""
        missing = {"sparsity", "masks", "state_dict"} - set(d)
        if missing:
            raise ValueError(f"Ticket.from_dict: missing keys {sorted(missing)}")
        return cls(float(d["sparsity"]), dict(d["masks"]), dict(d["state_dict"]))  # type: ignore[arg-type]

    @property
    def achieved(self) -> float:
        """Fraction of weights pruned by ``masks``."""
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        return pruned / max(1, sum(m.numel() for m in self.masks.values()))


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mask_keys(model: nn.Module) -> set[str]:
    return {f"{n}.weight_mask" if n else "weight_mask" for n in masked_layers(model)}


def _rewind(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load ``state`` but keep the model's current masks (a state's masks are ignored)."""
    keep = masks(model)
    drop = _mask_keys(model)
    model.load_state_dict({k: v for k, v in state.items() if k not in drop}, strict=False)
    apply_masks(model, keep)


def _check_state(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    own = model.state_dict()
    drop = _mask_keys(model)
    missing = sorted(set(own) - set(state) - drop)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{where}: rewind_state does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{where}: rewind_state[{k!r}] has shape {tuple(v.shape)}, the model's "
                f"is {tuple(own[k].shape)}"
            )


def imp(
    model: nn.Module,
    train_fn: Callable[[nn.Module], object],
    *,
    sparsities: Sequence[float] = (0.5, 0.8, 0.9),
    rewind_state: Mapping[str, Tensor] | None = None,
    rewind_fn: Callable[[nn.Module], object] | None = None,
    scope: str = "global",
    on_ticket: Callable[[Ticket], object] | None = None,
    start_from: Sequence[Ticket] = (),
) -> list[Ticket]:
    """Iterative magnitude pruning with rewinding; one :class:`Ticket` per sparsity.

    For each target in ``sparsities`` (strictly increasing, each in [0, 1)):
    ``train_fn(model)`` trains in place (the caller's loop, e.g. adversarial training),
    :func:`magnitude` prunes to the target (``scope``), then the surviving weights are
    rewound and the mask kept. Masks are nested: pruned weights stay pruned.

    Rewinding: ``rewind_state`` (a state_dict saved early in training, e.g. after k
    iterations; its mask entries are ignored) is loaded, or ``rewind_fn(model)`` is called
    to rewind in place (e.g. to a state ``train_fn`` captured, or to also reset an
    optimizer); masks are re-applied after either. With neither, the model's state at the
    call is used (rewinding to initialisation, the original lottery ticket).

    ``on_ticket(ticket)`` is called after each round (checkpoint it). To resume a killed
    run, pass the finished tickets as ``start_from``: they must be the first targets of
    ``sparsities``; the model is loaded from the last one and the next round starts. Without
    an explicit rewind, the last ticket's state is the rewind point (the same weights, as
    masks are nested). Returns ``start_from`` plus the new tickets; the model ends in the
    last ticket's state (rewound, masked), ready for the final training.
    """
    if not callable(train_fn):
        raise TypeError(f"imp: train_fn must be callable, got {train_fn!r}")
    if rewind_fn is not None and not callable(rewind_fn):
        raise TypeError(f"imp: rewind_fn must be callable, got {rewind_fn!r}")
    if rewind_state is not None and rewind_fn is not None:
        raise ValueError("imp: pass rewind_state or rewind_fn, not both")
    if on_ticket is not None and not callable(on_ticket):
        raise TypeError(f"imp: on_ticket must be callable, got {on_ticket!r}")
    targets = [check_sparsity(s, "imp") for s in sparsities]
    if not targets:
        raise ValueError("imp: sparsities is empty")
    if any(b <= a for a, b in zip(targets, targets[1:], strict=False)):
        raise ValueError(f"imp: sparsities must be strictly increasing, got {list(sparsities)}")
    check_scope(scope, "imp")
    done = list(start_from)
    for i, t in enumerate(done):
        if not isinstance(t, Ticket):
            raise TypeError(f"imp: start_from[{i}] is not a Ticket")
        if i >= len(targets) or abs(t.sparsity - targets[i]) > 1e-12:
            raise ValueError(
                f"imp: start_from[{i}] has sparsity {t.sparsity}, but sparsities[{i}] is "
                f"{targets[i] if i < len(targets) else 'absent'}"
            )

    model, _ = masked_model(model, "imp")
    if rewind_state is not None:
        _check_state(model, rewind_state, "imp")
    if done:
        _check_state(model, done[-1].state_dict, "imp")
        apply_masks(model, done[-1].masks)
        _rewind(model, done[-1].state_dict)
    if rewind_state is None and rewind_fn is None:
        rewind_state = _clone_state(model)

    for target in targets[len(done):]:
        train_fn(model)
        magnitude(model, target, scope=scope)
        if rewind_fn is not None:
            kept = masks(model)
            rewind_fn(model)
            apply_masks(model, kept)
        else:
            _rewind(model, rewind_state)
        ticket = Ticket(sparsity=target, masks=masks(model), state_dict=_clone_state(model))
        done.append(ticket)
        if on_ticket is not None:
            on_ticket(ticket)
    return done
