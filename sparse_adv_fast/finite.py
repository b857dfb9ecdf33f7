"""One check for "this model holds only finite numbers", shared by training, pruning,
evaluation and the command line.

A NaN or Inf weight makes every later number meaningless (NaN x 0 = NaN, an all-NaN
model predicts class 0 and "scores" 1/classes), so the library refuses such a model with
:class:`NonFiniteError`, which names where it came from and the first bad tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


class NonFiniteError(ValueError):
    """A model, state_dict or loss holds NaN or Inf values."""


def _named_tensors(
    obj: nn.Module | Mapping[str, object],
) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, nn.Module):
        yield from obj.state_dict(keep_vars=True).items()
        return
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            yield str(k), v


def first_nonfinite(obj: nn.Module | Mapping[str, object]) -> str | None:
    """Name of the first floating-point tensor of a model or state_dict holding NaN/Inf."""
    for name, t in _named_tensors(obj):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def check_finite(obj: nn.Module | Mapping[str, object], where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` and the first non-finite tensor."""
    bad = first_nonfinite(obj)
    if bad is not None:
        raise NonFiniteError(f"{where}: non-finite values (NaN or Inf) in {bad}")


__all__ = ["NonFiniteError", "check_finite", "first_nonfinite"]
