"""Adversarial attacks and robust evaluation.

Functions ``fgsm``, ``pgd``, ``apgd``, ``apgd_t``, ``fab``, ``square`` and callables
``FGSM``, ``PGD``, ``APGD``, ``APGDT``, ``FAB``, ``Square``, ``AutoAttack``
(``atk = PGD(model, eps=8/255, alpha=2/255, steps=10); x_adv = atk(x, y)``), all with
evaluation hygiene by default: the model runs in eval mode with frozen parameters (both
restored), inputs are checked to lie in the data range and outputs are clipped to it, and a
:class:`GradientMaskingWarning` flags vanishing gradients. ``evaluate`` reports clean,
per-attack and per-sample worst-case robust accuracy; ``attacks=("autoattack",)`` runs the
AutoAttack cascade (APGD-CE, APGD-T, FAB-T, Square) with gradient-masking checks.
"""

from . import losses
from ._hygiene import GradientMaskingWarning, attack_mode
from .apgd import apgd, apgd_t
from .autoattack import AutoAttack
from .callables import APGD, APGDT, FAB, FGSM, PGD, Square
from .evaluate import evaluate
from .fab import fab
from .fgsm import fgsm
from .pgd import pgd
from .square import square

__all__ = [
    "APGD",
    "APGDT",
    "FAB",
    "AutoAttack",
    "Square",
    "apgd_t",
    "fab",
    "square",
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
