"""Collapse detector: stop a run that is not learning instead of letting it train on.

Adversarial training from scratch at a large radius (PGD-AT on MNIST at eps 0.3 with a
high learning rate and no warm-up) can fall into the constant predictor: every input gets
the most frequent class, the ReLUs die and the input gradient vanishes, so the attack (and
the training signal) is blind. Two cheap signs, either of which stops ``fit`` with a
:class:`TrainingCollapsed` naming what to try:

* the training accuracy of a whole epoch is at chance (at most ``CHANCE_FACTOR / K`` for
  ``K`` classes, over at least ``MIN_SAMPLES_PER_CLASS * K`` samples);
* for the adversarial methods, the input gradient of the loss is exactly zero for most
  (``ZERO_GRAD_FRACTION``) of a probed batch: the attack is blind.

Chance accuracy is judged only after ``MIN_ITERATIONS`` updates (a slow start is not a
collapse).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import eval_mode

CHANCE_FACTOR = 1.25
MIN_SAMPLES_PER_CLASS = 10
# A slow start is not a collapse: chance accuracy is judged only once the run has made at
# least this many updates (real MNIST: ~850 per epoch; the tiny smoke runs: a handful).
MIN_ITERATIONS = 50
ZERO_GRAD_FRACTION = 0.5
ADVICE = ("try a lower lr, an eps warm-up (eps_warmup=<epochs>, or a cyclic schedule that "
          "starts from lr 0), and check the normalisation (inputs in [0, 1], "
          "saf.nn.Normalize as the model's first layer)")


class TrainingCollapsed(RuntimeError):
    """Training stopped learning (chance accuracy or vanished input gradients)."""


def check_chance(acc: float, seen: int, classes: int, epoch: int, iterations: int) -> None:
    """Raise :class:`TrainingCollapsed` if an epoch's training accuracy is at chance after
    ``iterations`` updates in all."""
    if classes < 2 or seen < MIN_SAMPLES_PER_CLASS * classes or iterations < MIN_ITERATIONS:
        return  # too few samples to tell chance from slow learning
    if acc <= CHANCE_FACTOR / classes:
        raise TrainingCollapsed(
            f"fit: training collapsed in epoch {epoch}: training accuracy {acc:.3f} over "
            f"{seen} samples is at chance (1/{classes} = {1 / classes:.3f}); {ADVICE}"
        )


def zero_gradient_fraction(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of the batch whose cross-entropy input gradient is exactly zero (eval mode,
    as the attacks see the model; no parameter gradient is accumulated)."""
    x = x.detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return float((g.flatten(1) == 0).all(dim=1).float().mean())


def check_gradients(model: nn.Module, x: Tensor, y: Tensor, epoch: int,
                    iteration: int) -> None:
    """Raise :class:`TrainingCollapsed` if the input gradient vanished for most of a batch."""
    frac = zero_gradient_fraction(model, x, y)
    if frac > ZERO_GRAD_FRACTION:
        raise TrainingCollapsed(
            f"fit: training collapsed in epoch {epoch} (iteration {iteration}): the input "
            f"gradient is exactly zero for {frac:.0%} of a batch (dead units: the attack "
            f"and the training signal are blind); {ADVICE}"
        )


__all__ = ["ADVICE", "TrainingCollapsed", "check_chance", "check_gradients",
           "zero_gradient_fraction"]
