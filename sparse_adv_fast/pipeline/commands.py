"""The work behind ``train``, ``prune``, ``iwi``, ``eval`` and ``bench`` (the CLI only parses).

Every function validates what it can before doing any work (output paths included: see
:mod:`.outputs`) and raises ``ValueError`` / ``FileNotFoundError`` with a message naming the
problem. A loaded model holding NaN / Inf is refused (``NonFiniteError``) before any work.

The commands that train (``train``, ``prune --method imp|hydra``, ``iwi``) keep their
resumable state in a run directory next to the output, ``<out>.ckpt`` (:func:`run_dir`):
the settings (a rerun with other settings is refused), one ``fit`` checkpoint per training
stage (written after every epoch) and the lock that keeps a second run out. Rerunning the
same command after an interruption resumes and ends with the same weights as an
uninterrupted run; ``fresh=True`` starts over. The directory is removed once the output is
written, and kept after a failure (e.g. divergence: the last finished epoch is there).

Under torchrun (the CLI joins the job: :func:`sparse_adv_fast.distributed.init_from_env`)
the training is data-parallel (``fit``'s ``process_group``), ``eval`` is sharded, and rank
0 alone locks the run directory and writes every file; the others read the same
checkpoint to resume, so the run directory must be on a filesystem all ranks share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as D
from ..attacks.evaluate import SUITES
from ..checkpoint import CheckpointError
from ..finite import check_finite
from . import modelio, runtime
from .command_config import IWI_MODES, PRUNE_METHODS, versions
from .lock import RunLock
from .outputs import check_output_file
from .stages import StageRunner, check_seed, fit_stage, seed_stage
from .study_config import DEFAULT_EPS

_PGD = re.compile(r"^pgd[1-9][0-9]*(x[1-9][0-9]*)?$")
# The evaluator's own names (autoattack and autoattack-rand included): eval accepts every
# suite saf.train.evaluate runs, as they land there.
EVAL_SUITES = SUITES
_SUITE = re.compile(r"^[a-z0-9_]+$")

# Held out of the training split for validation (the catastrophic-overfitting check):
# training commands never look at the test split.
VAL_FRACTION = 0.1


def _lib(name: str) -> Any:
    return importlib.import_module(f"sparse_adv_fast.{name}")


def _train_val(dataset: str, batch_size: int, data_dir: str | None, seed: int,
               augment: bool = False) -> tuple:
    train, val, _ = _lib("data").split_loaders(
        dataset, val_size=VAL_FRACTION, batch_size=batch_size, data_dir=data_dir, seed=seed,
        augment=augment,
    )
    return train, val


def check_suites(names: tuple[str, ...]) -> tuple[str, ...]:
    """Validate attack suite names: those of ``saf.train.evaluate`` (:data:`EVAL_SUITES`,
    ``autoattack`` and ``autoattack-rand`` included), ``pgd<k>`` or ``pgd<k>x<restarts>``."""
    bad = [n for n in names if n not in EVAL_SUITES and not _PGD.match(n)]
    if bad or not names:
        raise ValueError(
            f"unknown attack suite(s) {bad}; choose from {', '.join(EVAL_SUITES)}, "
            "pgd<steps> or pgd<steps>x<restarts>"
        )
    return names


def check_data_dir(dataset: str, data_dir: str | None) -> None:
    """For file-based datasets the data folder must exist (checked before any work)."""
    if dataset == "digits":
        return
    data = _lib("data")
    folder = Path(data_dir or os.environ.get(data.DATA_DIR_ENV, "data")).expanduser()
    how = "--data-dir" if data_dir else f"--data-dir (or ${data.DATA_DIR_ENV})"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"data directory {str(folder)!r} for {dataset} is a file, not a directory; pass "
            f"{how} pointing at the folder with the dataset's standard files"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data directory {str(folder)!r} for {dataset} does not exist; pass {how} "
            "pointing at the dataset's standard files"
        )


def eps_for(dataset: str, eps: float | None) -> float:
    """``eps`` or the dataset's default L-inf radius."""
    if eps is None:
        return DEFAULT_EPS[dataset]
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (inputs live in [0, 1]), got {eps}")
    return eps


def load_checked(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, checkpoint dict)`` of a model checkpoint, refused unless every tensor is
    finite (a NaN model "scores" chance accuracy and prunes to "sparsity 0")."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(
            f"checkpoint {os.fspath(path)!r} is a directory; give a model checkpoint file "
            "(written by train, prune or iwi)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    try:
        net, blob = modelio.load_model(p)
    except CheckpointError as e:  # the user's input file is unreadable: a data error
        raise ValueError(str(e)) from e
    check_finite(net, f"checkpoint {os.fspath(path)!r}")
    return net, blob


# ---- run directories ------------------------------------------------------------------------
def run_dir(out: str | os.PathLike[str]) -> Path:
    """The resumable-run directory of a command writing ``out``: ``<out>.ckpt``."""
    return Path(f"{os.fspath(out)}.ckpt")


def _digest(path: str | os.PathLike[str]) -> str:
    """Content hash of an input file: a resumed run must read the same input."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _note(msg: str) -> None:
    if D.world().main:
        print(msg, file=sys.stderr, flush=True)


def job_group() -> Any:
    """The process group of the torchrun job the CLI joined, for ``fit`` / ``evaluate``
    (``None`` in a single process)."""
    w = D.world()
    if not w.active:
        return None
    import torch.distributed as dist

    return w.group if w.group is not None else dist.group.WORLD


@contextlib.contextmanager
def _run(out: Path, settings: dict[str, Any], fresh: bool) -> Iterator[StageRunner]:
    """The locked, settings-checked run directory of ``out`` while the block runs; removed
    when the block succeeds, kept (to resume from) when it raises. Under torchrun rank 0
    locks, checks and clears it; the other ranks open it once rank 0 has."""
    folder = run_dir(out)
    w = D.world()
    with RunLock(folder) if w.main else contextlib.nullcontext():
        resuming = not fresh and any((folder / "stages").glob("*.pt"))
        with D.together(w, f"opening the run directory {folder}"):
            runner = (StageRunner(folder, config=settings, fresh=fresh, log=lambda m: None)
                      if w.main else None)
        D.barrier(w)  # rank 0 has created it (or cleared it for --fresh)
        if runner is None:
            runner = StageRunner(folder, config=settings, log=lambda m: None, writer=False)
        if resuming:
            _note(f"[saf] resuming the interrupted run in {folder} (--fresh to start over)")
        yield runner
        D.barrier(w)  # every rank is done with the run's files
        if not w.main:
            return
        runner.clear()
        with contextlib.suppress(OSError):
            runner.stage_dir.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()  # only if empty: nothing but the run's own files is ever deleted


def _fit_config(method: str, epochs: int, lr: float, eps: float, steps: int,
                extra: dict[str, Any]) -> Any:
    """The command's ``TrainConfig`` (checked before any work). The commands stop a run
    that collapses (``collapse_check``) unless told otherwise."""
    extra = {"collapse_check": True, **extra}
    return _lib("train").TrainConfig(method=method, epochs=epochs, lr=lr, eps=eps,
                                     steps=steps, **extra)


def _extras(fit_settings: dict[str, Any], augment: bool) -> dict[str, Any]:
    """The run-directory settings beyond the classic ones: only what differs from the
    defaults, so the settings of a run without them (an older run dir) still match."""
    defaults = _lib("train").TrainConfig()
    out = {k: v for k, v in fit_settings.items()
           if k != "collapse_check" and getattr(defaults, k) != v}
    if augment:
        out["augment"] = True
    return out


def _augment(dataset: str, augment: bool | None) -> bool:
    """``augment``, or the default: the standard crop + flip for cifar10 only."""
    return dataset == "cifar10" if augment is None else augment


def config_path(out: str | os.PathLike[str]) -> Path:
    """Where a command saves its resolved config beside ``out``: ``<out>.config.json``."""
    return Path(f"{os.fspath(out)}.config.json")


def _save_config(out: Path, settings: dict[str, Any], fit_cfg: Any) -> None:
    """``<out>.config.json``: the resolved settings, the fit config, seed and versions."""
    if not D.world().main:
        return
    rec = {"command": settings.get("command"), "settings": settings,
           "fit": fit_cfg.as_dict() if fit_cfg is not None else None,
           "seed": settings.get("seed"), "versions": versions(),
           "world_size": D.world().size}
    _lib("checkpoint").write_atomic(config_path(out), json.dumps(rec, indent=2) + "\n")


# ---- train ----------------------------------------------------------------------------------
def train(
    *, dataset: str, model: str, width: float, method: str, epochs: int, eps: float | None,
    lr: float, steps: int, batch_size: int, seed: int, data_dir: str | None, out: str,
    progress: bool = True, fresh: bool = False, augment: bool | None = None,
    **fit_settings: Any,
) -> dict[str, Any]:
    """Build ``model`` for ``dataset``, train it with ``method``, save a model checkpoint
    and its resolved config (``<out>.config.json``).

    ``fit_settings``: further ``TrainConfig`` fields (``momentum``, ``schedule``,
    ``eps_warmup``, ...). ``augment``: crop + flip the training batches (default: cifar10
    only). Resumable: rerun with the same arguments after an interruption (see the
    module doc).
    """
    out_path = check_output_file(out)
    check_seed(seed)
    check_data_dir(dataset, data_dir)
    eps = eps_for(dataset, eps)
    fit_cfg = _fit_config(method, epochs, lr, eps, steps, fit_settings)
    augment = _augment(dataset, augment)
    arch = modelio.arch_spec(model, dataset, width)
    seed_stage(seed, "init")
    net = modelio.build(arch)  # unknown model names fail here, before data is read
    settings = dict(command="train", arch=arch, method=method, epochs=epochs, eps=eps, lr=lr,
                    steps=steps, batch_size=batch_size, seed=seed, data_dir=data_dir,
                    **_extras(fit_settings, augment))
    loaders = _train_val(dataset, batch_size, data_dir, seed, augment)
    if fit_cfg.rewind_at is None:  # the rewind point of a later `prune --method imp`
        fit_cfg = dataclasses.replace(fit_cfg, rewind_at=len(loaders[0]))
    with _run(out_path, settings, fresh) as runner, runtime.threads_for(dataset):
        hist = fit_stage(net, loaders, seed=seed, stage="train",
                         checkpoint=runner.scratch("train"), where=str(out_path),
                         config=fit_cfg, progress=progress, process_group=job_group())
        _save_model(net, arch, out_path, method=method, eps=eps, epochs=epochs,
                    history=hist.as_dict(), rewind_at=fit_cfg.rewind_at,
                    rewind_state=hist.rewind_state)
        _save_config(out_path, settings, fit_cfg)
    return {"out": str(out_path), "history": hist.as_dict()}


# ---- prune ----------------------------------------------------------------------------------
def imp_schedule(sparsity: float, rounds: int, start: float = 0.0) -> tuple[float, ...]:
    """IMP targets going from ``start`` to ``sparsity`` in ``rounds`` rounds, each pruning
    the same fraction of the survivors (0 -> 0.875 in 3 rounds: 0.5, 0.75, 0.875)."""
    if not start < sparsity:
        raise ValueError(f"the model is already {start:.4f} sparse; IMP needs a higher "
                         f"--sparsity than that, got {sparsity}")
    ratio = (1.0 - sparsity) / (1.0 - start)
    out = [1.0 - (1.0 - start) * ratio ** ((i + 1) / rounds) for i in range(rounds)]
    out[-1] = sparsity  # exact target despite float rounding
    return tuple(out)


def prune(
    *, checkpoint: str, method: str, sparsity: float, scope: str, out: str, epochs: int,
    rounds: int, train_method: str, eps: float | None, lr: float, steps: int, batch_size: int,
    seed: int, data_dir: str | None, progress: bool = True, fresh: bool = False,
    augment: bool | None = None, **fit_settings: Any,
) -> dict[str, Any]:
    """Prune a saved model; ``imp`` / ``hydra`` also train (``epochs`` per round / fine-tune).

    ``magnitude`` / ``random`` prune once (no training). ``imp`` rewinds to the
    early-training weights ``train`` kept in the checkpoint (after its first epoch, or
    ``rewind_at`` iterations; Frankle et al. 2020): ``rounds`` rounds of train, prune,
    rewind, then the final ticket is trained. ``hydra`` learns scores for ``epochs``
    epochs, then fine-tunes the weights as long. The training methods are resumable (see
    the module doc). ``augment`` and ``fit_settings`` as for :func:`train`; the resolved
    config is saved in ``<out>.config.json``.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown prune method {method!r}; choose one of {PRUNE_METHODS}")
    out_path = check_output_file(out, inputs=[checkpoint])
    check_seed(seed)
    net, blob = load_checked(checkpoint)
    arch = blob["arch"]
    if method in ("magnitude", "random"):
        seed_stage(seed, "prune")
        p = _lib("prune")
        if method == "magnitude":
            net = p.magnitude(net, sparsity, scope=scope)
        else:
            net = p.random(net, sparsity, scope=scope,
                           generator=torch.Generator().manual_seed(seed))
        D.check_masks(net, D.world(), "after pruning")
        res = _save_pruned(net, arch, out_path, method, sparsity, scope, blob)
        _save_config(out_path, dict(command="prune", checkpoint=_digest(checkpoint),
                                    method=method, sparsity=sparsity, scope=scope, seed=seed),
                     None)
        return res
    check_data_dir(arch["dataset"], data_dir)
    eps = eps_for(arch["dataset"], eps)
    fit_cfg = _fit_config(train_method, epochs, lr, eps, steps, fit_settings)
    augment = _augment(arch["dataset"], augment)
    settings = dict(command="prune", checkpoint=_digest(checkpoint), method=method,
                    sparsity=sparsity, scope=scope, epochs=epochs, rounds=rounds,
                    train_method=train_method, eps=eps, lr=lr, steps=steps,
                    batch_size=batch_size, seed=seed, data_dir=data_dir,
                    **_extras(fit_settings, augment))
    kw = dict(config=fit_cfg, progress=progress, process_group=job_group())
    loaders = _train_val(arch["dataset"], batch_size, data_dir, seed, augment)
    with _run(out_path, settings, fresh) as runner, runtime.threads_for(arch["dataset"]):
        if method == "imp":
            net = _imp(net, runner, loaders, sparsity=sparsity, rounds=rounds, scope=scope,
                       seed=seed, rewind_state=_rewind_state(blob, checkpoint),
                       kw=dict(kw, where=str(out_path)))
        else:
            net = _hydra(net, arch, runner, loaders, sparsity=sparsity, scope=scope,
                         epochs=epochs, eps=eps, steps=steps, seed=seed, progress=progress,
                         train_method=train_method, beta=fit_cfg.beta)
        D.check_masks(net, D.world(), "after pruning")
        fit_stage(net, loaders, seed=seed, stage="finetune",
                  checkpoint=runner.scratch("finetune"), where=str(out_path), **kw)
        res = _save_pruned(net, arch, out_path, method, sparsity, scope, blob)
        _save_config(out_path, settings, fit_cfg)
        return res


def _save_model(net: nn.Module, arch: dict[str, Any], out: Path, **meta: Any) -> None:
    """``modelio.save_model`` on rank 0 (the only writer of a torchrun job)."""
    if D.world().main:
        modelio.save_model(net, arch, out, **meta)


def _rewind_state(blob: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The early-training weights ``train`` kept in ``blob`` (the lottery-ticket rewind
    point); rewinding to the trained weights instead would be pruning plus fine-tuning."""
    state = blob.get("meta", {}).get("rewind_state")
    if not isinstance(state, dict) or not state:
        raise ValueError(
            f"checkpoint {checkpoint!r} holds no early-training weights to rewind to; IMP "
            "with rewinding needs a checkpoint written by `sparse-adv-fast train` (it keeps "
            "the weights after the first epoch) or by a prune of one"
        )
    check_finite(state, f"checkpoint {checkpoint!r} (rewind state)")
    return state


def _save_pruned(net: nn.Module, arch: dict[str, Any], out: Path, method: str,
                 sparsity: float, scope: str, source: dict[str, Any]) -> dict[str, Any]:
    # The source's rewind point travels on, so a pruned model can be pruned further by IMP.
    keep = {k: source["meta"][k] for k in ("rewind_at", "rewind_state")
            if k in source.get("meta", {})}
    _save_model(net, arch, out, pruned_by=method, sparsity=sparsity, scope=scope, **keep)
    return {"out": str(out), "sparsity": modelio.zero_fraction(net)}


def _imp(net: nn.Module, runner: StageRunner, loaders: tuple, *, sparsity: float,
         rounds: int, scope: str, seed: int, rewind_state: dict[str, Any],
         kw: dict[str, Any]) -> nn.Module:
    # Each round trains with its own fit checkpoint: a resumed run replays finished rounds
    # from their final checkpoints (no training) and continues the interrupted one.
    start = _lib("nn").sparsity(net) if modelio.is_masked(net) else 0.0
    schedule = imp_schedule(sparsity, rounds, start)
    net = _lib("nn").sparsify(net) if not modelio.is_masked(net) else net
    counter = itertools.count(1)

    def train_round(m: nn.Module) -> None:
        stage = f"imp_round{next(counter)}"
        fit_stage(m, loaders, seed=seed, stage=stage, checkpoint=runner.scratch(stage), **kw)

    _lib("prune").imp(net, train_round, sparsities=schedule, scope=scope,
                      rewind_state=rewind_state)
    return net


def _hydra(net: nn.Module, arch: dict[str, Any], runner: StageRunner, loaders: tuple, *,
           sparsity: float, scope: str, epochs: int, eps: float, steps: int, seed: int,
           progress: bool, train_method: str, beta: float) -> nn.Module:
    # HYDRA's score training has no per-epoch checkpoint: its result is one stage, redone
    # whole (from the same seed) if the run is killed inside it. The scores train on the
    # loss the weights are fine-tuned with: TRADES under --train-method trades, else PGD.
    loss = "trades" if train_method == "trades" else "pgd"

    def scores() -> dict[str, Any]:
        seed_stage(seed, "hydra", loaders[0])
        pruned = _lib("prune").hydra(net, sparsity, loaders[0], epochs=epochs, eps=eps,
                                     alpha=eps / 4, steps=steps, scope=scope,
                                     progress=progress, loss=loss, beta=beta)
        return modelio.to_blob(pruned, arch)

    return modelio.from_blob(runner.run("hydra", scores), where=f"stage hydra of {runner.out_dir}")


# ---- iwi ------------------------------------------------------------------------------------
def iwi(
    *, source: str, mode: str, width: float | None, init: str | None, out: str, epochs: int,
    method: str, eps: float | None, lr: float, steps: int, batch_size: int, seed: int,
    data_dir: str | None, progress: bool = True, fresh: bool = False,
    augment: bool | None = None, **fit_settings: Any,
) -> dict[str, Any]:
    """Inverse Weights Inheritance from a saved source model, then adversarial training.

    ``ticket``: a dense model of the source's architecture and width; ``widen``: the same
    family at ``width`` (default twice the source's). ``init`` defaults to ``zero`` (ticket)
    and ``preserve`` (widen: the source's function, with trainable new units). Resumable
    (see the module doc). ``augment`` and ``fit_settings`` as for :func:`train`; the
    resolved config is saved in ``<out>.config.json``.
    """
    if mode not in IWI_MODES:
        raise ValueError(f"unknown IWI mode {mode!r}; choose one of {IWI_MODES}")
    out_path = check_output_file(out, inputs=[source])
    check_seed(seed)
    src, blob = load_checked(source)
    sarch = blob["arch"]
    check_data_dir(sarch["dataset"], data_dir)
    eps = eps_for(sarch["dataset"], eps)
    fit_cfg = _fit_config(method, epochs, lr, eps, steps, fit_settings)
    augment = _augment(sarch["dataset"], augment)
    if mode == "ticket":
        if width is not None and width != sarch["width"]:
            raise ValueError(
                f"IWI ticket mode keeps the source's width {sarch['width']}; got --width {width}"
            )
        width = sarch["width"]
    elif width is None:
        width = 2 * sarch["width"]
    elif width <= sarch["width"]:
        raise ValueError(f"IWI widen needs --width > the source's {sarch['width']}, got {width}")
    arch = modelio.arch_spec(sarch["name"], sarch["dataset"], width)
    if init is None:
        init = "preserve" if mode == "widen" else "zero"
    seed_stage(seed, "init")
    target = _lib("iwi").inherit(src, modelio.build(arch), mode=mode, init=init)
    settings = dict(command="iwi", source=_digest(source), mode=mode, width=width, init=init,
                    method=method, epochs=epochs, eps=eps, lr=lr, steps=steps,
                    batch_size=batch_size, seed=seed, data_dir=data_dir,
                    **_extras(fit_settings, augment))
    loaders = _train_val(sarch["dataset"], batch_size, data_dir, seed, augment)
    with _run(out_path, settings, fresh) as runner, runtime.threads_for(sarch["dataset"]):
        hist = fit_stage(target, loaders, seed=seed, stage="iwi",
                         checkpoint=runner.scratch("iwi"), where=str(out_path),
                         config=fit_cfg, progress=progress, process_group=job_group())
        _save_model(target, arch, out_path, iwi_mode=mode, source=os.fspath(source),
                    history=hist.as_dict())
        _save_config(out_path, settings, fit_cfg)
    return {"out": str(out_path), "width": width}


# ---- eval -----------------------------------------------------------------------------------
def evaluate(
    *, checkpoint: str, attacks: tuple[str, ...], eps: float | None, max_batches: int | None,
    batch_size: int, data_dir: str | None, progress: bool = True,
) -> dict[str, Any]:
    """Clean / robust accuracy of a saved model on its dataset's test split, as a dict."""
    check_suites(attacks)
    net, blob = load_checked(checkpoint)
    arch = blob["arch"]
    check_data_dir(arch["dataset"], data_dir)
    eps = eps_for(arch["dataset"], eps)
    _, test = _lib("data").loaders(arch["dataset"], batch_size=batch_size, data_dir=data_dir)
    with runtime.threads_for(arch["dataset"]):
        res = _lib("train").evaluate(net.eval(), test, attacks=tuple(attacks), eps=eps,
                                     max_batches=max_batches, progress=progress,
                                     seed=0,
                                     process_group=job_group())
    return {
        "checkpoint": os.fspath(checkpoint),
        "arch": arch,
        "eps": eps,
        "norm": "linf",
        "sparsity": modelio.zero_fraction(net),
        "clean": float(res["clean"]),
        "robust": {k: float(v) for k, v in res["robust"].items()},
        "worst_case": float(res["worst_case"]),
        "n": int(res["n"]),
        # Per-suite reports where a suite gives one (autoattack: accuracy after each stage,
        # what each stage broke, the gradient-masking verdict and its reasons).
        "details": {name: res[name] for name in attacks if isinstance(res.get(name), dict)},
    }


def dump_json(obj: Any, path: str | None) -> None:
    """``obj`` as JSON to ``path`` (atomically) or, when None, to stdout."""
    text = json.dumps(obj, indent=2) + "\n"
    if path is None:
        sys.stdout.write(text)
    else:
        _lib("checkpoint").write_atomic(path, text)


# ---- bench ----------------------------------------------------------------------------------
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def benchmarks_dir() -> Path:
    """The source checkout's top-level ``benchmarks/`` folder (FileNotFoundError if absent)."""
    bench = SOURCE_ROOT / "benchmarks"
    if not bench.is_dir():
        raise FileNotFoundError(
            f"no benchmarks/ folder at {bench}: `bench` runs the benchmarks of a source checkout "
            "of sparse-adv-fast (an installed wheel does not ship them)"
        )
    return bench


def bench_suites() -> list[str]:
    """Names ``NAME`` of the ``benchmarks/bench_NAME.py`` files."""
    return sorted(p.stem[len("bench_"):] for p in benchmarks_dir().glob("bench_*.py"))


def bench_argv(
    *, json_out: str | os.PathLike[str], keyword: str | None = None, quick: bool = False,
    suite: str | None = None, extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The pytest command line of ``bench``: all of ``benchmarks/`` or ``bench_<suite>.py``,
    ``-m quick`` with ``quick``, ``-k keyword``, then ``extra``."""
    bdir = benchmarks_dir()
    target = bdir
    if suite is not None:
        target = bdir / f"bench_{suite}.py"
        if not _SUITE.match(suite) or not target.is_file():
            raise ValueError(f"unknown benchmark suite {suite!r}; choose one of "
                             f"{', '.join(bench_suites()) or '(none found)'}")
    cmd = [sys.executable, "-m", "pytest", str(target), "--benchmark-only",
           f"--benchmark-json={Path(json_out).resolve()}"]
    if quick:
        cmd += ["-m", "quick"]
    if keyword is not None:
        cmd += ["-k", keyword]
    return cmd + list(extra)


def bench(
    *, json_out: str, keyword: str | None = None, quick: bool = False,
    suite: str | None = None, extra: list[str] | tuple[str, ...] = (),
) -> int:
    """Run the benchmarks into ``json_out`` and print the ratio table; the exit status."""
    cmd = bench_argv(json_out=json_out, keyword=keyword, quick=quick, suite=suite, extra=extra)
    bdir = benchmarks_dir()
    out = Path(json_out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    rc = subprocess.call(cmd, cwd=bdir.parent)
    if rc != 0:
        return rc
    return subprocess.call([sys.executable, str(bdir / "report.py"), str(out)], cwd=bdir.parent)
