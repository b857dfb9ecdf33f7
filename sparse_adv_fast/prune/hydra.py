"""HYDRA: score-based adversarial pruning (Sehwag et al. 2020, arXiv 2002.10509).

Each weight gets an importance score; the weights are frozen and the network uses
``w * mask(s)`` with ``mask(s)`` the top-k of ``|s|``. The scores are trained by SGD on
an adversarial loss, with the straight-through estimator ``dL/ds = dL/dw_eff * w *
sign(s)`` (the mask's gradient is taken as the identity). The loss is an
adversarial-training objective (the paper's experiments use both): ``"pgd"``, the
cross-entropy of PGD inputs (Madry et al.), or ``"trades"``, ``CE(f(x), y) + beta *
KL(f(x) || f(x_adv))`` with ``x_adv`` from the KL attack (Zhang et al. 2019;
``saf.train.trades``'s attack and loss).

Design (no monkey-patching, no parametrisation): during score training each masked layer
holds an all-ones mask and its stored ``weight`` is set, without grad, to ``w * mask(s)``
before every step. The layer's own forward then computes the masked network exactly
(attacks included: PGD or the TRADES attack runs on the current masked network with no
special path), and, with an all-ones mask, autograd delivers the dense ``dL/dw_eff`` at
every position, pruned ones included, which the STE turns into the score gradient. At the
end the original weights are restored and the final masks applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import apply_masks
from ..nn.masked import _MaskedMixin
from ._select import check_scope, check_sparsity, masked_model, select

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
# The loss of the score step from the batch and its attacked inputs: (model, x, y, x_adv).
Objective = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
LOSSES = ("pgd", "trades")


def init_scores(layers: dict[str, _MaskedMixin]) -> dict[str, Tensor]:
    """HYDRA's scaled init: ``s = sqrt(6 / fan_in) * w / max|w|`` per layer.

    Monotone in |w| within a layer, so with no training ``scope="layer"`` gives exactly the
    magnitude masks, while ``scope="global"`` prunes by the layer-normalised magnitude
    ``sqrt(6 / fan_in) * |w| / max|w|`` (not by raw |w|).
    """
    out = {}
    for n, m in layers.items():
        w = m.weight.detach()
        fan_in = w[0].numel()
        top = w.abs().max()
        scale = math.sqrt(6.0 / fan_in) / float(top) if float(top) > 0 else 0.0
        out[n] = (w.float() * scale).clone()
    return out


def _default_attack(eps: float, alpha: float, steps: int) -> Attack:
    def atk(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        from ..attacks import pgd  # a peer module, loaded on use

        return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps)

    return atk


def _ce_on_adv(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
    return F.cross_entropy(model(x_adv), y)


def _trades(eps: float, alpha: float, steps: int, beta: float) -> tuple[Attack, Objective]:
    from ..train import trades as T  # a peer module, loaded on use

    def atk(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return T.trades_attack(model, x, eps=eps, alpha=alpha, steps=steps)

    def objective(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        return T.trades_loss(model, x, y, x_adv, beta)[0]

    return atk, objective


def hydra(
    model: nn.Module,
    sparsity: float,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int = 1,
    lr: float = 0.1,
    attack: Attack | None = None,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    scope: str = "global",
    progress: bool = False,
    momentum: float = 0.9,
    loss: str = "pgd",
    beta: float = 6.0,
) -> nn.Module:
    """Prune ``model`` to ``sparsity`` with HYDRA's adversarially trained importance scores.

    Scores start from :func:`init_scores`; for ``epochs`` passes over ``loader`` (batches
    ``(x, y)`` with inputs in [0, 1]) each batch is attacked on the current masked network
    and the scores take one SGD step (``lr``, ``momentum``, cosine decay) on ``loss``:

    * ``"pgd"`` (default): the cross-entropy of ``x_adv = attack(model, x, y)``, by default
      ``saf.attacks.pgd`` with ``eps``, ``alpha``, ``steps``
      (``attack=lambda m, x, y: x`` trains on natural data);
    * ``"trades"``: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (batch mean) with
      ``x_adv`` from the TRADES KL attack (``eps``, ``alpha``, ``steps``), the attack and
      loss of ``saf.train.trades``, as TRADES adversarial training uses them. ``attack`` is
      the PGD loss's hook and is refused here (the KL attack is part of the objective).

    Only the objective of the score phase changes: HYDRA's fine-tuning afterwards is
    ``saf.train.fit`` with the method of choice (the paper trains both with one loss).
    Weights and every other parameter stay frozen; the model runs in train mode as in
    HYDRA, so BatchNorm running statistics follow the masked network. Finally the top
    ``1 - sparsity`` of ``|s|`` are kept (``scope`` and the count rule as in
    :func:`magnitude`; weights already pruned stay pruned). Finish with adversarial
    fine-tuning of the weights (``saf.train.fit``). Returns the model.
    """
    if loss not in LOSSES:
        raise ValueError(f"hydra: unknown loss {loss!r}; choose one of {LOSSES}")
    s = check_sparsity(sparsity, "hydra")
    check_scope(scope, "hydra")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"hydra: epochs must be an int >= 0, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"hydra: lr must be > 0, got {lr!r}")
    if attack is not None and not callable(attack):
        raise TypeError(f"hydra: attack must be callable atk(model, x, y), got {attack!r}")
    if loss == "trades" and attack is not None:
        raise ValueError("hydra: attack= is the hook of loss='pgd'; loss='trades' uses the "
                         "TRADES KL attack (eps, alpha, steps), so pass no attack")
    if (isinstance(beta, bool) or not isinstance(beta, (int, float))
            or not math.isfinite(beta) or beta < 0):
        raise ValueError(f"hydra: beta must be a finite number >= 0, got {beta!r}")
    if epochs > 0 and not isinstance(loader, Iterable):
        raise TypeError(f"hydra: loader must be an iterable of (x, y), got {loader!r}")
    model, layers = masked_model(model, "hydra")
    alive = {n: m.weight_mask.detach().clone() for n, m in layers.items()}
    scores = init_scores(layers)

    def current() -> dict[str, Tensor]:
        return select({n: t.abs() for n, t in scores.items()}, alive, s, scope, "hydra")

    final = current()  # validates the target against what is already pruned, before changes
    if epochs > 0:
        if loss == "trades":
            atk, objective = _trades(eps, alpha, steps, float(beta))
        else:
            atk = attack if attack is not None else _default_attack(eps, alpha, steps)
            objective = _ce_on_adv
        _train_scores(model, layers, scores, current, loader, epochs, lr, momentum, atk,
                      objective, progress)
        final = current()
    return apply_masks(model, final)


def _train_scores(
    model: nn.Module, layers: dict[str, _MaskedMixin], scores: dict[str, Tensor],
    current: Callable[[], dict[str, Tensor]], loader: Iterable, epochs: int, lr: float,
    momentum: float, atk: Attack, objective: Objective, progress: bool,
) -> None:
    frozen = {n: m.weight.detach().clone() for n, m in layers.items()}
    alive = {n: m.weight_mask.detach().clone() for n, m in layers.items()}
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    dev = next(iter(frozen.values())).device
    params = [t.requires_grad_() for t in scores.values()]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    try:
        total = epochs * len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = 0
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if total > 0 else None
    )
    ok = False
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in layers.values():
            m.set_mask(torch.ones_like(m.weight_mask))
            m.weight.requires_grad_(True)
        bar = _progress(epochs, total, progress)
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                masks_now = current()
                with torch.no_grad():
                    for n, m in layers.items():
                        m.weight.copy_(frozen[n] * masks_now[n])
                x_adv = atk(model, x, y).detach()
                model.train()
                for m in layers.values():
                    m.weight.grad = None
                objective(model, x, y, x_adv).backward()
                with torch.no_grad():
                    for n, m in layers.items():
                        g = m.weight.grad
                        scores[n].grad = (
                            torch.zeros_like(scores[n]) if g is None
                            else (g * frozen[n] * scores[n].sign()).to(scores[n].dtype)
                        )
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        ok = True
    finally:
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.grad = None
                m.weight.copy_(frozen[n])
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        for t in scores.values():
            t.requires_grad_(False)
        model.train(was_training)
        if not ok:  # leave the model as it was
            apply_masks(model, alive)


def _progress(epochs: int, total: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total or None, desc=f"hydra ({epochs} ep)", unit="batch")
