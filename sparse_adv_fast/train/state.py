"""RNG state capture / restore for exact resume (torch, CUDA, numpy, python, loaders)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..seeding import derive_seed


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader shuffles / seeds workers with."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None),
                  getattr(loader, "batch_sampler", None),
                  getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def epoch_seed(seed: int, epoch: int, index: int = 0) -> int:
    """Seed of generator ``index``'s shuffle in ``epoch``: a function of these three only."""
    return derive_seed(seed, epoch, index)


def seed_epoch(generators: list[torch.Generator], seed: int, epoch: int) -> None:
    """Reseed the loader generators for ``epoch``, whatever they drew before.

    A loader cached by the caller (shared by several runs, or rebuilt after a restart)
    then shuffles epoch ``e`` the same way every time.
    """
    for i, g in enumerate(generators):
        g.manual_seed(epoch_seed(seed, epoch, i))


@contextmanager
def preserved(generators: list[torch.Generator]) -> Iterator[None]:
    """Give the generators back in the state they had on entry (also on an exception).

    ``fit`` reseeds a loader's generator per epoch; leaving it reseeded would make the
    next run's default seed (the generator's ``initial_seed``) depend on this one.
    """
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, s in zip(generators, states, strict=True):
            g.set_state(s)


def capture(generators: list[torch.Generator]) -> dict[str, Any]:
    """Every RNG state that training consumes, as plain tensors / numbers (weights_only-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "loaders": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any], generators: list[torch.Generator]) -> None:
    """Inverse of :func:`capture`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    saved = state.get("loaders", [])
    if len(saved) != len(generators):
        raise ValueError(
            f"the train loader has {len(generators)} RNG generator(s) but the checkpoint "
            f"saved {len(saved)}; resume with the same kind of loader"
        )
    for g, s in zip(generators, saved, strict=True):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["capture", "epoch_seed", "loader_generators", "preserved", "restore", "seed_epoch"]
