"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks") as a cascade of this package's attacks.

``version="standard"``: APGD-CE (100 steps, 1 restart), APGD-T (targeted DLR, top-9
classes, 100 steps), FAB-T (top-9 classes, 100 steps), Square (5000 queries), each run
only on the points every earlier stage left robust. ``version="rand"`` (for randomised
models): APGD-CE and APGD-DLR with 20 EOT iterations each, as the reference's "rand".

The cascade also looks for signs that its own numbers are unreliable (gradient masking):
input gradients that are exactly zero or non-finite at clean points, a model whose
outputs change between two identical forwards (randomised: use the "rand" version), and
points only the black-box stage (Square) breaks after every white-box stage failed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _hygiene as H
from ._core import perturbation_size
from .apgd import N_TARGET_CLASSES, apgd, apgd_t
from .fab import fab
from .square import QUERIES, square

AttackFn = Callable[[Tensor, Tensor], Tensor]
VERSIONS = ("standard", "rand")
EOT_ITER = 20  # the reference "rand" version's EOT iterations
BLACK_BOX = ("square",)


def stages(model: nn.Module, *, eps: float, norm: str = "linf", version: str = "standard",
           steps: int = 100, queries: int = QUERIES,
           n_target_classes: int = N_TARGET_CLASSES) -> dict[str, AttackFn]:
    """The cascade's attacks in order, ``{name: atk(x, y) -> x_adv}``."""
    if version not in VERSIONS:
        raise ValueError(f"autoattack: unknown version {version!r}; choose one of {VERSIONS}")
    if version == "rand":
        return {
            "apgd-ce": lambda x, y: apgd(model, x, y, eps=eps, norm=norm, steps=steps,
                                         loss="ce", eot_iter=EOT_ITER),
            "apgd-dlr": lambda x, y: apgd(model, x, y, eps=eps, norm=norm, steps=steps,
                                          loss="dlr", eot_iter=EOT_ITER),
        }
    if norm != "linf":
        raise ValueError("autoattack: the standard version needs Square, implemented for "
                         "norm='linf' only; use norm='linf' or attacks=('apgd', ...)")
    return {
        "apgd-ce": lambda x, y: apgd(model, x, y, eps=eps, norm=norm, steps=steps, loss="ce"),
        "apgd-t": lambda x, y: apgd_t(model, x, y, eps=eps, norm=norm, steps=steps,
                                      n_target_classes=n_target_classes),
        "fab-t": lambda x, y: fab(model, x, y, eps=eps, norm=norm, steps=steps,
                                  n_target_classes=n_target_classes),
        "square": lambda x, y: square(model, x, y, eps=eps, norm=norm, queries=queries),
    }


@dataclass
class Tally:
    """Counts accumulated over batches by :meth:`AutoAttack.run`."""

    n: int = 0
    clean: int = 0
    robust_after: dict[str, int] = field(default_factory=dict)
    zero_grad: int = 0
    randomized: bool = False

    @classmethod
    def merge(cls, parts: list[Tally]) -> Tally:
        """One tally of several batches' (or ranks') tallies."""
        out = cls(robust_after=dict.fromkeys(parts[0].robust_after, 0) if parts else {})
        for t in parts:
            out.n += t.n
            out.clean += t.clean
            out.zero_grad += t.zero_grad
            out.randomized |= t.randomized
            for k, v in t.robust_after.items():
                out.robust_after[k] += v
        return out

    def report(self, version: str) -> dict[str, object]:
        """Fractions over ``n`` plus the gradient-masking verdict."""
        names = list(self.robust_after)
        after = {k: v / self.n for k, v in self.robust_after.items()}
        broken, prev = {}, self.clean
        for k in names:
            broken[k] = (prev - self.robust_after[k]) / self.n
            prev = self.robust_after[k]
        reasons = []
        zero = self.zero_grad / max(self.clean, 1)
        if zero > 0:
            reasons.append(f"the input gradient is zero or non-finite at {zero:.1%} of the "
                           "correctly classified clean points")
        bb = sum(broken[k] for k in names if k in BLACK_BOX)
        if bb > 0:
            reasons.append(f"the black-box Square attack broke {bb:.2%} of the points after "
                           "every white-box attack failed on them (black-box accuracy below "
                           "white-box)")
        if self.randomized and version != "rand":
            reasons.append("the model's outputs differ between two identical forward passes "
                           "(randomised defence?): use attacks=('autoattack-rand',)")
        return {"version": version, "robust_after": after, "broken_by": broken,
                "gradient_masking": {"suspected": bool(reasons), "reasons": reasons,
                                     "zero_grad_fraction": zero,
                                     "black_box_only_fraction": bb,
                                     "randomized": self.randomized}}


class AutoAttack:
    """Callable cascade ``atk(x, y) -> x_adv`` (the first stage's adversarial point that
    broke each sample; ``x`` where none did). See the module docstring for the stages.

    ``eps`` is required; ``norm`` is ``"linf"`` (``"l2"`` only with ``version="rand"``).
    ``evaluate(model, loader, attacks=("autoattack",))`` uses :meth:`run` to report each
    stage and the gradient-masking checks.
    """

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "linf",
                 version: str = "standard", steps: int = 100, queries: int = QUERIES,
                 n_target_classes: int = N_TARGET_CLASSES) -> None:
        H.check_config("autoattack", eps=eps, norm=norm, steps=steps)
        self.model, self.version, self.eps, self.norm = model, version, eps, norm
        self.stages = stages(model, eps=eps, norm=norm, version=version, steps=steps,
                             queries=queries, n_target_classes=n_target_classes)
        self.tally = Tally(robust_after=dict.fromkeys(self.stages, 0))

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.run(x, y)[0]

    def run(self, x: Tensor, y: Tensor, tally: Tally | None = None) -> tuple[Tensor, Tensor]:
        """``(x_adv, robust)``: the cascade on ``(x, y)``; ``robust`` marks the samples
        correct clean and after every stage. Counts go into ``tally`` when given."""
        model = self.model
        with H.attack_mode(model):
            y = y.to(x.device, torch.long)
            with torch.no_grad():
                logits = model(x)
                if tally is not None and not tally.randomized:
                    tally.randomized = not torch.equal(logits, model(x))
            still = logits.argmax(1) == y
            x_adv = x.detach().clone()
            if tally is not None:
                tally.n += y.shape[0]
                tally.clean += int(still.sum())
                tally.zero_grad += _zero_grads(model, x[still], y[still])
            for name, atk in self.stages.items():
                idx = still.nonzero().squeeze(1)
                if idx.numel() > 0:
                    xa = atk(x[idx], y[idx])
                    with torch.no_grad():
                        broke = (model(xa).argmax(1) != y[idx]) & self._inside(xa, x[idx])
                    x_adv[idx[broke]] = xa[broke]
                    still[idx[broke]] = False
                if tally is not None:
                    tally.robust_after[name] += int(still.sum())
        return x_adv, still


    def _inside(self, xa: Tensor, x: Tensor) -> Tensor:
        # A stage's point only counts inside the threat ball (float slack of the ops).
        return perturbation_size(xa - x, self.norm) <= self.eps * (1 + 1e-5) + 1e-7


def _zero_grads(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """How many samples have an all-zero or non-finite input gradient of the CE loss."""
    if x.shape[0] == 0:
        return 0
    xg = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    flat = g.flatten(1)
    return int(((~torch.isfinite(flat)).any(1) | (flat == 0).all(1)).sum())


def warn_if_masking(report: dict[str, object], name: str) -> None:
    """Issue a :class:`GradientMaskingWarning` listing the reasons, if any."""
    gm = report["gradient_masking"]
    if gm["suspected"]:  # type: ignore[index]
        warnings.warn(f"{name}: robust accuracy may be unreliable: "
                      + "; ".join(gm["reasons"]),  # type: ignore[index]
                      H.GradientMaskingWarning, stacklevel=3)
