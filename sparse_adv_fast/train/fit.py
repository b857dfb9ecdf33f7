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
from . import state as rng
from .history import History
from .methods import DEFAULT_ALPHA, METHODS, MethodConfig
from .overfitting import OverfitDetector, _cpu_state
from .validation import accuracy, fixed_batches, pgd_accuracy

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")
NORMS = ("linf", "l2")
FORMAT = "sparse_adv_fast.fit/1"
_CKPT_KEYS = ("epoch", "method", "config", "stopped", "model", "optimizer", "scheduler", "rng",
              "history", "detector", "rewind_state")

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


def _split_loaders(loaders: Any) -> tuple[Any, Any]:
    if isinstance(loaders, Mapping):
        if "train" not in loaders:
            raise ValueError(f"fit: a loaders dict needs a 'train' key, got {sorted(loaders)}")
        val = loaders.get("val", loaders.get("test"))
        return loaders["train"], val
    if isinstance(loaders, (tuple, list)) and len(loaders) == 2:
        return loaders[0], loaders[1]
    raise ValueError("fit: loaders must be (train_loader, val_loader) or a dict with 'train' "
                     f"and 'val' (or 'test'), got {type(loaders).__name__}")


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


def _check_model_state(path: Path, saved: Mapping[str, Tensor], model: nn.Module) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(k for k in set(own) & set(saved)
                    if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
                for k in shapes[:5]))
        raise CheckpointError(
            f"checkpoint {path} was written for a different model: {'; '.join(parts)}"
        )


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
) -> History:
    """Train ``model`` in place with ``method`` and return its :class:`History`.

    Args:
        model: a model taking inputs in [0, 1] (masked layers keep pruned weights at 0).
        loaders: ``(train_loader, val_loader)`` or ``{"train": ..., "val": ...}``; the
            validation loader may be ``None`` (no validation, no overfitting check).
        method: ``"natural"``, ``"pgd"`` (PGD-AT), ``"trades"`` or ``"fgsm_rs"``.
        epochs, lr, momentum, weight_decay, optimizer (``"sgd"``/``"adam"``), schedule
            (``"cosine"``/``"step"`` (x0.1 at 50% and 75%)/``"none"``, stepped per epoch).
        eps, alpha, steps, norm: training attack; ``alpha`` defaults to ``eps / 4`` (pgd,
            trades) or ``1.25 * eps`` (fgsm_rs). ``beta``: TRADES weight.
        checkpoint: a file; after every epoch the full training state is written to it
            atomically. With ``resume`` an existing one is loaded and training continues
            from the next epoch, ending with the same result as an uninterrupted run.
            A corrupt or mismatched file raises :class:`CheckpointError`.
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be an nn.Module, got {type(model).__name__}")
    train_loader, val_loader = _split_loaders(loaders)
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

    # ---- resume -------------------------------------------------------------------------
    path = Path(checkpoint) if checkpoint is not None else None
    start = 0
    if path is not None and resume and path.exists():
        saved = ckpt_io.load(path)
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} is not a sparse_adv_fast fit checkpoint "
                                  f"(expected format {FORMAT!r})")
        absent = sorted(set(_CKPT_KEYS) - set(saved))
        if absent:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {absent}")
        if saved["method"] != method:
            raise CheckpointError(f"checkpoint {path} was written by method={saved['method']!r}"
                                  f", but fit was called with method={method!r}")
        for key, now in (("optimizer", optimizer), ("schedule", schedule)):
            if saved["config"].get(key) != now:
                raise CheckpointError(
                    f"checkpoint {path} was written with {key}={saved['config'].get(key)!r}, "
                    f"but fit was called with {key}={now!r}"
                )
        _check_model_state(path, saved["model"], model)
        try:  # everything that can still mismatch, before the model is overwritten
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
        history.resumed_from_epoch = start = int(saved["epoch"])
        emit(f"resumed from {path} after epoch {start}")
        if saved["stopped"]:
            return history

    def save(epoch: int, stopped: bool) -> None:
        if path is None:
            return
        ckpt_io.save_atomic({
            "format": FORMAT, "epoch": epoch, "method": method, "stopped": stopped,
            "config": {"optimizer": optimizer, "schedule": schedule},
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": rng.capture(gens), "history": history.as_dict(),
            "detector": detector.state_dict() if check_co else None,
            "rewind_state": history.rewind_state,
        }, path)

    if rewind_at == 0 and history.rewind_state is None:
        history.rewind_state = _cpu_state(model)

    # ---- train --------------------------------------------------------------------------
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        cur_lr = float(opt.param_groups[0]["lr"])
        loss_sum, correct, seen = _train_epoch(
            model, train_loader, loss_fn, cfg, opt, dev, max_batches, history, rewind_at,
            progress, f"{method} {epoch}/{epochs}",
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
                emit(f"catastrophic overfitting at epoch {epoch}: PGD accuracy {robust:.3f} vs "
                     f"best {detector.best_acc:.3f} (epoch {detector.best_epoch}); rolled back "
                     "to the best epoch and stopped")
            history.best_epoch = detector.best_epoch
            history.best_val_pgd_acc = detector.best_acc
        save(epoch, stopped)
        if callback is not None:
            callback(epoch, history)
        if stopped:
            break
    return history


def _train_epoch(
    model: nn.Module, loader: DataLoader, loss_fn: Callable, cfg: MethodConfig,
    opt: torch.optim.Optimizer, dev: torch.device, max_batches: int | None,
    history: History, rewind_at: int | None, progress: bool, desc: str,
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
                _check_finite(loss_sum, history.iterations)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}",
                                acc=f"{int(correct) / seen:.3f}")
    _check_finite(loss_sum, history.iterations)
    return float(loss_sum), int(correct), seen


def _check_finite(loss_sum: Tensor, iteration: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise FloatingPointError(
            f"fit: the training loss became non-finite (by iteration {iteration}); lower the "
            "learning rate or check the data"
        )


def _fmt(r: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"epoch {r['epoch']}: loss {f(r['train_loss'])} train_acc {f(r['train_acc'])} "
            f"val_clean {f(r['val_clean_acc'])} val_pgd {f(r['val_pgd_acc'])} "
            f"lr {r['lr']:.4g} ({r['time']:.1f}s)")


__all__ = ["FORMAT", "OPTIMIZERS", "SCHEDULES", "fit"]
