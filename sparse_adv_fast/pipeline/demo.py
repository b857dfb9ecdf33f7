"""The ``demo`` pipeline: PGD-AT -> IMP tickets with rewinding -> IWI -> robustness table.

Stages (each saved atomically to ``<out>/stages/<name>.pt``, skipped when rerun):

* ``dense``            adversarial training of the dense network; keeps the rewind state.
* ``imp_50`` ...       one IMP round per sparsity: global magnitude pruning of the previous
                       model, rewind of the survivors to the early weights, adversarial retraining.
* ``iwi_ticket``       a dense network of the same architecture inheriting the sparsest
                       ticket's surviving weights (``mode="ticket"``), trained adversarially.
* ``iwi_widen2x``      a ``widen``-times wider network inheriting the dense one's weights
                       (``mode="widen"``, ``init="preserve"``), trained adversarially.
* ``eval_<model>``     clean / robust accuracy and the sparsity-robustness metrics.

Then ``results.json``, ``results.md`` and the plots are (re)written from the stage results.
A training stage also passes ``fit`` a scratch checkpoint (``<name>.partial.pt``), so a run
killed mid-training resumes from the last finished epoch. Every stage seeds its own random
state from ``(seed, stage)`` (the global RNGs and the train loader's shuffling generator), so
a run resumed at or inside any stage gives the same table as an uninterrupted one. The
output directory is locked (``run.lock``) while a run writes it.

On digits the L-inf radius is 0.1, not CIFAR's 8/255: digits pixels are multiples of 1/16
(17 grey levels), so 8/255 is half a grey level. At 0.1, PGD-AT gives robust accuracy
clearly below clean accuracy (default run, dense model: 97.5% clean, 81.7% worst case).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..finite import check_finite
from . import modelio, plots, report, runtime
from .lock import RunLock
from .outputs import check_output_dir
from .stages import StageRunner, check_seed, fit_stage, seed_stage

DEFAULT_EPS = {"digits": 0.1, "mnist": 0.3, "cifar10": 8 / 255}
METHODS = ("pgd", "trades", "fgsm_rs")


def _lib(name: str) -> Any:
    return importlib.import_module(f"sparse_adv_fast.{name}")


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of a demo run (stored in the output dir; resuming needs the same)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "small_cnn"
    method: str = "pgd"
    epochs: int = 8
    retrain_epochs: int = 4
    lr: float = 0.1
    iwi_lr: float = 0.02
    batch_size: int = 128
    eps: float = 0.1
    train_steps: int = 10
    val_batches: int = 2
    val_size: int = 180  # training samples held out for validation (never the test split)
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9)
    widen: int = 2
    rewind_at: int = 12
    eval_attacks: tuple[str, ...] = ("pgd20x5", "apgd")
    eval_subset: int | None = None
    train_subset: int | None = None
    metrics_samples: int = 256
    seed: int = 0
    quick: bool = False

    @classmethod
    def make(
        cls,
        *,
        quick: bool = False,
        dataset: str = "digits",
        data_dir: str | None = None,
        epochs: int | None = None,
        sparsities: tuple[float, ...] | None = None,
        method: str = "pgd",
        seed: int = 0,
        eps: float | None = None,
    ) -> DemoConfig:
        """The demo's settings; ``quick`` shrinks training and evaluation to fit ~20 s on CPU."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if dataset not in DEFAULT_EPS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {tuple(DEFAULT_EPS)}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        check_seed(seed)
        sp = tuple(sparsities) if sparsities is not None else (0.5, 0.8, 0.9)
        check_sparsities(sp)
        base = dict(
            dataset=dataset,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            method=method,
            seed=seed,
            sparsities=sp,
            eps=DEFAULT_EPS[dataset] if eps is None else float(eps),
            quick=quick,
        )
        if quick:
            base.update(
                epochs=4, retrain_epochs=2, train_steps=3, val_batches=1, eval_attacks=("pgd20",),
                eval_subset=200, metrics_samples=128, rewind_at=6,
            )
        if epochs is not None:
            base.update(epochs=epochs, retrain_epochs=max(1, round(epochs / 2)))
        return cls(**base)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return dataclasses.asdict(self)

    def row_names(self) -> list[str]:
        """The models of the results table, in order."""
        return (
            ["dense"]
            + [imp_name(s) for s in self.sparsities]
            + ["iwi_ticket", f"iwi_widen{self.widen}x"]
        )


def check_sparsities(sp: tuple[float, ...]) -> tuple[float, ...]:
    """Validate IMP targets: non-empty, each in [0, 1), strictly increasing."""
    if not sp:
        raise ValueError("sparsities must not be empty")
    for s in sp:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {s!r}")
    if any(b <= a for a, b in zip(sp, sp[1:], strict=False)):
        raise ValueError(f"sparsities must be strictly increasing (IMP prunes further), got {sp}")
    return sp


def imp_name(s: float) -> str:
    """Stage/row name of the IMP ticket at sparsity ``s`` (0.8 -> ``imp_80``)."""
    pct = round(s * 100, 1)
    return f"imp_{int(pct) if pct == int(pct) else pct}"


class Demo:
    """The demo's stages over one output directory (see the module docstring)."""

    def __init__(
        self, cfg: DemoConfig, out: str | os.PathLike[str], *, fresh: bool = False,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.runner = StageRunner(self.out, config=cfg.as_dict(), fresh=fresh)
        self._loaders: tuple[Any, Any, Any] | None = None
        self.arch = modelio.arch_spec(cfg.model, cfg.dataset, 1)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def loaders(self) -> tuple[Any, Any, Any]:
        """``(train, val, test)``: validation (the CO check) is held out of training data."""
        if self._loaders is None:
            c = self.cfg
            self._loaders = _lib("data").split_loaders(
                c.dataset, val_size=c.val_size, batch_size=c.batch_size, data_dir=c.data_dir,
                train_subset=c.train_subset, test_subset=c.eval_subset, seed=c.seed,
            )
        return self._loaders

    def _seed(self, stage: str) -> None:
        # Each stage reseeds from (seed, name): a resumed run draws what a straight run draws.
        seed_stage(self.cfg.seed, stage)

    def _fit(self, model: nn.Module, stage: str, epochs: int, lr: float | None = None,
             **kw: Any) -> Any:
        # fit_stage also reseeds the cached train loader's generator: without that, a stage
        # would shuffle from wherever the previous stage left it in this process, and a run
        # resumed at this stage (a fresh loader) would train on another order.
        c = self.cfg
        return fit_stage(
            model, self.loaders[:2], seed=c.seed, stage=stage,
            checkpoint=self.runner.scratch(stage), where=f"demo {self.out}", method=c.method,
            epochs=epochs, lr=lr or c.lr, eps=c.eps, steps=c.train_steps, progress=self.progress,
            val_batches=c.val_batches, **kw,
        )

    def _model(self, stage: str) -> nn.Module:
        where = f"stage {stage!r} ({self.runner.path(stage)})"
        model = modelio.from_blob(self.runner.load(stage)["model"], where=where)
        check_finite(model, where)
        return model

    # -- stages -------------------------------------------------------------------------------
    def stage_dense(self) -> dict[str, Any]:
        self._seed("dense")
        model = modelio.build(self.arch)
        hist = self._fit(model, "dense", self.cfg.epochs, rewind_at=self.cfg.rewind_at)
        rewind = hist.rewind_state
        return {
            "model": modelio.to_blob(model, self.arch),
            "rewind_state": None if rewind is None else {k: v.cpu() for k, v in rewind.items()},
            "history": hist.as_dict(),
        }

    def stage_imp(self, prev: str, name: str, sparsity: float) -> dict[str, Any]:
        self._seed(name)
        model = self._model(prev)
        if not modelio.is_masked(model):
            model = _lib("nn").sparsify(model)
        rewind = self.runner.load("dense")["rewind_state"]
        # `imp` trains, prunes, rewinds per round; the previous stage already trained `model`,
        # so the round's training is a no-op and the rewound ticket is retrained below.
        tickets = _lib("prune").imp(
            model, lambda m: None, sparsities=(sparsity,), rewind_state=rewind, scope="global"
        )
        hist = self._fit(model, name, self.cfg.retrain_epochs)
        return {
            "model": modelio.to_blob(model, self.arch, ticket_sparsity=float(tickets[-1].sparsity)),
            "history": hist.as_dict(),
        }

    def stage_iwi(self, name: str, source_stage: str, mode: str, width: int) -> dict[str, Any]:
        self._seed(name)
        source = self._model(source_stage)
        arch = modelio.arch_spec(self.cfg.model, self.cfg.dataset, width)
        target = modelio.build(arch)
        # widen: "preserve" computes the source's function yet keeps the new units trainable
        # (all-zero new units would get zero gradient forever).
        init = "preserve" if mode == "widen" else "zero"
        target = _lib("iwi").inherit(source, target, mode=mode, init=init)
        # A lower lr: from already-trained weights, 0.1 and 0.05 diverged on digits (measured).
        hist = self._fit(target, name, self.cfg.retrain_epochs, lr=self.cfg.iwi_lr)
        return {"model": modelio.to_blob(target, arch, iwi_mode=mode), "history": hist.as_dict()}

    def stage_eval(self, model_stage: str) -> dict[str, Any]:
        self._seed("eval_" + model_stage)
        c = self.cfg
        model = self._model(model_stage).eval()
        test_loader = self.loaders[2]
        res = _lib("train").evaluate(
            model, test_loader, attacks=c.eval_attacks, eps=c.eps, progress=self.progress
        )
        x, y = _first_samples(test_loader, c.metrics_samples)
        metrics = _lib("metrics").robustness_report(model, x, y, eps=c.eps)
        return {
            "sparsity": modelio.zero_fraction(model),
            "clean": float(res["clean"]),
            "robust": {k: float(v) for k, v in res["robust"].items()},
            "worst_case": float(res["worst_case"]),
            "n": int(res["n"]),
            "metrics": _plain(metrics),
            "params": sum(p.numel() for p in model.parameters()),
        }

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage, write results.json / results.md / plots; the results."""
        with runtime.threads_for(self.cfg.dataset):
            return self._run()

    def _run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        c, r = self.cfg, self.runner
        r.run("dense", self.stage_dense)
        prev = "dense"
        for s in c.sparsities:
            name = imp_name(s)
            r.run(name, lambda p=prev, n=name, s=s: self.stage_imp(p, n, s))
            prev = name
        r.run("iwi_ticket", lambda: self.stage_iwi("iwi_ticket", prev, "ticket", 1))
        widen = f"iwi_widen{c.widen}x"
        r.run(widen, lambda: self.stage_iwi(widen, "dense", "widen", c.widen))
        rows = []
        for name in c.row_names():
            ev = r.run(f"eval_{name}", lambda n=name: self.stage_eval(n))
            rows.append(report.make_row(name, ev, c.method))
        results = report.results_dict(
            c.as_dict(), rows, ran=list(r.ran), skipped=list(r.skipped),
            seconds=time.perf_counter() - t0,
        )
        report.write_all(results, self.out)
        plots.write_all(results, self.out)
        return results


def _first_samples(loader: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, got = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        got += len(y)
        if got >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _plain(obj: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers, recursively (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def run_demo(
    cfg: DemoConfig, out: str | os.PathLike[str] = "saf_out", *, fresh: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run or resume the demo in ``out``; returns the results dict also saved as results.json.

    ``out`` is checked writable first and locked for the run: a second run into it (also
    with ``fresh``) raises :class:`~sparse_adv_fast.pipeline.lock.RunLockedError` at once.
    """
    out = check_output_dir(out)
    with RunLock(out):
        return Demo(cfg, out, fresh=fresh, progress=progress).run()
