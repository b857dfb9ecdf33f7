"""Robustness metrics tied to sparsity: margins, input-gradient norms, first-order radii.

For a classifier ``f`` and a sample ``(x, y)``, the margin is ``m(x) = f_y(x) - max_{j!=y}
f_j(x)``. The first-order radius of Hein & Andriushchenko (2017, "Formal guarantees on the
robustness of a classifier against adversarial manipulation") is

    r(x) = min_{j != y} (f_y(x) - f_j(x)) / ||grad_x (f_y - f_j)(x)||_*

in the threat norm, where ``||.||_*`` is the dual norm (L1 for an L-inf threat, L2 for an
L2 threat): the distance to the nearest of the linearised class boundaries, over ALL
classes, not only the runner-up. For a linear classifier without box constraints it is the
exact minimal perturbation; for a network it is an ESTIMATE, not a certificate (curvature
can make the true radius smaller). :func:`radius_vs_minimal_perturbation` measures how well
it tracks the minimal perturbation FAB finds.
Sparse weights shrink the input-gradient norm, which is the paper's link between sparsity
and robustness; ``weight_norms`` gives a crude Lipschitz proxy alongside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .attacks import attack_mode
from .attacks._core import perturbation_size
from .nn import weight_sparsity

NORMS = {"linf": 1.0, "l2": 2.0}  # threat norm -> the order of its dual norm


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """``logit[y] - max other logit`` per sample (negative when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


def _check(model: Any, x: Any, y: Any, norm: Any, eps: Any, attack: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"robustness_report: model must be an nn.Module, got {type(model)}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("robustness_report: x must be a floating tensor with a batch dimension")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
        raise TypeError("robustness_report: y must be a 1-D integer tensor of labels")
    if y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"robustness_report: x and y must hold the same number (>0) of samples, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
    if norm not in NORMS:
        raise ValueError(f"robustness_report: norm must be one of {tuple(NORMS)}, got {norm!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or eps < 0):
        raise ValueError(f"robustness_report: eps must be a number >= 0 or None, got {eps!r}")
    if attack is not None and not callable(attack):
        raise TypeError(f"robustness_report: attack must be callable atk(x, y), got {attack!r}")


def _class_gradients(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits ``[B, C]`` and their input gradients ``[C, B, D]``: one backward per class
    of the batch sum (samples are independent in eval mode, so each sample gets its own
    gradient). Call in eval mode with grad enabled."""
    xg = x.detach().clone().requires_grad_(True)
    logits = model(xg)
    c = logits.shape[1]
    grads = [torch.autograd.grad(logits[:, j].sum(), xg, retain_graph=j < c - 1)[0]
             for j in range(c)]
    return logits.detach(), torch.stack(grads).flatten(2)


def first_order_radii(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf") -> Tensor:
    """Per-sample first-order radius ``min_{j != y} (f_y - f_j) / ||grad (f_y - f_j)||_*``
    (Hein & Andriushchenko 2017), ``[B]``: 0 for a misclassified sample, inf where every
    class's gradient difference vanishes while the margin is positive.

    ``norm`` is the threat model (``"linf"``: L1 dual norm; ``"l2"``: L2). The model runs
    in eval mode with frozen parameters (each module's mode and each flag restored).
    """
    _check(model, x, y, norm, None, None)
    dev = next((p.device for p in model.parameters()), x.device)
    with attack_mode(model):
        logits, grads = _class_gradients(model, x.to(dev))
    return _radii(logits, grads, y.to(dev).long(), norm)


def _radii(logits: Tensor, grads: Tensor, y: Tensor, norm: str) -> Tensor:
    b = torch.arange(y.shape[0], device=y.device)
    diff = logits.gather(1, y[:, None]) - logits  # [B, C]: f_y - f_j
    gdiff = grads[y, b][None] - grads  # [C, B, D]
    dual = gdiff.norm(p=NORMS[norm], dim=2).t()  # [B, C]
    r = torch.where(dual > 0, diff / dual,
                    torch.where(diff > 0, torch.inf, torch.zeros_like(diff)))
    r = r.scatter(1, y[:, None], torch.inf)  # j != y
    r = r.amin(1).clamp_min(0)
    return torch.where(logits.argmax(1) == y, r, torch.zeros_like(r))


def minimal_perturbation(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf",
                         steps: int = 100) -> Tensor:
    """Per-sample size of the smallest adversarial perturbation FAB-T finds over all
    C - 1 target classes (``inf`` where it finds none; 0 when misclassified at ``x``)."""
    from .attacks.fab import fab

    c = _n_classes(model, x)
    x_adv = fab(model, x, y, norm=norm, steps=steps, n_target_classes=c - 1)
    size = perturbation_size(x_adv - x, norm)
    with attack_mode(model), torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    return torch.where(wrong, size, torch.full_like(size, torch.inf))


def _n_classes(model: nn.Module, x: Tensor) -> int:
    with attack_mode(model), torch.no_grad():
        return int(model(x[:1]).shape[1])


def _ranks(v: Tensor) -> Tensor:
    # Average ranks for ties, so Spearman is Pearson of the ranks as usual.
    order = v.argsort()
    r = torch.empty_like(v)
    r[order] = torch.arange(v.numel(), dtype=v.dtype, device=v.device)
    for val in v.unique()[(v.unique(return_counts=True)[1] > 1)]:
        r[v == val] = r[v == val].mean()
    return r


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def radius_vs_minimal_perturbation(
    model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf", steps: int = 100,
) -> dict[str, Any]:
    """How well the first-order radius predicts the minimal adversarial perturbation.

    For the correctly classified samples where FAB-T (all targets, ``steps`` iterations,
    no eps bound) finds an adversarial point, pairs (first-order radius, FAB's minimal
    perturbation size) and their ``pearson`` and ``spearman`` correlations. Returns
    ``{"pearson", "spearman", "n", "radius": [...], "minimal": [...],
    "mean_ratio"}`` (``mean_ratio``: mean of radius / minimal, > 1 where the linear
    estimate is optimistic). NaN correlations when fewer than 2 pairs exist.
    """
    _check(model, x, y, norm, None, None)
    y = y.long()
    radius = first_order_radii(model, x, y, norm=norm)
    minimal = minimal_perturbation(model, x, y, norm=norm, steps=steps).to(radius.device)
    with attack_mode(model), torch.no_grad():
        correct = model(x).argmax(1).to(radius.device) == y.to(radius.device)
    ok = correct & torch.isfinite(minimal) & torch.isfinite(radius)
    r, m = radius[ok].double(), minimal[ok].double()
    n = int(ok.sum())
    return {
        "pearson": _pearson(r, m) if n > 1 else float("nan"),
        "spearman": _pearson(_ranks(r), _ranks(m)) if n > 1 else float("nan"),
        "n": n,
        "radius": r.tolist(),
        "minimal": m.tolist(),
        "mean_ratio": float((r / m.clamp_min(1e-12)).mean()) if n else float("nan"),
        "norm": norm,
    }


@torch.no_grad()
def _weight_norms(model: nn.Module) -> dict[str, Any]:
    layers = {}
    prod_l1 = prod_l2 = 1.0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.detach().float()
            l1, l2 = float(w.abs().sum()), float(w.norm())
            layers[name] = {"l1": l1, "l2": l2}
            prod_l1 *= l1
            prod_l2 *= l2
    return {"layers": layers, "product_l1": prod_l1, "product_l2": prod_l2}


@torch.no_grad()
def _layer_sparsity(model: nn.Module) -> dict[str, float]:
    return {
        n: float((m.weight == 0).float().mean())
        for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def robustness_report(
    model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf", eps: float | None = None,
    attack: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Sparsity and first-order robustness figures of ``model`` on the batch ``(x, y)``.

    Keys:

    * ``clean_accuracy``;
    * ``sparsity`` (fraction of exactly-zero Linear/Conv2d weights) and ``layer_sparsity``;
    * ``mean_margin`` and ``mean_input_grad_norm`` (dual norm of ``grad_x margin``, the
      runner-up class's margin), over all samples;
    * ``first_order_radius``: ``{"median", "mean"}`` of the Hein & Andriushchenko radius
      ``min_{j!=y} (f_y - f_j) / ||grad (f_y - f_j)||_*`` (:func:`first_order_radii`) over
      the correctly classified samples (median: the lower middle value, as ``torch.median``;
      NaN when none is correct; inf where the gradient vanishes);
    * ``certified_fraction_at_eps`` (only with ``eps``): fraction of ALL samples whose
      first-order radius is >= eps, misclassified ones counting as radius 0. A first-order
      ESTIMATE, not a certificate;
    * ``weight_norms``: per-layer L1 / L2 (Frobenius) norms of the weights and their
      products over layers (a crude Lipschitz proxy);
    * ``robust_accuracy`` (only with ``attack``, a callable ``atk(x, y) -> x_adv``);
    * ``norm`` (and ``eps`` and ``certified_fraction_note`` when ``eps`` is given), echoing
      the settings and saying in the JSON that the fraction is an estimate.

    ``norm`` is the threat model, "linf" or "l2". The model runs in eval mode with
    parameter grads off; each module's own train/eval mode and each parameter's
    ``requires_grad`` are restored exactly (a model mixing train and eval submodules comes
    back as it was).
    """
    _check(model, x, y, norm, eps, attack)
    dev = next((p.device for p in model.parameters()), x.device)
    x, y = x.to(dev), y.to(dev).long()
    # attack_mode: eval mode and frozen parameters, each module's own mode and each
    # parameter's flag restored afterwards (also on error).
    with attack_mode(model):
        logits, grads = _class_gradients(model, x)
        b = torch.arange(y.shape[0], device=dev)
        m = margins(logits, y)
        runner = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
        gnorm = (grads[y, b] - grads[runner, b]).norm(p=NORMS[norm], dim=1)
        correct = logits.argmax(1) == y
        radius = _radii(logits, grads, y, norm)
        rc = radius[correct]
        report: dict[str, Any] = {
            "clean_accuracy": float(correct.float().mean()),
            "sparsity": weight_sparsity(model),
            "layer_sparsity": _layer_sparsity(model),
            "mean_margin": float(m.mean()),
            "mean_input_grad_norm": float(gnorm.mean()),
            "first_order_radius": {
                "median": float(rc.median()) if rc.numel() else float("nan"),
                "mean": float(rc.mean()) if rc.numel() else float("nan"),
            },
            "weight_norms": _weight_norms(model),
            "norm": norm,
        }
        if eps is not None:
            report["certified_fraction_at_eps"] = float((radius >= eps).float().mean())
            report["eps"] = float(eps)
            report["certified_fraction_note"] = (
                "first-order estimate (min over classes of margin / dual norm of its input "
                "gradient), not a certificate"
            )
    if attack is not None:
        x_adv = attack(x, y)
        with attack_mode(model), torch.no_grad():
            report["robust_accuracy"] = float((model(x_adv).argmax(1) == y).float().mean())
    return report
