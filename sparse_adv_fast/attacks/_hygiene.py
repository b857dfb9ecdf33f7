"""Evaluation hygiene shared by every attack: one context manager and the input checks.

Every attack runs its model inside :func:`attack_mode` (eval mode, parameters frozen, both
restored afterwards) and validates its arguments with :func:`check_config` and
:func:`check_batch` before doing any work.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..ops import _cache

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw", "dlr")
# Fraction of the batch with a zero / non-finite input gradient above which we warn.
MASKING_FRACTION = 0.5
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class GradientMaskingWarning(UserWarning):
    """The input gradient vanished or was non-finite for most of a batch: the attack is
    probably blind (gradient masking / obfuscation), so its robust accuracy is suspect."""


def check_autograd(where: str = "attacks") -> None:
    """Refuse to run under ``torch.inference_mode()``: gradient attacks need autograd, and
    inference mode cannot be lifted from inside (``enable_grad`` does not undo it)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{where}: called under torch.inference_mode(), but attacks need autograd (they "
            "differentiate the loss with respect to the input); call it outside "
            "inference_mode (torch.no_grad() is fine: the attack re-enables gradients)"
        )


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode with every parameter's ``requires_grad`` off.

    Per-module ``training`` flags and per-parameter ``requires_grad`` flags are restored on
    exit (also on error); parameters' ``.grad`` is never touched. Nesting is safe. Grad
    mode is enabled inside, so attacks work when called under ``torch.no_grad()``; under
    ``torch.inference_mode()`` they raise (:func:`check_autograd`). The weights are frozen
    for the op cache too (:func:`sparse_adv_fast.ops._cache.frozen`): the masked weight /
    CSR of each layer is built once per attack and reused by all its forwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attacks need a torch.nn.Module model, got {type(model).__name__}")
    check_autograd()
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad(), _cache.frozen(p for p, _ in flags):
            yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, req in flags:
            p.requires_grad_(req)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(
    where: str, *, eps: float, norm: str, loss: str | None = None, alpha: float | None = None,
    steps: int | None = None, restarts: int = 1, clip: tuple[float, float] = (0.0, 1.0),
    losses: tuple[str, ...] = LOSSES,
) -> tuple[float, float]:
    """Validate an attack's scalar settings; returns ``clip`` as ``(lo, hi)`` floats."""
    if not _is_number(eps) or eps < 0:
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    if alpha is not None and (not _is_number(alpha) or alpha <= 0):
        raise ValueError(f"{where}: alpha (step size) must be a finite number > 0, got {alpha!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise ValueError(f"{where}: steps must be an integer >= 0, got {steps!r}")
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
        raise ValueError(f"{where}: restarts must be an integer >= 1, got {restarts!r}")
    if norm not in NORMS:
        raise ValueError(f"{where}: unknown norm {norm!r}; choose one of {NORMS}")
    if loss is not None and loss not in losses:
        raise ValueError(f"{where}: unknown loss {loss!r}; choose one of {losses}")
    try:
        lo, hi = float(clip[0]), float(clip[1])
    except (TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{where}: clip must be a (lo, hi) pair of numbers, got {clip!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{where}: clip must be finite with lo < hi, got {clip!r}")
    return lo, hi


def check_batch(where: str, x: Tensor, y: Tensor, lo: float, hi: float) -> None:
    """Check shapes, dtypes, finiteness and the data range of a batch (no model call)."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{where}: x and y must be tensors, got {type(x).__name__}, "
                        f"{type(y).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{where}: x needs a batch dimension and features, got shape "
                         f"{tuple(x.shape)}")
    if y.dim() != 1 or y.dtype not in _INT_DTYPES:
        raise ValueError(f"{where}: y must be a 1-D tensor of integer class labels, got "
                         f"shape {tuple(y.shape)} dtype {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: x and y batch sizes differ ({x.shape[0]} vs {y.shape[0]})")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: empty batch")
    # One fused pass over x for both checks: NaN propagates into min/max, inf shows there.
    xmin_t, xmax_t = torch.aminmax(x.detach())
    xmin, xmax = float(xmin_t), float(xmax_t)
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        raise ValueError(f"{where}: x contains NaN or infinite values")
    if xmin < lo or xmax > hi:
        raise ValueError(
            f"{where}: inputs must lie in the data range [{lo:g}, {hi:g}], found "
            f"[{xmin:g}, {xmax:g}]; keep inputs in that range and put normalisation in the "
            "model (sparse_adv_fast.nn.Normalize), or pass clip=(lo, hi)"
        )
    if int(y.min()) < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {int(y.min())}")


def check_labels(where: str, y: Tensor, n_classes: int, min_classes: int = 2) -> None:
    """Labels must index the model's outputs; some losses need several classes."""
    if n_classes < min_classes:
        raise ValueError(f"{where}: this loss needs a model with >= {min_classes} outputs, "
                         f"the model has {n_classes}")
    top = int(y.max())
    if top >= n_classes:
        raise ValueError(f"{where}: label {top} is out of range for a model with {n_classes} "
                         f"outputs (labels must be in [0, {n_classes - 1}])")


def check_gradient(where: str, grad: Tensor) -> None:
    """Warn (:class:`GradientMaskingWarning`) when the input gradient is exactly zero or
    non-finite for more than half of the batch."""
    flat = grad.detach().flatten(1)
    bad = (~torch.isfinite(flat)).any(dim=1) | (flat == 0).all(dim=1)
    frac = float(bad.float().mean())
    if frac > MASKING_FRACTION:
        warnings.warn(
            f"{where}: the input gradient is zero or non-finite for {frac:.0%} of the batch; "
            "the attack cannot make progress there (gradient masking?), so robust accuracy "
            "from it is unreliable",
            GradientMaskingWarning,
            stacklevel=4,
        )
