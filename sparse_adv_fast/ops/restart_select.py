"""Per-sample best-restart select for batched PGD restarts.

An attack with ``R`` restarts runs them as one batch of ``R * B`` rows, restart-major:
row ``r * B + b`` is restart ``r`` of sample ``b``. :func:`select_restarts` keeps, per
sample, the first restart that fools the model when ``fooled`` is given, otherwise (and for
samples no restart fools) the restart with the highest loss.

Pure torch (a gather over the ``[R, B]`` view): the select reads each candidate row once,
which is already the minimum a fused kernel could do, and it runs on every device.

:func:`row_chunks` says how many of the ``R * B`` rows an attack runs through the model at
once: on a CPU one batch of ``R * B`` rows overflows the caches that a batch of ``B`` rows
fits (4 batched restarts took 1.3-1.7x the time of 4 sequential runs), so rows go in chunks
of the user's batch (at least :data:`MIN_CPU_ROWS`, to keep tiny batches efficient); a GPU
runs them all at once, where more rows fill more of the device.
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


MIN_CPU_ROWS = 16


def row_chunks(rows: int, restarts: int, device: torch.device) -> list[slice]:
    """Contiguous row ranges covering ``rows = restarts * B`` for running an attack in
    chunks: ``B`` rows at a time on CPU (at least :data:`MIN_CPU_ROWS`, rounded to whole
    batches so a chunk never splits one restart's samples), all rows at once elsewhere.

    Samples are independent in eval mode, so chunking changes the speed, not the result.
    """
    if rows <= 0:
        return []
    if device.type != "cpu" or restarts <= 1:
        return [slice(0, rows)]
    b = rows // restarts
    size = b * max(1, -(-MIN_CPU_ROWS // max(b, 1)))  # whole batches, >= MIN_CPU_ROWS rows
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


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


__all__ = ["MIN_CPU_ROWS", "restart_index", "row_chunks", "select_restarts"]
