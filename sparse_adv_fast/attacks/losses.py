"""Per-sample attack objectives, oriented so that the attacker always *maximises* them.

Each function maps ``logits [B, C]`` and labels ``[B]`` to a loss ``[B]`` (no reduction),
so a restart select or a step-size schedule can work per sample.

* untargeted (``y`` = true class): ``ce`` = cross-entropy, ``cw`` = CW margin
  ``max_{j!=y} z_j - z_y``, ``dlr`` = ``-(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3)``
  (Croce & Hein 2020; ``pi`` sorts the logits in decreasing order);
* targeted (``y`` = target class): ``ce_targeted`` = ``-CE(z, t)``, ``cw_targeted`` =
  ``z_t - max_{j!=t} z_j``, ``dlr_targeted(z, y_true, t)`` =
  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

_DLR_EPS = 1e-12


def ce(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per sample (untargeted: raise the loss of the true class)."""
    return F.cross_entropy(logits, y, reduction="none")


def ce_targeted(logits: Tensor, target: Tensor) -> Tensor:
    """Negative cross-entropy of the target class per sample."""
    return -F.cross_entropy(logits, target, reduction="none")


def _other_max(logits: Tensor, y: Tensor) -> Tensor:
    # The largest logit among classes != y: mask y's logit to -inf (not 0, logits can be <0).
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.amax(dim=1)


def _true(logits: Tensor, y: Tensor) -> Tensor:
    return logits.gather(1, y[:, None]).squeeze(1)


def cw(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin ``max_{j!=y} z_j - z_y`` (> 0 exactly when ``y`` is not the prediction)."""
    return _other_max(logits, y) - _true(logits, y)


def cw_targeted(logits: Tensor, target: Tensor) -> Tensor:
    """Targeted CW margin ``z_t - max_{j!=t} z_j`` (> 0 exactly when ``t`` is predicted)."""
    return _true(logits, target) - _other_max(logits, target)


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio loss (needs >= 3 classes); shift- and scale-invariant."""
    top = logits.sort(dim=1, descending=True).values
    return -(_true(logits, y) - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def dlr_targeted(logits: Tensor, y_true: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR of Croce & Hein 2020 (needs >= 4 classes)."""
    top = logits.sort(dim=1, descending=True).values
    den = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS
    return -(_true(logits, y_true) - _true(logits, target)) / den


UNTARGETED: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": ce, "cw": cw, "dlr": dlr}
TARGETED_2: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": ce_targeted, "cw": cw_targeted,
}
# Classes a loss needs: DLR reads the third (untargeted) or fourth (targeted) largest logit.
MIN_CLASSES = {("ce", False): 2, ("cw", False): 2, ("dlr", False): 3,
               ("ce", True): 2, ("cw", True): 2, ("dlr", True): 4}


def attack_loss(
    name: str, targeted: bool, logits: Tensor, y: Tensor, y_true: Tensor | None = None
) -> Tensor:
    """The per-sample objective of loss ``name`` (``"ce"``, ``"cw"``, ``"dlr"``).

    Untargeted: ``y`` is the true class. Targeted: ``y`` is the target; targeted DLR also
    needs ``y_true`` (the true or clean-predicted class).
    """
    if not targeted:
        return UNTARGETED[name](logits, y)
    if name == "dlr":
        if y_true is None:
            raise ValueError("targeted DLR needs the true labels as well as the targets")
        return dlr_targeted(logits, y_true, y)
    return TARGETED_2[name](logits, y)


def fooled(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """Per-sample success: prediction != y (untargeted) or == y (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


__all__ = ["ce", "ce_targeted", "cw", "cw_targeted", "dlr", "dlr_targeted", "fooled",
           "attack_loss"]
