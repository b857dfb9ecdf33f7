"""``fit``: natural / PGD-AT / TRADES / FGSM-RS training with validation, catastrophic-
overfitting roll-back, lottery-ticket rewind point and exact, atomic checkpoint/resume."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt_io
from ..checkpoint import CheckpointError
from ..finite import NonFiniteError, check_finite, first_nonfinite
from . import resume as rs
from . import state as rng
from .history import History
from .methods import DEFAULT_ALPHA, METHODS, MethodConfig
from .overfitting import OverfitDetector, _cpu_state
from .validation import accuracy, fixed_batches, pgd_accuracy

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")
NORMS = ("linf", "l2")
FORMAT = rs.FORMAT

_logger = logging.getLogger("sparse_adv_fast.train")
_SYNC_EVERY = 10

Probe = Callable[[nn.Module, int], float]


def _num(name: str, v: Any, *, lo: float | None = None, strict: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"fit: {name} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if strict else v < lo):
        raise ValueError(f"fit: {name} must be {'>' if strict else '>='} {lo}, got {v!r}")


def _int(name: str, v: Any, lo: int, *, optional: bool = False) -> None:
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"fit: {name} must be an int >= {lo}{' or None' if optional else ''}, "
                         f"got {v!r}")


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


def _make_optimizer(name: str, params: list[Tensor], lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _make_schedule(name: str, opt: torch.optim.Optimizer, epochs: int):
    # Stepped once per epoch, so a checkpoint at an epoch boundary captures it exactly.
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if name == "step":
        milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return None


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
    method: str = "natural",
    *,
    epochs: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    eps: float = 8 / 255,
    alpha: float | None = None,
    steps: int = 10,
    beta: float = 6.0,
    norm: str = "linf",
    checkpoint: str | Path | None = None,
    resume: bool = True,
    rewind_at: int | None = None,
    co_check: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    log: Any = None,
    val_batches: int = 2,
    val_steps: int = 10,
    co_ratio: float = 0.5,
    co_drop: float = 0.2,
    co_probe: Probe | None = None,
    callback: Callable[[int, History], None] | None = None,
    seed: int | None = None,
    val_on_test: bool = False,
) -> History:
    """Train ``model`` in place with ``method`` and return its :class:`History`.

    Args:
        model: a model taking inputs in [0, 1] (masked layers keep pruned weights at 0).
        loaders: a train loader alone (no validation), ``(train_loader, val_loader)`` or
            ``{"train": ..., "val": ...}``; the validation loader may be ``None`` (no
            validation, no overfitting check). A dict with ``"test"`` but no ``"val"`` is
            refused unless ``val_on_test=True``: fit never selects or stops on the test
            split behind the user's back.
        method: ``"natural"``, ``"pgd"`` (PGD-AT), ``"trades"`` or ``"fgsm_rs"``.
        epochs, lr, momentum, weight_decay, optimizer (``"sgd"``/``"adam"``), schedule
            (``"cosine"``/``"step"`` (x0.1 at 50% and 75%)/``"none"``, stepped per epoch).
        eps, alpha, steps, norm: training attack; ``alpha`` defaults to ``eps / 4`` (pgd,
            trades) or ``1.25 * eps`` (fgsm_rs). ``beta``: TRADES weight.
        checkpoint: a file; after every epoch the full training state and the run's
            settings are written to it atomically, never with non-finite weights. With
            ``resume`` an existing one is loaded and training continues from the next
            epoch, ending with the same result as an uninterrupted run. A corrupt or
            mismatched file, or one written with other settings (the error lists each
            difference), raises :class:`CheckpointError`; one holding NaN/Inf weights
            raises :class:`NonFiniteError`. The file is never changed by a refusal.
        rewind_at: iteration ``k`` whose state_dict is kept as ``history.rewind_state``
            (``0`` = the initial weights), for lottery-ticket rewinding.
        co_check: for the adversarial methods, stop at catastrophic overfitting: when the
            validation PGD accuracy falls below ``co_ratio`` x the best and by more than
            ``co_drop``, record ``history.co_detected_epoch``, roll the model back to the
            best epoch (``history.rolled_back``) and stop.
        max_batches: cap on batches per epoch (training and clean validation).
        log: ``None`` (the ``sparse_adv_fast.train`` logger), a Logger or a callable(str).
        val_batches, val_steps: validation PGD accuracy is PGD-``val_steps`` (step
            ``eps / 4``) on the first ``val_batches`` validation batches, fixed for the run.
        co_probe: ``probe(model, epoch) -> accuracy`` replacing that PGD measurement.
        callback: ``callback(epoch, history)`` after each epoch's checkpoint.
        seed: seed of the data order. When the train loader shuffles with its own
            ``torch.Generator`` (as ``data.loaders`` builds it), epoch ``e`` is shuffled
            from ``(seed, e)`` alone, so the order never depends on what the generator
            drew before (a cached loader, a restart); the generator is given back in its
            entry state. Defaults to the generator's ``initial_seed()``. A loader
            without a generator draws from the global RNG, which the checkpoint restores.
        val_on_test: allow a loaders dict's ``"test"`` entry as the validation loader.

    Raises:
        NonFiniteError: the loss or weights became NaN/Inf; the message names the epoch,
            the iteration and the first bad tensor. The last good checkpoint is kept.
    """
    # ---- validate everything before any work ------------------------------------------
    if method not in METHODS:
        raise ValueError(f"fit: unknown method {method!r}; choose one of {tuple(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"fit: unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"fit: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if norm not in NORMS:
        raise ValueError(f"fit: unknown norm {norm!r}; choose one of {NORMS}")
    _int("epochs", epochs, 0)
    _num("lr", lr, lo=0, strict=True)
    _num("momentum", momentum, lo=0)
    _num("weight_decay", weight_decay, lo=0)
    _num("eps", eps, lo=0)
    if alpha is not None:
        _num("alpha", alpha, lo=0, strict=True)
    _num("beta", beta, lo=0)
    _int("steps", steps, 1)
    _int("rewind_at", rewind_at, 0, optional=True)
    _int("max_batches", max_batches, 1, optional=True)
    _int("val_batches", val_batches, 1)
    _int("val_steps", val_steps, 1)
    _int("seed", seed, 0, optional=True)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be an nn.Module, got {type(model).__name__}")
    train_loader, val_loader = _split_loaders(loaders, val_on_test)
    if train_loader is None:
        raise ValueError("fit: the train loader is None")
    emit = _emitter(log)
    detector = OverfitDetector(ratio=co_ratio, drop=co_drop)  # validates the thresholds
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters")

    dev = torch.device(device) if device is not None else params[0].device
    model.to(dev)
    cfg = MethodConfig(eps=float(eps), alpha=float(alpha if alpha is not None
                                                   else DEFAULT_ALPHA[method] * eps),
                       steps=steps, norm=norm, beta=float(beta))
    loss_fn = METHODS[method]
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay)
    sched = _make_schedule(schedule, opt, epochs)
    gens = rng.loader_generators(train_loader)
    data_seed = _data_seed(seed, gens)
    settings = {
        "method": method, "epochs": epochs, "optimizer": optimizer, "lr": float(lr),
        "momentum": float(momentum), "weight_decay": float(weight_decay),
        "schedule": schedule, "eps": cfg.eps, "alpha": cfg.alpha, "steps": steps,
        "beta": cfg.beta, "norm": norm, "seed": data_seed, **rs.loader_facts(train_loader),
        "max_batches": max_batches, "rewind_at": rewind_at, "co_check": bool(co_check),
        "co_ratio": float(co_ratio), "co_drop": float(co_drop), "co_probe": co_probe is not None,
        "validation": val_loader is not None, "val_batches": val_batches,
        "val_steps": val_steps,
    }
    history = History(method=method, rewind_at=rewind_at)
    check_co = co_check and method != "natural" and (
        co_probe is not None or (val_loader is not None and eps > 0))
    # Fixed for the whole run, fetched before any RNG state is restored.
    fixed = fixed_batches(val_loader, val_batches) if val_loader is not None else []

    def probe(epoch: int) -> float | None:
        if co_probe is not None:
            return float(co_probe(model, epoch))
        if not fixed or eps == 0:
            return None
        return pgd_accuracy(model, fixed, eps=cfg.eps, alpha=cfg.eps / 4, steps=val_steps,
                            norm=norm, device=dev)

    path = Path(checkpoint) if checkpoint is not None else None

    def save(epoch: int, stopped: bool) -> None:
        if path is not None:
            _save_if_finite(path, {
                "format": FORMAT, "epoch": epoch, "method": method, "stopped": stopped,
                "config": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "rng": rng.capture(gens), "history": history.as_dict(),
                "detector": detector.state_dict() if check_co else None,
                "rewind_state": history.rewind_state,
            }, epoch)

    with rng.preserved(gens):
        # ---- resume ---------------------------------------------------------------------
        start, stopped = 0, False
        if path is not None and resume and path.exists():
            history, stopped = _resume(path, settings, model, opt, sched, gens, detector)
            start = int(history.resumed_from_epoch or 0)
            emit(f"resumed from {path} after epoch {start}")
        if stopped:
            return history
        # A NaN start would train to NaN and look like divergence; name the real cause.
        check_finite(model, "fit: the model given to fit")
        if rewind_at == 0 and history.rewind_state is None:
            history.rewind_state = _cpu_state(model)

        # ---- train ----------------------------------------------------------------------
        for epoch in range(start + 1, epochs + 1):
            t0 = time.perf_counter()
            cur_lr = float(opt.param_groups[0]["lr"])
            if data_seed is not None:
                rng.seed_epoch(gens, data_seed, epoch)
            loss_sum, correct, seen = _train_epoch(
                model, train_loader, loss_fn, cfg, opt, dev, max_batches, history, rewind_at,
                progress, epoch, f"{method} {epoch}/{epochs}",
            )
            if sched is not None:
                sched.step()
            clean = (accuracy(model, val_loader, device=dev, max_batches=max_batches)
                     if val_loader is not None else None)
            robust = probe(epoch)
            record = {
                "epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1), "val_clean_acc": clean,
                "val_pgd_acc": robust, "lr": cur_lr, "time": time.perf_counter() - t0,
            }
            history.epochs.append(record)
            emit(_fmt(record))
            stopped = False
            if check_co and robust is not None:
                if detector.update(epoch, robust, model):
                    history.co_detected_epoch = epoch
                    detector.restore_best(model)
                    history.rolled_back = True
                    stopped = True
                    emit(f"catastrophic overfitting at epoch {epoch}: PGD accuracy "
                         f"{robust:.3f} vs best {detector.best_acc:.3f} (epoch "
                         f"{detector.best_epoch}); rolled back to the best epoch and stopped")
                history.best_epoch = detector.best_epoch
                history.best_val_pgd_acc = detector.best_acc
            save(epoch, stopped)
            if callback is not None:
                callback(epoch, history)
            if stopped:
                break
    return history


def _resume(
    path: Path, settings: Mapping[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
    sched: Any, gens: list[torch.Generator], detector: OverfitDetector,
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
        rng.restore(saved["rng"], gens)
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


def _save_if_finite(path: Path, state: dict[str, Any], epoch: int) -> None:
    """Write the checkpoint atomically unless its weights are non-finite.

    The epoch's own check normally raises first; this guard makes "a checkpoint never
    holds NaN/Inf weights" hold on every path (the roll-back included), so the last good
    checkpoint is never replaced by a bad one.
    """
    check_finite(state["model"], f"fit: epoch {epoch} not saved to {path}")
    ckpt_io.save_atomic(state, path)


def _train_epoch(
    model: nn.Module, loader: DataLoader, loss_fn: Callable, cfg: MethodConfig,
    opt: torch.optim.Optimizer, dev: torch.device, max_batches: int | None,
    history: History, rewind_at: int | None, progress: bool, epoch: int, desc: str,
) -> tuple[float, int, int]:
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    # Running sums stay on the device; they are read (a host sync) only every
    # _SYNC_EVERY batches, for the progress bar and the finiteness check.
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = 0
    model.train()
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss, logits = loss_fn(model, x, y, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.iterations += 1
            if rewind_at is not None and history.iterations == rewind_at:
                history.rewind_state = _cpu_state(model)
            n = y.shape[0]
            loss_sum += loss.detach() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            bar.update(1)
            if history.iterations % _SYNC_EVERY == 0:
                _check_loss(loss_sum, model, epoch, history.iterations)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                acc=f"{int(correct) / seen:.3f}")
    _check_loss(loss_sum, model, epoch, history.iterations)
    _check_weights(model, epoch, history.iterations)
    return float(loss_sum), int(correct), seen


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


def _fmt(r: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"epoch {r['epoch']}: loss {f(r['train_loss'])} train_acc {f(r['train_acc'])} "
            f"val_clean {f(r['val_clean_acc'])} val_pgd {f(r['val_pgd_acc'])} "
            f"lr {r['lr']:.4g} ({r['time']:.1f}s)")


__all__ = ["FORMAT", "OPTIMIZERS", "SCHEDULES", "fit"]
