"""Per-sample best-restart select for batched PGD restarts.

An attack with ``R`` restarts runs them as one batch of ``R * B`` rows, restart-major:
row ``r * B + b`` is restart ``r`` of sample ``b``. :func:`select_restarts` keeps, per
sample, the first restart that fools the model when ``fooled`` is given, otherwise (and for
samples no restart fools) the restart with the highest loss.

Pure torch (a gather over the ``[R, B]`` view): the select reads each candidate row once,
which is already the minimum a fused kernel could do, and it runs on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(candidates: Tensor, losses: Tensor, restarts: int, fooled: Tensor | None) -> int:
    if isinstance(restarts, bool) or not isinstance(restarts, int):
        raise TypeError(f"select_restarts: restarts must be an int, got {type(restarts).__name__}")
    if restarts < 1:
        raise ValueError(f"select_restarts: restarts must be >= 1, got {restarts}")
    if not isinstance(candidates, Tensor) or not isinstance(losses, Tensor):
        raise TypeError("select_restarts: candidates and losses must be Tensors")
    if candidates.dim() < 1:
        raise ValueError("select_restarts: candidates need a leading R*B dimension")
    rows = candidates.shape[0]
    if rows % restarts:
        raise ValueError(
            f"select_restarts: {rows} candidate rows are not a multiple of restarts={restarts}"
        )
    if tuple(losses.shape) != (rows,):
        raise ValueError(
            f"select_restarts: losses must have shape ({rows},), got {tuple(losses.shape)}"
        )
    if losses.is_complex() or losses.dtype is torch.bool:
        raise TypeError(f"select_restarts: losses must be real numbers, got {losses.dtype}")
    devices = {candidates.device, losses.device}
    if fooled is not None:
        if not isinstance(fooled, Tensor) or fooled.dtype is not torch.bool:
            got = fooled.dtype if isinstance(fooled, Tensor) else type(fooled).__name__
            raise TypeError(f"select_restarts: fooled must be a bool Tensor, got {got}")
        if tuple(fooled.shape) != (rows,):
            raise ValueError(
                f"select_restarts: fooled must have shape ({rows},), got {tuple(fooled.shape)}"
            )
        devices.add(fooled.device)
    if len(devices) > 1:
        raise ValueError(
            f"select_restarts: tensors on different devices: {sorted(map(str, devices))}"
        )
    return rows // restarts


def restart_index(losses: Tensor, restarts: int, fooled: Tensor | None = None) -> Tensor:
    """The chosen restart per sample, shape ``[B]`` (int64), by the rule of
    :func:`select_restarts`. Loss ties go to the earliest restart; a NaN loss counts as
    the largest (``torch.argmax`` semantics)."""
    b = losses.shape[0] // restarts
    best = losses.reshape(restarts, b).argmax(dim=0)
    if fooled is None:
        return best
    r_ids = torch.arange(restarts, device=losses.device).unsqueeze(1)
    first = torch.where(fooled.reshape(restarts, b), r_ids, restarts).amin(dim=0)
    return torch.where(first < restarts, first, best)


def select_restarts(
    candidates: Tensor, losses: Tensor, restarts: int, fooled: Tensor | None = None
) -> Tensor:
    """Per sample, the best of ``restarts`` candidates stacked restart-major.

    Args:
        candidates: ``[R*B, ...]``, row ``r*B + b`` is restart ``r`` of sample ``b``.
        losses: ``[R*B]`` attack loss of each row (higher is better for the attacker).
        restarts: ``R``.
        fooled: optional ``[R*B]`` bool, True where the row is misclassified; the first
            fooling restart of a sample wins over any loss.

    Returns:
        ``[B, ...]``: for each sample its first fooling restart, else its highest-loss one
        (earliest on ties).
    """
    b = _check(candidates, losses, restarts, fooled)
    idx = restart_index(losses, restarts, fooled)
    rows = idx * b + torch.arange(b, device=idx.device)
    return candidates.index_select(0, rows)


__all__ = ["restart_index", "select_restarts"]
