"""Robust-accuracy evaluation: clean, per attack and the per-sample worst case."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..seeding import derive_seed
from . import _hygiene as H
from .autoattack import AutoAttack, Tally, warn_if_masking
from .callables import APGD, FGSM, PGD

AttackFn = Callable[[Tensor, Tensor], Tensor]
_PGD_NAME = re.compile(r"^pgd(\d+)(?:x(\d+))?$")
SUITES = ("pgd20x5", "pgd10", "fgsm", "apgd", "apgd-ce", "apgd-dlr", "autoattack",
          "autoattack-rand")


def suite(name: str, model: nn.Module, *, eps: float, norm: str = "linf") -> dict[str, AttackFn]:
    """The named attack(s) as ``{report name: atk(x, y)}``.

    ``"pgd<k>"`` / ``"pgd<k>x<r>"``: PGD-k with r restarts, step ``eps/4``, random start
    (``"pgd20x5"`` and ``"pgd10"`` are the standard ones); ``"fgsm"``; ``"apgd"``:
    APGD-CE and APGD-DLR (100 steps), reported as ``"apgd-ce"`` and ``"apgd-dlr"``;
    ``"autoattack"``: the standard AutoAttack cascade (APGD-CE, APGD-T, FAB-T, Square);
    ``"autoattack-rand"``: APGD-CE and APGD-DLR with 20 EOT iterations, for randomised
    models (:class:`sparse_adv_fast.attacks.autoattack.AutoAttack`).
    """
    if name in ("autoattack", "autoattack-rand"):
        version = "rand" if name == "autoattack-rand" else "standard"
        return {name: AutoAttack(model, eps=eps, norm=norm, version=version)}
    m = _PGD_NAME.match(name)
    if m:
        steps, restarts = int(m.group(1)), int(m.group(2) or 1)
        return {name: PGD(model, eps=eps, alpha=eps / 4 if eps > 0 else 1.0, steps=steps,
                          norm=norm, restarts=restarts, random_start=True)}
    if name == "fgsm":
        return {name: FGSM(model, eps=eps, norm=norm)}
    if name in ("apgd", "apgd-ce", "apgd-dlr"):
        out = {}
        if name != "apgd-dlr":
            out["apgd-ce"] = APGD(model, eps=eps, norm=norm, loss="ce")
        if name != "apgd-ce":
            out["apgd-dlr"] = APGD(model, eps=eps, norm=norm, loss="dlr")
        return out
    raise ValueError(f"evaluate: unknown attack {name!r}; use one of {SUITES}, 'pgd<k>', "
                     "'pgd<k>x<r>', or pass a dict name -> callable atk(x, y)")


def _resolve(
    attacks: Sequence[str] | Mapping[str, AttackFn] | str, model: nn.Module, eps: float,
    norm: str,
) -> dict[str, AttackFn]:
    if isinstance(attacks, str):
        attacks = (attacks,)
    if isinstance(attacks, Mapping):
        for k, v in attacks.items():
            if not callable(v):
                raise TypeError(f"evaluate: attack {k!r} is not callable (got "
                                f"{type(v).__name__})")
        return dict(attacks)
    out: dict[str, AttackFn] = {}
    for name in attacks:
        if not isinstance(name, str):
            raise TypeError(f"evaluate: attack names must be strings, got {name!r}")
        out.update(suite(name.lower(), model, eps=eps, norm=norm))
    return out


def _batch(item: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError("evaluate: the loader must yield (x, y) batches, got "
                        f"{type(item).__name__}")
    return item[0].to(device), item[1].to(device)


def evaluate(
    model: nn.Module, loader: Iterable, attacks: Sequence[str] | Mapping[str, AttackFn] = (
        "pgd20x5", "apgd"), *, eps: float = 8 / 255, norm: str = "linf",
    device: torch.device | str | None = None, max_batches: int | None = None,
    progress: bool = False, seed: int | None = None, process_group: Any = None,
) -> dict[str, Any]:
    """Clean and robust accuracy of ``model`` over ``loader`` (any iterable of ``(x, y)``).

    Returns ``{"clean": acc, "robust": {name: acc}, "worst_case": acc, "n": count}``. A
    sample counts as robust to an attack when it is classified correctly both clean and on
    that attack's output; ``worst_case`` counts the samples robust to every attack (the
    per-sample AND). Only clean-correct samples are attacked. The model is evaluated in
    eval mode with frozen parameters (restored afterwards).

    ``attacks=("autoattack",)`` (``eps`` as the threat radius) runs the AutoAttack cascade:
    each stage only on the points every earlier stage left robust. ``robust["autoattack"]``
    is its final robust accuracy, and ``result["autoattack"]`` holds ``robust_after``
    (accuracy after each stage, as the reference logs it), ``broken_by`` (fraction first
    broken by each stage) and ``gradient_masking`` (``suspected``, ``reasons``: zero input
    gradients, Square breaking points every white-box stage missed, a randomised model),
    with a :class:`GradientMaskingWarning` when suspected. Likewise ``"autoattack-rand"``.

    ``seed``: the attacks' random draws on batch ``i`` come from ``(seed, i)`` alone (the
    global RNG is given back as it was), so the result does not depend on which process
    attacked the batch. ``process_group`` (or a model wrapped in
    ``DistributedDataParallel``): evaluate sharded over the group's ranks, batch ``i`` on
    rank ``i % world_size`` (no sample is padded in or counted twice); the per-sample
    results are gathered, so every rank returns the exact totals, equal to a single
    process's with the same ``seed`` (default 0 in a sharded run). A failure on one rank
    raises on all of them.
    """
    model = _plain(model)
    world = D.of_group(process_group) if process_group is not None else D.SINGLE
    if world.active and seed is None:
        seed = 0
    with D.together(world, "evaluate's checks"):
        atks, device = _setup(model, loader, attacks, eps, norm, device, max_batches, seed,
                              world)
    with D.together(world, "evaluate"):
        mine = _run(model, loader, atks, device, max_batches, progress and world.main, seed,
                    world)
    return _report(atks, [r for part in D.gather(mine, world) for r in part])


def _plain(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _setup(model: nn.Module, loader: Iterable, attacks: Any, eps: float, norm: str,
           device: Any, max_batches: int | None, seed: int | None,
           world: D.World) -> tuple[dict[str, AttackFn], torch.device]:
    """The checked attacks and device (every argument checked before any work)."""
    H.check_config("evaluate", eps=eps, norm=norm)
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 0):
        raise ValueError(f"evaluate: max_batches must be an integer >= 0, got {max_batches!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"evaluate: seed must be an integer >= 0 or None, got {seed!r}")
    if world.active and hasattr(loader, "__len__"):
        batches = len(loader) if max_batches is None else min(len(loader), max_batches)
        if batches < world.size:
            raise ValueError(f"evaluate: {batches} batch(es) cannot be shared by {world.size} "
                             "ranks (some would have nothing to evaluate); use fewer ranks or "
                             "a smaller batch size")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    return _resolve(attacks, model, eps, norm), torch.device(device)


def _run(model: nn.Module, loader: Iterable, atks: dict[str, AttackFn], device: torch.device,
         max_batches: int | None, progress: bool, seed: int | None,
         world: D.World) -> list[dict[str, Any]]:
    """This rank's batches: per batch its index and per-sample outcomes (clean, each
    attack, worst case) and the AutoAttack tallies."""
    records = []
    it = D.rank_batches(loader, world, max_batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="evaluate")
    rng = (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
           if seed is not None else contextlib.nullcontext())
    with H.attack_mode(model), rng:
        for i, item in it:
            if seed is not None:
                torch.manual_seed(derive_seed(seed, i))
            records.append(_batch_outcomes(model, atks, *_batch(item, device), index=i))
    return records


def _batch_outcomes(model: nn.Module, atks: dict[str, AttackFn], x: Tensor, y: Tensor, *,
                    index: int) -> dict[str, Any]:
    with torch.no_grad():
        ok = model(x).argmax(dim=1) == y
    all_ok = ok.clone()
    idx = ok.nonzero().squeeze(1)
    robust, tallies = {}, {}
    for name, atk in atks.items():
        if isinstance(atk, AutoAttack):  # a cascade: it attacks its own survivors
            tallies[name] = Tally(robust_after=dict.fromkeys(atk.stages, 0))
            _, still = atk.run(x, y, tallies[name])
        else:
            still = torch.zeros_like(ok)
            if idx.numel() > 0:
                x_adv = atk(x[idx], y[idx])
                with torch.no_grad():
                    still[idx] = model(x_adv).argmax(dim=1) == y[idx]
        robust[name] = still.cpu()
        all_ok &= still
    return {"index": index, "clean": ok.cpu(), "robust": robust, "worst_case": all_ok.cpu(),
            "tallies": tallies}


def _report(atks: dict[str, AttackFn], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The totals over every rank's batches (in batch order)."""
    records.sort(key=lambda r: r["index"])
    n = sum(int(r["clean"].numel()) for r in records)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    out: dict[str, Any] = {
        "clean": sum(int(r["clean"].sum()) for r in records) / n,
        "robust": {k: sum(int(r["robust"][k].sum()) for r in records) / n for k in atks},
        "worst_case": sum(int(r["worst_case"].sum()) for r in records) / n,
        "n": n,
    }
    for name, atk in atks.items():
        if isinstance(atk, AutoAttack):
            tally = Tally.merge([r["tallies"][name] for r in records])
            out[name] = tally.report(atk.version)
            warn_if_masking(out[name], name)
    return out
