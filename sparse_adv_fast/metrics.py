"""Robustness metrics tied to sparsity: margins, input-gradient norms, first-order radii.

For a classifier ``f`` and a sample ``(x, y)``, the margin is ``m(x) = f_y(x) - max_{j!=y}
f_j(x)``. To first order, the smallest perturbation that flips the decision has size
``m(x) / ||grad_x m(x)||_*`` in the threat norm, where ``||.||_*`` is the dual norm (L1 for
an L-inf threat, L2 for an L2 threat). For a linear binary classifier this is exact; for a
network it is an ESTIMATE, not a certificate (curvature can make the true radius smaller).
Sparse weights shrink the input-gradient norm, which is the paper's link between sparsity
and robustness; ``weight_norms`` gives a crude Lipschitz proxy alongside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

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
    * ``mean_margin`` and ``mean_input_grad_norm`` (dual norm of ``grad_x margin``), over
      all samples;
    * ``first_order_radius``: ``{"median", "mean"}`` of ``margin / grad norm`` over the
      correctly classified samples (median: the lower middle value, as ``torch.median``;
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
    parameter grads off; both are restored.
    """
    _check(model, x, y, norm, eps, attack)
    dev = next((p.device for p in model.parameters()), x.device)
    x, y = x.to(dev), y.to(dev).long()
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        xg = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xg)
            m = margins(logits, y)
            (grad,) = torch.autograd.grad(m.sum(), xg)  # samples are independent in eval mode
        m = m.detach()
        gnorm = grad.flatten(1).norm(p=NORMS[norm], dim=1)
        correct = logits.detach().argmax(1) == y
        radius = torch.where(
            gnorm > 0, m / gnorm, torch.where(m > 0, torch.inf, torch.zeros_like(m))
        ).clamp_min(0)
        radius = torch.where(correct, radius, torch.zeros_like(radius))
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
                "first-order estimate (margin / dual norm of the input gradient), "
                "not a certificate"
            )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if attack is not None:
        x_adv = attack(x, y)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                report["robust_accuracy"] = float((model(x_adv).argmax(1) == y).float().mean())
        finally:
            model.train(was_training)
    return report
