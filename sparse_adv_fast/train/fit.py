"""``fit``: natural / PGD-AT / TRADES / FGSM-RS training with validation, catastrophic-
overfitting roll-back, lottery-ticket rewind point and exact, atomic checkpoint/resume.

``fit`` is a short loop over small steps, each a function of the :class:`_Run` it works on:
:func:`_make_optimizer`, :func:`_schedule`, :func:`_train_epoch` (one :func:`_train_step`
per batch, whose attack radius comes from :func:`_attack_config`), :func:`_validate`,
:func:`_overfitting` and :func:`_checkpoint`. Every setting is a field of
:class:`~sparse_adv_fast.train.config.TrainConfig`, checked before any work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt_io
from .. import distributed as D
from ..checkpoint import CheckpointError
from ..config import check_keys
from ..finite import NonFiniteError, check_finite, first_nonfinite
from . import collapse
from . import resume as rs
from . import state as rng
from .config import CYCLIC_PEAK, NORMS, OPTIMIZERS, SCHEDULES, TrainConfig
from .history import History
from .methods import METHODS, MethodConfig
from .overfitting import OverfitDetector, _cpu_state
from .validation import accuracy, fixed_batches, pgd_accuracy

FORMAT = rs.FORMAT

_logger = logging.getLogger("sparse_adv_fast.train")
_SYNC_EVERY = 10

Probe = Callable[[nn.Module, int], float]


def _split_loaders(loaders: Any, val_on_test: bool) -> tuple[Any, Any]:
    """``(train, val)`` from a bare loader, a ``(train, val)`` pair or a dict.

    A dict's ``"test"`` entry is used for validation only with ``val_on_test``: model
    selection and the overfitting check on the test split would bias the reported test
    numbers, so it never happens silently.
    """
    if isinstance(loaders, Mapping):
        if "train" not in loaders:
            raise ValueError(f"fit: a loaders dict needs a 'train' key, got {sorted(loaders)}")
        if "val" in loaders:
            return loaders["train"], loaders["val"]
        if "test" in loaders and not val_on_test:
            raise ValueError(
                "fit: the loaders dict has 'test' but no 'val'; fit does not validate on the "
                "test split unless asked: pass a held-out 'val' loader (data.split_loaders), "
                "val_on_test=True to validate on 'test' knowingly, or only 'train' for no "
                "validation"
            )
        return loaders["train"], loaders.get("test")
    if isinstance(loaders, (tuple, list)):
        if len(loaders) == 2:
            return loaders[0], loaders[1]
    elif loaders is not None and not isinstance(loaders, (str, bytes)) and hasattr(
            loaders, "__iter__"):
        return loaders, None  # a bare train loader: no validation
    raise ValueError("fit: loaders must be a train loader, (train_loader, val_loader) or a "
                     f"dict with 'train' and optionally 'val', got {type(loaders).__name__}")


def _emitter(log: Any) -> Callable[[str], None]:
    if log is None:
        return _logger.info
    if isinstance(log, logging.Logger):
        return log.info
    if callable(log):
        return log
    raise ValueError(f"fit: log must be None, a logging.Logger or a callable, got {log!r}")


def _data_seed(seed: int | None, gens: list[torch.Generator]) -> int | None:
    """The seed of the per-epoch shuffles: ``seed``, else the loader generator's own seed
    (``data.loaders(seed=s)`` seeds it with ``s``); ``None`` when fit controls no sampler."""
    if not gens:
        if seed is not None:  # it would be silently ignored
            raise ValueError(
                f"fit: seed={seed} sets the data order, but the train loader has no "
                "torch.Generator of its own to shuffle with (build it with "
                "DataLoader(..., generator=torch.Generator()) or data.loaders)"
            )
        return None
    return seed if seed is not None else int(gens[0].initial_seed())


def fit(
    model: nn.Module,
    loaders: Any,
    method: str | None = None,
    *,
    config: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    log: Any = None,
    co_probe: Probe | None = None,
    callback: Callable[[int, History], None] | None = None,
    process_group: Any = None,
    **settings: Any,
) -> History:
    """Train ``model`` in place and return its :class:`History`.

    The run's settings are a :class:`TrainConfig`: ``config`` (default: the defaults), with
    ``method`` and any keyword in ``settings`` (``epochs=``, ``lr=``, ``eps=``, ... every
    field of ``TrainConfig``) replacing its fields. Every value is checked before any work;
    an unknown keyword is a ValueError with the closest field name.

    Args:
        model: a model taking inputs in [0, 1] (masked layers keep pruned weights at 0).
        loaders: a train loader alone (no validation), ``(train_loader, val_loader)`` or
            ``{"train": ..., "val": ...}``; the validation loader may be ``None`` (no
            validation, no overfitting check). A dict with ``"test"`` but no ``"val"`` is
            refused unless ``val_on_test=True``: fit never selects or stops on the test
            split behind the user's back.
        method: ``"natural"``, ``"pgd"`` (PGD-AT), ``"trades"`` or ``"fgsm_rs"``.
        config: the settings (see :class:`TrainConfig` for each field): ``epochs``, ``lr``,
            ``momentum``, ``weight_decay``, ``optimizer`` (``"sgd"``/``"adam"``),
            ``schedule`` (``"cosine"``/``"step"`` (x0.1 at 50% and 75%)/``"none"``, stepped
            per epoch; ``"cyclic"`` per iteration); the training attack ``eps``, ``alpha``
            (default ``eps / 4``; ``1.25 * eps`` for fgsm_rs), ``steps``, ``norm``,
            ``beta`` (TRADES weight), ``eps_warmup`` (epochs of a linear ramp of the radius
            from 0); ``rewind_at``: iteration ``k`` whose state_dict is kept as
            ``history.rewind_state`` (``0`` = the initial weights), for lottery-ticket
            rewinding; ``co_check`` (with ``co_ratio``, ``co_drop``): for the adversarial
            methods, stop at catastrophic overfitting: when the validation PGD accuracy
            falls below ``co_ratio`` x the best and by more than ``co_drop``, record
            ``history.co_detected_epoch``, roll the model back to the best epoch
            (``history.rolled_back``) and stop; ``collapse_check``: raise
            :class:`~sparse_adv_fast.train.collapse.TrainingCollapsed` when an epoch's
            training accuracy is at chance or the input gradient vanished for most of a
            batch; ``max_batches``: cap on batches per epoch (training and clean
            validation); ``val_batches``, ``val_steps``: validation PGD accuracy is
            PGD-``val_steps`` (step ``eps / 4``) on the first ``val_batches`` validation
            batches, fixed for the run; ``seed``: seed of the data order. When the train
            loader shuffles with its own ``torch.Generator`` (as ``data.loaders`` builds
            it), epoch ``e`` is shuffled from ``(seed, e)`` alone, so the order never
            depends on what the generator drew before (a cached loader, a restart); the
            generator is given back in its entry state. Defaults to the generator's
            ``initial_seed()``. A loader without a generator draws from the global RNG,
            which the checkpoint restores. ``val_on_test``: allow a loaders dict's
            ``"test"`` entry as the validation loader.
        checkpoint: a file; after every epoch the full training state and the run's
            settings are written to it atomically, never with non-finite weights. With
            ``resume`` an existing one is loaded and training continues from the next
            epoch, ending with the same result as an uninterrupted run. A corrupt or
            mismatched file, or one written with other settings (the error lists each
            difference), raises :class:`CheckpointError`; one holding NaN/Inf weights
            raises :class:`NonFiniteError`. The file is never changed by a refusal.
        progress: show a progress bar per epoch. device: where to train (default: the
            model's).
        log: ``None`` (the ``sparse_adv_fast.train`` logger), a Logger or a callable(str).
        co_probe: ``probe(model, epoch) -> accuracy`` replacing the validation PGD
            measurement of the overfitting check.
        callback: ``callback(epoch, history)`` after each epoch's checkpoint (on every rank).
        process_group: train data-parallel over this ``torch.distributed`` process group
            (``torch.distributed.group.WORLD`` for all processes); passing a model wrapped
            in ``DistributedDataParallel`` does the same over its group. Each rank trains
            on its shard of the train loader (a ``DistributedSampler``, reshuffled per
            epoch; ``batch_size / world_size`` per rank, so the loader's batch size is the
            global batch and must divide evenly) and attacks its own shard; gradients are
            averaged by DDP, which also starts every rank from rank 0's weights and
            masks. After every step the masks are compared across ranks, after every
            epoch all weights (a mismatch is a :class:`~sparse_adv_fast.distributed.
            DistributedError`); the epoch's loss and accuracy and the validation numbers
            are summed over the ranks, so every rank records the same history. Only rank
            0 writes the checkpoint (with every rank's RNG state, so a resumed run draws
            what an uninterrupted one would), logs and shows a progress bar. A check that
            fails on one rank raises on all of them.

    Raises:
        NonFiniteError: the loss or weights became NaN/Inf; the message names the epoch,
            the iteration and the first bad tensor. The last good checkpoint is kept.
        TrainingCollapsed: with ``collapse_check``, the run stopped learning; the message
            says what to try. The epoch is not checkpointed.
    """
    run = _prepare(model, loaders, (config, method, settings), checkpoint, progress, device,
                   log, co_probe, process_group)
    cfg = run.cfg
    with rng.preserved(run.gens):
        start, stopped = _start(run, resume)
        if stopped:
            return run.history
        for epoch in range(start + 1, cfg.epochs + 1):
            if _epoch(run, epoch, callback):
                break
    return run.history


@dataclass
class _Run:
    """Everything one ``fit`` call works on, built once by :func:`_prepare`."""

    model: nn.Module  # the plain module: attacked, validated, checkpointed
    cfg: TrainConfig
    train_loader: Any
    val_loader: Any
    emit: Callable[[str], None]
    dev: torch.device
    attack: MethodConfig
    loss_fn: Callable
    opt: torch.optim.Optimizer
    sched: Any
    per_iteration: bool  # the schedule steps per batch (cyclic), not per epoch
    warmup_iters: int  # iterations of the eps ramp (0: none)
    gens: list[torch.Generator]
    data_seed: int | None
    detector: OverfitDetector
    check_co: bool
    fixed: list[tuple[Tensor, Tensor]]
    path: Path | None
    progress: bool
    co_probe: Probe | None
    world: D.World = D.SINGLE
    loader_facts: dict[str, Any] = field(default_factory=dict)
    trained: nn.Module | None = None  # what the loss runs through: the DDP wrapper or model
    settings: dict[str, Any] = field(default_factory=dict)
    history: History = field(default_factory=History)


def _config(config: TrainConfig | None, method: str | None,
            settings: Mapping[str, Any]) -> TrainConfig:
    """The run's config: ``config`` (or the defaults) with ``method`` and ``settings``."""
    if config is None:
        config = TrainConfig()
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a TrainConfig, got {type(config).__name__}")
    changes = dict(settings)
    if method is not None:
        changes["method"] = method
    if not changes:
        return config
    check_keys(changes, TrainConfig.keys(), "fit")
    try:
        return config.replace(**changes)
    except ValueError as e:
        raise ValueError(f"fit: {e}") from None


def _prepare(model: nn.Module, loaders: Any, config: tuple, checkpoint: Any,
             progress: bool, device: Any, log: Any, co_probe: Probe | None,
             process_group: Any) -> _Run:
    """Check the settings (``config``: the arguments of :func:`_config`) and what the
    config cannot (model, loaders, log), then build the run; no training. In a
    data-parallel run a refusal on any rank stops every rank."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be an nn.Module, got {type(model).__name__}")
    world, model, wrapped = _parallel(model, process_group)
    with D.together(world, "fit's checks"):
        cfg = _config(*config)
        run = _build(model, loaders, cfg, checkpoint, progress, device, log, co_probe, world)
    run.trained = wrapped if wrapped is not None else _wrap(run)
    return run


def _parallel(model: nn.Module, process_group: Any) -> tuple[D.World, nn.Module, Any]:
    """``(world, plain module, DDP wrapper given by the caller or None)``."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        if process_group is not None:
            raise ValueError("fit: give a DistributedDataParallel model or process_group, "
                             "not both (the wrapper already has its group)")
        return D.of_group(model.process_group), model.module, model
    if process_group is None:
        return D.SINGLE, model, None
    return D.of_group(process_group), model, None


def _wrap(run: _Run) -> nn.Module:
    """The module the loss runs through: ``model`` itself, or DDP over the run's group
    (whose construction gives every rank rank 0's weights and masks)."""
    if not run.world.active:
        return run.model
    from torch.nn.parallel import DistributedDataParallel

    ids = [run.dev.index if run.dev.index is not None else torch.cuda.current_device()] \
        if run.dev.type == "cuda" else None
    return DistributedDataParallel(run.model, device_ids=ids, process_group=run.world.group)


def _sync_batchnorm(model: nn.Module, cfg: TrainConfig, world: D.World,
                    dev: torch.device) -> None:
    """Turn the BatchNorm layers into SyncBatchNorm (in place) when asked and useful."""
    if not (cfg.sync_batchnorm and world.active):
        return  # one process: SyncBatchNorm would be BatchNorm
    if dev.type != "cuda":
        raise ValueError("fit: sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no "
                         "CPU implementation); without it each rank normalises over its own "
                         "shard")
    for name, child in model.named_children():
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, world.group))


def _build(model: nn.Module, loaders: Any, cfg: TrainConfig, checkpoint: Any,
           progress: bool, device: Any, log: Any, co_probe: Probe | None,
           world: D.World) -> _Run:
    train_loader, val_loader = _split_loaders(loaders, cfg.val_on_test)
    if train_loader is None:
        raise ValueError("fit: the train loader is None")
    emit = _emitter(log) if world.main else quiet
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters")
    facts = rs.loader_facts(train_loader)  # the global batch, before sharding
    gens = rng.loader_generators(train_loader)
    data_seed = _data_seed(cfg.seed, gens)
    if world.active:
        train_loader = D.shard_loader(train_loader, world, what="fit",
                                      seed=data_seed if data_seed is not None else 0)
    batches = _batches_per_epoch(train_loader, cfg)
    dev = torch.device(device) if device is not None else params[0].device
    _sync_batchnorm(model, cfg, world, dev)
    model.to(dev)  # in place: the Parameter objects (SyncBatchNorm's too) stay the same
    opt = _make_optimizer(cfg, params)
    sched, per_iteration = _schedule(cfg, opt, batches)
    check_co = cfg.co_check and cfg.method != "natural" and (
        co_probe is not None or (val_loader is not None and cfg.eps > 0))
    run = _Run(
        model=model, cfg=cfg, train_loader=train_loader, val_loader=val_loader, emit=emit,
        dev=dev, attack=MethodConfig(eps=cfg.eps, alpha=cfg.resolved_alpha, steps=cfg.steps,
                                     norm=cfg.norm, beta=cfg.beta),
        loss_fn=METHODS[cfg.method], opt=opt, sched=sched, per_iteration=per_iteration,
        warmup_iters=max(1, round(cfg.eps_warmup * batches)) if cfg.eps_warmup > 0 else 0,
        gens=gens, data_seed=data_seed,
        detector=OverfitDetector(ratio=cfg.co_ratio, drop=cfg.co_drop), check_co=check_co,
        # Fixed for the whole run, fetched before any RNG state is restored.
        fixed=fixed_batches(val_loader, cfg.val_batches) if val_loader is not None else [],
        path=Path(checkpoint) if checkpoint is not None else None,
        progress=progress and world.main, co_probe=co_probe,
        history=History(method=cfg.method, rewind_at=cfg.rewind_at), world=world,
        loader_facts=facts,
    )
    run.settings = _settings(run)
    return run


def _batches_per_epoch(loader: Any, cfg: TrainConfig) -> int:
    """Batches an epoch trains on; needed (and checked) only by per-iteration settings."""
    if cfg.schedule != "cyclic" and cfg.eps_warmup == 0:
        return 0
    try:
        n = len(loader)
    except TypeError:
        raise ValueError("fit: schedule='cyclic' and eps_warmup need a train loader with "
                         "a length (batches per epoch)") from None
    return max(1, min(n, cfg.max_batches) if cfg.max_batches is not None else n)


def _make_optimizer(cfg: TrainConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or Adam, both with ``weight_decay``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, batches: int) -> tuple[Any, bool]:
    """``(scheduler or None, steps per iteration)``.

    The epoch schedules are stepped once per epoch, so a checkpoint at an epoch boundary
    captures them exactly; ``cyclic`` is stepped per batch and is a function of the
    iteration alone (so it resumes exactly too).
    """
    epochs = cfg.epochs
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1)), False
    if cfg.schedule == "step":
        milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones,
                                                    gamma=0.1), False
    if cfg.schedule == "cyclic":
        total = max(epochs, 1)

        def factor(k: int) -> float:  # k: batches already trained; lr of batch k + 1
            t = (k + 1) / batches
            return float(np.interp(t, [0.0, CYCLIC_PEAK * total, total], [0.0, 1.0, 0.0]))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor), True
    return None, False


def _settings(run: _Run) -> dict[str, Any]:
    """What a checkpoint records and a resume must match, in ``fit``'s argument order."""
    c = run.cfg
    s = {
        "method": c.method, "epochs": c.epochs, "optimizer": c.optimizer, "lr": c.lr,
        "momentum": c.momentum, "weight_decay": c.weight_decay, "schedule": c.schedule,
        "eps": run.attack.eps, "alpha": run.attack.alpha, "steps": c.steps,
        "beta": run.attack.beta, "norm": c.norm, "seed": run.data_seed,
        **run.loader_facts, "max_batches": c.max_batches,
        "rewind_at": c.rewind_at, "co_check": c.co_check, "co_ratio": c.co_ratio,
        "co_drop": c.co_drop, "co_probe": run.co_probe is not None,
        "validation": run.val_loader is not None, "val_batches": c.val_batches,
        "val_steps": c.val_steps,
    }
    # Recorded only when on, so checkpoints written before these options still resume.
    if c.eps_warmup > 0:
        s["eps_warmup"] = c.eps_warmup
    if run.world.active:
        s["world_size"] = run.world.size
    if c.sync_batchnorm:
        s["sync_batchnorm"] = True
    return s


def _start(run: _Run, resume: bool) -> tuple[int, bool]:
    """``(last finished epoch, whether the run had already stopped)``: resume from the
    checkpoint if there is one, then check the model and keep the rewind point 0."""
    start, stopped = 0, False
    path, w = run.path, run.world
    # Rank 0's view decides: a rank that cannot read the file then fails loudly.
    found = D.broadcast(path is not None and resume and path.exists(), w)
    with D.together(w, "resuming"):
        if found:
            run.history, stopped = _resume(path, run.settings, run.model, run.opt, run.sched,
                                           run.gens, run.detector, w)
            start = int(run.history.resumed_from_epoch or 0)
            run.emit(f"resumed from {path} after epoch {start}")
        else:
            # A NaN start would train to NaN and look like divergence; name the real
            # cause (a resumed model was checked with its checkpoint).
            check_finite(run.model, "fit: the model given to fit")
    if stopped:
        return start, True
    if start == 0 and w.rank > 0:
        # The ranks' own random starts: rank 0 draws what a single process would.
        torch.manual_seed(D.rank_seed(torch.initial_seed(), w.rank))
    if run.cfg.rewind_at == 0 and run.history.rewind_state is None:
        run.history.rewind_state = _cpu_state(run.model)
    return start, False


def _epoch(run: _Run, epoch: int, callback: Callable[[int, History], None] | None) -> bool:
    """Train, validate, check and checkpoint one epoch; whether the run stops after it."""
    t0 = time.perf_counter()
    cur_lr = float(run.opt.param_groups[0]["lr"])
    if run.data_seed is not None:
        rng.seed_epoch(run.gens, D.rank_seed(run.data_seed, run.world.rank), epoch)
    D.set_epoch(run.train_loader, epoch)
    stats = _train_epoch(run, epoch)
    if run.sched is not None and not run.per_iteration:
        run.sched.step()
    clean, robust = _validate(run, epoch)
    record = {
        "epoch": epoch, "train_loss": stats.loss_sum / max(stats.seen, 1),
        "train_acc": stats.correct / max(stats.seen, 1), "val_clean_acc": clean,
        "val_pgd_acc": robust, "lr": cur_lr, "time": time.perf_counter() - t0,
    }
    run.history.epochs.append(record)
    run.emit(_fmt(record))
    if run.cfg.collapse_check:
        collapse.check_chance(record["train_acc"], stats.seen, stats.classes, epoch,
                              run.history.iterations)
    stopped = _overfitting(run, epoch, robust)
    _checkpoint(run, epoch, stopped)
    if callback is not None:
        callback(epoch, run.history)
    return stopped


@dataclass
class _EpochStats:
    loss_sum: float
    correct: int
    seen: int
    classes: int  # the model's number of outputs (for the chance level)


def _attack_config(run: _Run, iteration: int) -> MethodConfig:
    """The training attack of ``iteration`` (1-based): during the eps warm-up the radius
    and the step are ``iteration / warmup_iters`` of their full values."""
    if run.warmup_iters == 0 or iteration >= run.warmup_iters:
        return run.attack
    f = iteration / run.warmup_iters
    return dataclasses.replace(run.attack, eps=run.attack.eps * f, alpha=run.attack.alpha * f)


def _train_step(run: _Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One optimisation step on a batch (attacked as the method says); ``(loss, logits)``."""
    h = run.history
    loss, logits = run.loss_fn(run.trained, x, y, _attack_config(run, h.iterations + 1),
                               target=run.model)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    if run.per_iteration:
        run.sched.step()
    h.iterations += 1
    D.check_masks(run.model, run.world, f"after iteration {h.iterations}")
    if run.cfg.rewind_at is not None and h.iterations == run.cfg.rewind_at:
        h.rewind_state = _cpu_state(run.model)
    return loss, logits


def _train_epoch(run: _Run, epoch: int) -> _EpochStats:
    """One pass over the train loader (at most ``max_batches``), with the finiteness and
    collapse checks."""
    from tqdm.auto import tqdm

    loader, dev, h, cfg = run.train_loader, run.dev, run.history, run.cfg
    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and cfg.max_batches is not None:
        total = min(total, cfg.max_batches)
    # Running sums stay on the device; they are read (a host sync) only every
    # _SYNC_EVERY batches, for the progress bar and the finiteness check.
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = classes = 0
    run.model.train()
    desc = f"{cfg.method} {epoch}/{cfg.epochs}"
    with tqdm(total=total, desc=desc, disable=not run.progress, leave=False) as bar:
        for i, (x, y) in enumerate(loader):
            if cfg.max_batches is not None and i >= cfg.max_batches:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss, logits = _train_step(run, x, y)
            n = y.shape[0]
            loss_sum += loss.detach() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            classes = int(logits.shape[1])
            bar.update(1)
            if h.iterations % _SYNC_EVERY == 0 or i == 0:
                with D.together(run.world, f"the checks of epoch {epoch}"):
                    _check_loss(loss_sum, run.model, epoch, h.iterations)
                    if cfg.collapse_check and cfg.method != "natural" and cfg.eps > 0:
                        collapse.check_gradients(run.model, x, y, epoch, h.iterations)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                acc=f"{int(correct) / seen:.3f}")
    with D.together(run.world, f"the checks of epoch {epoch}"):
        _check_loss(loss_sum, run.model, epoch, h.iterations)
        _check_weights(run.model, epoch, h.iterations)
    D.average_buffers(run.model, run.world)
    D.check_weights(run.model, run.world, f"after epoch {epoch}")
    total_loss, total_correct, total_seen = D.all_sum(
        [float(loss_sum), float(correct), float(seen)], run.world, dev)
    return _EpochStats(total_loss, int(total_correct), int(total_seen), classes)


def _validate(run: _Run, epoch: int) -> tuple[float | None, float | None]:
    """``(clean accuracy, PGD accuracy)`` on the validation data (``None`` where absent)."""
    w = run.world
    clean = (accuracy(run.model, run.val_loader, device=run.dev,
                      max_batches=run.cfg.max_batches, world=w)
             if run.val_loader is not None else None)
    if run.co_probe is not None:  # every rank's probe runs; rank 0's number counts
        return clean, D.broadcast(float(run.co_probe(run.model, epoch)), w)
    if not run.fixed or run.cfg.eps == 0:
        return clean, None
    return clean, pgd_accuracy(run.model, run.fixed, eps=run.attack.eps,
                               alpha=run.attack.eps / 4, steps=run.cfg.val_steps,
                               norm=run.cfg.norm, device=run.dev, world=w)


def _overfitting(run: _Run, epoch: int, robust: float | None) -> bool:
    """Feed the overfitting detector; at a collapse roll back to the best epoch and stop."""
    if not run.check_co or robust is None:
        return False
    h, det = run.history, run.detector
    stopped = False
    if det.update(epoch, robust, run.model):
        h.co_detected_epoch = epoch
        det.restore_best(run.model)
        h.rolled_back = True
        stopped = True
        run.emit(f"catastrophic overfitting at epoch {epoch}: PGD accuracy {robust:.3f} vs "
                 f"best {det.best_acc:.3f} (epoch {det.best_epoch}); rolled back to the best "
                 "epoch and stopped")
    h.best_epoch = det.best_epoch
    h.best_val_pgd_acc = det.best_acc
    return stopped


def _checkpoint(run: _Run, epoch: int, stopped: bool) -> None:
    """Write the full training state after ``epoch`` (if the run has a checkpoint file)."""
    if run.path is None:
        return
    states = D.gather(rng.capture(run.gens), run.world)  # every rank's, for its resume
    if not run.world.main:
        return
    # No finiteness scan here: the epoch's _check_weights passed just before, and a
    # roll-back restores a state captured after such a check.
    ckpt_io.save_atomic({
        "format": FORMAT, "epoch": epoch, "method": run.cfg.method, "stopped": stopped,
        "config": run.settings, "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict() if run.sched is not None else None,
        "rng": states if run.world.active else states[0], "history": run.history.as_dict(),
        "detector": run.detector.state_dict() if run.check_co else None,
        "rewind_state": run.history.rewind_state,
    }, run.path)

def _resume(
    path: Path, settings: Mapping[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
    sched: Any, gens: list[torch.Generator], detector: OverfitDetector, world: D.World,
) -> tuple[History, bool]:
    """Load checkpoint ``path`` into the run; return its History and whether it had stopped.

    Everything that can refuse the file is checked before the model is overwritten.
    """
    saved = ckpt_io.load(path)
    rs.check_format(path, saved)
    rs.check_model_state(path, saved["model"], model)  # another model: say that first
    rs.check_settings(path, saved["config"], settings)
    rs.check_saved_finite(path, saved)
    try:
        opt.load_state_dict(saved["optimizer"])
        if sched is not None and saved["scheduler"] is not None:
            sched.load_state_dict(saved["scheduler"])
        rng.restore(saved["rng"][world.rank] if world.active else saved["rng"], gens)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not match this run's optimizer, "
                              f"schedule or loader: {e}") from e
    model.load_state_dict(saved["model"])
    if saved["detector"] is not None:
        detector.load_state_dict(saved["detector"])
    history = History.from_dict(saved["history"])
    history.rewind_state = saved["rewind_state"]
    history.resumed_from_epoch = int(saved["epoch"])
    return history, bool(saved["stopped"])


_ADVICE = "lower the learning rate or check the data"


def _check_loss(loss_sum: Tensor, model: nn.Module, epoch: int, iteration: int) -> None:
    """Raise :class:`NonFiniteError` once the epoch's summed loss is NaN/Inf."""
    if not bool(torch.isfinite(loss_sum)):
        bad = first_nonfinite(model)
        layer = f"first non-finite tensor {bad}" if bad else "the weights are still finite"
        raise NonFiniteError(
            f"fit: the training loss became non-finite in epoch {epoch} (by iteration "
            f"{iteration}; {layer}); {_ADVICE}"
        )


def _check_weights(model: nn.Module, epoch: int, iteration: int) -> None:
    """Raise :class:`NonFiniteError` if a step left NaN/Inf weights behind a finite loss."""
    check_finite(model, f"fit: the weights became non-finite in epoch {epoch} (by iteration "
                        f"{iteration}); {_ADVICE}")


def quiet(_msg: str) -> None:
    """A ``log`` callback that discards every message."""


def _fmt(r: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"epoch {r['epoch']}: loss {f(r['train_loss'])} train_acc {f(r['train_acc'])} "
            f"val_clean {f(r['val_clean_acc'])} val_pgd {f(r['val_pgd_acc'])} "
            f"lr {r['lr']:.4g} ({r['time']:.1f}s)")


__all__ = ["FORMAT", "NORMS", "OPTIMIZERS", "SCHEDULES", "TrainConfig", "fit"]
