"""Adversarial attacks and robust evaluation.

Functions ``fgsm``, ``pgd``, ``apgd`` and callables ``FGSM``, ``PGD``, ``APGD``
(``atk = PGD(model, eps=8/255, alpha=2/255, steps=10); x_adv = atk(x, y)``), all with
evaluation hygiene by default: the model runs in eval mode with frozen parameters (both
restored), inputs are checked to lie in the data range and outputs are clipped to it, and a
:class:`GradientMaskingWarning` flags vanishing gradients. ``evaluate`` reports clean,
per-attack and per-sample worst-case robust accuracy.
"""

from . import losses
from ._hygiene import GradientMaskingWarning, attack_mode
from .apgd import apgd
from .callables import APGD, FGSM, PGD
from .evaluate import evaluate
from .fgsm import fgsm
from .pgd import pgd

__all__ = [
    "APGD",
    "FGSM",
    "PGD",
    "GradientMaskingWarning",
    "apgd",
    "attack_mode",
    "evaluate",
    "fgsm",
    "losses",
    "pgd",
]
