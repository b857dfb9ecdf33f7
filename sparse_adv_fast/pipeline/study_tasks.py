"""What each job of the controlled study computes (the arms of ``pipeline/arms.py``).

A job is a function ``(ctx, **args) -> dict`` whose result the runner saves atomically as
one file; a job reads the files of the jobs it depends on through ``ctx.load``. Kinds:

* ``start``   the shared dense start of one seed and width: a fresh network, adversarially
              trained for ``start_epochs`` at the constant ``start_lr``;
* ``pre``     dense AT from the start for ``B - L`` (the prefix of oneshot and of IWI widen);
* ``rounds``  the ``R`` IMP rounds from the start (AT or natural): mask + rewound weights;
* ``hydra``   HYDRA's prefix: dense AT for ``B - 2L``, then ``L`` epochs of score training;
* ``train``   one arm at one learning rate: its prefix, its final segment, validation;
* ``result``  the test evaluation of an arm's selected ``train`` job.

Reproducibility: every phase reseeds every RNG and its loader's shuffle from
``(seed, owner/phase)`` with ``stages.seed_stage`` (never from the learning rate, so a
tuning grid shares its random numbers), and every training phase passes ``fit`` its own
scratch checkpoint. A job killed part-way and rerun therefore replays its finished phases
from their checkpoints and continues with the same random numbers: it ends with the same
result.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..train.fit import quiet
from . import arms as A
from . import modelio
from .stages import fit_stage, seed_stage, stage_seed
from .study_config import StudyConfig

Ledger = list[dict[str, Any]]


def _lib(name: str) -> Any:
    return importlib.import_module(f"sparse_adv_fast.{name}")


def job_seed(seed: int, *parts: object) -> int:
    """The seed of ``(seed, part/part/...)``: a hash, stable across processes."""
    return stage_seed(seed, "/".join(map(str, parts)))


class Counted:
    """An iterable of batches that counts what it yields (HYDRA's score steps)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.count = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.count += 1
            yield batch


class Ctx:
    """One process's view of a study: config, data, the result store, job bookkeeping."""

    def __init__(self, cfg: StudyConfig, store: Any) -> None:
        self.cfg = cfg
        self.store = store  # a StageRunner over <out> (files in <out>/stages)
        self._data: tuple[Any, Any, Any] | None = None
        self.key = ""  # the running job's name (scratch files are named after it)

    # -- data -------------------------------------------------------------------------------
    @property
    def data(self) -> tuple[Any, Any, Any]:
        """``(train dataset, val loader, test loader)``; one split for every seed and arm,
        so the seeds vary training randomness, not what validation or test measure."""
        if self._data is None:
            c = self.cfg
            tr, va, te = _lib("data").split_loaders(
                c.dataset, val_size=c.val_size, batch_size=c.batch_size, data_dir=c.data_dir,
                train_subset=c.train_subset, test_subset=c.test_subset, seed=0)
            self._data = (tr.dataset, va, te)
        return self._data

    def train_loader(self, seed: int) -> DataLoader:
        """A train loader shuffling with its own generator (seeded by ``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(self.data[0], batch_size=self.cfg.batch_size, shuffle=True,
                          generator=gen)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch (batches of the train split, the last one partial)."""
        return len(self.train_loader(0))

    # -- store ------------------------------------------------------------------------------
    def load(self, key: str) -> dict[str, Any]:
        """The saved result of job ``key``."""
        return self.store.load(key)

    def model(self, key: str, field: str = "model") -> nn.Module:
        """Rebuild the model saved by job ``key``."""
        return modelio.from_blob(self.load(key)[field], where=f"study job {key!r}")

    def scratch(self, phase: str) -> Path:
        """Scratch checkpoint of ``phase`` of the running job (removed when the job ends)."""
        return self.store.stage_dir / f"{self.key}.{phase}.partial.pt"

    def arch(self, wide: bool) -> dict[str, Any]:
        """The architecture spec at base width or widened."""
        return modelio.arch_spec(self.cfg.model, self.cfg.dataset, self.cfg.widen if wide else 1)


# ---- building blocks ----------------------------------------------------------------------


def _train(ctx: Ctx, model: nn.Module, *, seed: int, owner: str, phase: str, epochs: int,
           lr: float, method: str, ledger: Ledger, schedule: str = "cosine") -> None:
    """One training phase with ``fit`` (its own RNG, loader order and scratch checkpoint);
    appends the steps it actually took to ``ledger``."""
    if epochs == 0:
        return
    c = ctx.cfg
    # fit_stage seeds every RNG and the loader's generator from (seed, owner/phase).
    # co_check off: a roll-back would end an arm early and break the equal budget.
    hist = fit_stage(
        model, (ctx.train_loader(0), ctx.data[1]), seed=seed, stage=f"{owner}/{phase}",
        checkpoint=ctx.scratch(phase), where=f"study job {ctx.key}", method=method,
        epochs=epochs, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay,
        schedule=schedule, eps=c.resolved_eps, steps=c.train_steps, co_check=False,
        progress=False, val_batches=1, log=quiet,
    )
    ledger.append({"phase": f"{owner}: {phase}", "steps": int(hist.iterations),
                   "epochs": epochs, "lr": lr, "method": method,
                   "lrs": [float(e["lr"]) for e in hist.epochs],
                   "val_pgd_acc": [e["val_pgd_acc"] for e in hist.epochs]})


def _evaluate(ctx: Ctx, model: nn.Module, loader: Any, attacks: tuple[str, ...],
              seed: int, stage: str) -> dict[str, Any]:
    seed_stage(seed, stage)  # the attacks' random starts
    res = _lib("train").evaluate(model.eval(), loader, attacks=attacks,
                                 eps=ctx.cfg.resolved_eps)
    return {"clean": float(res["clean"]), "worst_case": float(res["worst_case"]),
            "robust": {k: float(v) for k, v in res["robust"].items()}, "n": int(res["n"])}


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _layer_masks(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in _lib("nn").masks(model).items()}


@torch.no_grad()
def _weight_zeros(model: nn.Module) -> dict[str, Tensor]:
    """Exactly-zero positions of every Linear / Conv2d weight (masked layers included)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out[name] = m.weight.detach() == 0
    return out


def _dead_fraction(before: dict[str, Tensor], model: nn.Module) -> dict[str, Any]:
    """Of the weights zero at inheritance, how many are still exactly zero now."""
    after = _weight_zeros(model)
    zero = sum(int(z.sum()) for z in before.values())
    dead = sum(int((z & after[n]).sum()) for n, z in before.items())
    total = sum(z.numel() for z in before.values())
    return {"inherited_zeros": zero, "still_zero": dead, "weights": total,
            "dead_fraction": dead / zero if zero else None}


# ---- jobs ---------------------------------------------------------------------------------


def job_start(ctx: Ctx, *, seed: int, wide: bool) -> dict[str, Any]:
    """The dense start: fresh weights, ``start_epochs`` of AT at a constant rate."""
    arch = ctx.arch(wide)
    owner = f"start-w{arch['width']}"
    seed_stage(seed, f"{owner}/init")
    model = modelio.build(arch)
    ledger: Ledger = []
    _train(ctx, model, seed=seed, owner=owner, phase="train", epochs=ctx.cfg.start_epochs,
           lr=ctx.cfg.start_lr, method=ctx.cfg.method, ledger=ledger, schedule="none")
    return {"model": modelio.to_blob(model, arch), "ledger": ledger}


def job_pre(ctx: Ctx, *, seed: int, lr: float, start: str) -> dict[str, Any]:
    """Dense AT from the start for ``B - L`` epochs."""
    c = ctx.cfg
    model = ctx.model(start)
    ledger = list(ctx.load(start)["ledger"])
    _train(ctx, model, seed=seed, owner="pre", phase="train", epochs=c.budget_epochs - c.segment,
           lr=lr, method=c.method, ledger=ledger)
    return {"model": modelio.to_blob(model, ctx.arch(False)), "ledger": ledger}


def job_rounds(ctx: Ctx, *, seed: int, lr: float, method: str, start: str) -> dict[str, Any]:
    """The IMP rounds: train ``L``, prune globally to the round's sparsity, rewind to the
    start (iteration k) -- the next round replays the schedule from k."""
    c = ctx.cfg
    model = _lib("nn").sparsify(ctx.model(start))
    rewind = _state(model)
    ledger = list(ctx.load(start)["ledger"])
    owner = "rounds-natural" if method == "natural" else "rounds-at"
    done = [0]

    def train_round(m: nn.Module) -> None:
        done[0] += 1
        _train(ctx, m, seed=seed, owner=owner, phase=f"round{done[0]}", epochs=c.segment,
               lr=lr, method=method, ledger=ledger)

    tickets = _lib("prune").imp(model, train_round, sparsities=c.sparsities, rewind_state=rewind,
                                scope="global")
    return {"model": modelio.to_blob(model, ctx.arch(False)), "ledger": ledger,
            "round_sparsity": [float(t.achieved) for t in tickets]}


def job_hydra(ctx: Ctx, *, seed: int, lr: float, start: str) -> dict[str, Any]:
    """HYDRA's prefix: dense AT for ``B - 2L``, then ``L`` epochs of score training."""
    c = ctx.cfg
    model = ctx.model(start)
    ledger = list(ctx.load(start)["ledger"])
    _train(ctx, model, seed=seed, owner="hydra", phase="pretrain",
           epochs=c.budget_epochs - 2 * c.segment, lr=lr, method=c.method, ledger=ledger)
    seed_stage(seed, "hydra/scores")
    loader = Counted(ctx.train_loader(job_seed(seed, "hydra", "scores", "order")))
    eps = c.resolved_eps
    model = _lib("prune").hydra(
        model, c.sparsities[-1], loader, epochs=c.segment, lr=c.hydra_score_lr, eps=eps,
        alpha=eps / 4, steps=c.train_steps, scope=c.hydra_scope, progress=False,
        momentum=c.momentum, loss=c.hydra_loss)
    ledger.append({"phase": "hydra: scores", "steps": loader.count, "epochs": c.segment,
                   "lr": c.hydra_score_lr, "method": f"hydra-{c.hydra_loss}"})
    return {"model": modelio.to_blob(model, ctx.arch(False)), "ledger": ledger}


def prefix(ctx: Ctx, arm: str, seed: int, deps: dict[str, str]) -> tuple[nn.Module, Ledger]:
    """``arm``'s network before its final segment, and the steps that made it."""
    c = ctx.cfg
    if arm in ("dense_at", "oneshot"):
        model, ledger = ctx.model(deps["pre"]), list(ctx.load(deps["pre"])["ledger"])
        if arm == "oneshot":
            model = _lib("prune").magnitude(model, c.sparsities[-1], scope="global")
        return model, ledger
    if arm in ("imp", "natural_prune_at", "hydra"):
        key = deps["rounds"] if arm != "hydra" else deps["hydra"]
        return ctx.model(key), list(ctx.load(key)["ledger"])
    if arm in ("random", "reinit"):
        ticket = ctx.model(deps["rounds"])
        ledger = list(ctx.load(deps["rounds"])["ledger"])
        masks = _layer_masks(ticket)
        if arm == "reinit":
            # The lottery-ticket control: the same mask on weights drawn afresh at init.
            seed_stage(seed, "reinit/init")
            model = _lib("nn").sparsify(modelio.build(ctx.arch(False)))
            return _lib("nn").apply_masks(model, masks), ledger
        # Random pruning of the start weights, each layer at the IMP mask's density.
        model = _lib("nn").sparsify(ctx.model(deps["start"]))
        gen = torch.Generator().manual_seed(job_seed(seed, "random", "mask"))
        layers = _lib("nn").masked_layers(model)
        for name, mk in masks.items():
            s = float((~mk).sum()) / mk.numel()
            _lib("prune").random(layers[name], s, scope="layer", generator=gen)
        return model, ledger
    raise ValueError(f"arm {arm!r} has no prefix")


def job_train(ctx: Ctx, *, arm: str, seed: int, lr: float, deps: dict[str, str]
              ) -> dict[str, Any]:
    """One arm at learning rate ``lr``: prefix, final segment, validation robust accuracy."""
    c = ctx.cfg
    extra: dict[str, Any] = {}
    if arm in ("dense_at", "large_scratch"):
        model = ctx.model(deps["start"])
        ledger = list(ctx.load(deps["start"])["ledger"])
        epochs = c.budget_epochs
    elif arm in A.IWI_ARMS:
        source = c.iwi_ticket_source if arm == "iwi_ticket" else c.iwi_widen_source
        src, ledger = prefix(ctx, source, seed, deps)
        wide = arm == "iwi_widen"
        seed_stage(seed, f"{arm}/init")
        model = modelio.build(ctx.arch(wide))
        gen = torch.Generator().manual_seed(job_seed(seed, arm, "inherit"))
        # widen: "preserve" keeps the source's function yet leaves the new units trainable
        # (all-zero new units would get zero gradient forever); ticket: pruned -> 0.
        init = "preserve" if wide else "zero"
        model = _lib("iwi").inherit(src, model, mode="widen" if wide else "ticket", init=init,
                                    generator=gen)
        zeros = _weight_zeros(model)
        ledger.append({"phase": f"{arm}: inherit from {source} ({init})", "steps": 0})
        epochs = c.segment
    else:
        model, ledger = prefix(ctx, arm, seed, deps)
        epochs = c.segment
    _train(ctx, model, seed=seed, owner=arm, phase="final", epochs=epochs, lr=lr,
           method=c.method, ledger=ledger)
    if arm in A.IWI_ARMS:
        extra["iwi"] = _dead_fraction(zeros, model)
    val = _evaluate(ctx, model, ctx.data[1], c.val_attacks, seed, f"{arm}/val")
    return {"model": modelio.to_blob(model, ctx.arch(A.ARMS[arm].wide)),
            "summary": {"arm": arm, "seed": seed, "lr": lr, "val": val,
                        "steps": sum(int(p["steps"]) for p in ledger), "ledger": ledger,
                        "sparsity": modelio.zero_fraction(model),
                        "params": sum(p.numel() for p in model.parameters()), **extra}}


def job_result(ctx: Ctx, *, arm: str, seed: int, train: str) -> dict[str, Any]:
    """The test evaluation of ``arm``'s selected training job for ``seed``."""
    model = ctx.model(train)
    summary = dict(ctx.load(train)["summary"])
    test = _evaluate(ctx, model, ctx.data[2], ctx.cfg.eval_attacks, seed, f"{arm}/test")
    out = {**summary, "test": test}
    if ctx.cfg.radius_points:
        out["radius"] = _radius(ctx, model, seed, f"{arm}/radius")
    return {"summary": out}


def _radius(ctx: Ctx, model: nn.Module, seed: int, stage: str) -> dict[str, Any]:
    """The paper's margin / input-gradient link, checked: the first-order radius (all
    classes, Hein & Andriushchenko) of the first ``radius_points`` test points, its median,
    and how well it ranks FAB's minimal perturbations (Spearman, Pearson)."""
    xs, ys, n = [], [], ctx.cfg.radius_points
    for x, y in ctx.data[2]:
        xs.append(x)
        ys.append(y)
        if sum(len(t) for t in ys) >= n:
            break
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    seed_stage(seed, stage)  # FAB's random restarts
    r = _lib("metrics").radius_vs_minimal_perturbation(model.eval(), x, y)
    radii = torch.tensor(r["radius"], dtype=torch.float64)
    return {"spearman": r["spearman"], "pearson": r["pearson"], "n": r["n"],
            "median_radius": float(radii.median()) if len(radii) else float("nan"),
            "mean_ratio": r["mean_ratio"]}


JOBS = {"start": job_start, "pre": job_pre, "rounds": job_rounds, "hydra": job_hydra,
        "train": job_train, "result": job_result}

__all__ = ["JOBS", "Counted", "Ctx", "job_seed", "prefix"]
