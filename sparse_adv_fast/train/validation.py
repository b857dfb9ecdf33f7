"""Cheap per-epoch validation: clean accuracy and PGD accuracy on fixed batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from .. import attacks
from .. import distributed as D

Batch = tuple[Tensor, Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own ``training`` flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def fixed_batches(loader: Iterable, n: int) -> list[Batch]:
    """The first ``n`` batches of ``loader``, kept in memory so every epoch sees the same."""
    out: list[Batch] = []
    for i, (x, y) in enumerate(loader):
        if i >= n:
            break
        out.append((x, y))
    return out


def _fraction(correct: int, seen: int, world: D.World, device: torch.device) -> float:
    correct, seen = D.all_sum([correct, seen], world, device)
    return correct / max(seen, 1)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, *, device: torch.device,
             max_batches: int | None = None, world: D.World = D.SINGLE) -> float:
    """Clean top-1 accuracy in eval mode (training mode restored). Over a ``world`` of
    ranks, batch ``i`` is scored by rank ``i % size`` and the counts are summed, so the
    result is the single-process one on every rank."""
    correct = seen = 0
    with eval_mode(model):
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if i % world.size != world.rank:
                continue
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            seen += y.shape[0]
    return _fraction(correct, seen, world, device)


def pgd_accuracy(model: nn.Module, batches: list[Batch], *, eps: float, alpha: float,
                 steps: int, norm: str, device: torch.device,
                 world: D.World = D.SINGLE) -> float:
    """Accuracy under ``saf.attacks.pgd`` (one random start) on ``batches`` (shared out
    over a ``world`` of ranks like :func:`accuracy`)."""
    correct = seen = 0
    for x, y in batches[world.rank::world.size]:
        x, y = x.to(device), y.to(device)
        x_adv = attacks.pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm,
                            random_start=True)
        with eval_mode(model), torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y).sum())
        seen += y.shape[0]
    return _fraction(correct, seen, world, device)


__all__ = ["accuracy", "fixed_batches", "pgd_accuracy"]
