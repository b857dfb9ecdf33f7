"""Model checkpoints that rebuild themselves: architecture spec + state_dict (masks included).

Format (a dict, saved with ``saf.checkpoint.save_atomic``)::

    {"kind": "sparse_adv_fast.model", "arch": {"name", "dataset", "width", "masked"},
     "state_dict": ..., "meta": {...}}

``masked`` says whether the model was sparsified (its state_dict then holds ``weight_mask``
buffers), so loading calls ``saf.sparsify`` before ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

KIND = "sparse_adv_fast.model"


def _lib(name: str) -> Any:
    return importlib.import_module(f"sparse_adv_fast.{name}")


def arch_spec(
    name: str, dataset: str, width: float = 1, masked: bool = False
) -> dict[str, Any]:
    """The architecture spec stored in a checkpoint (an integral width is stored as int)."""
    width = int(width) if float(width).is_integer() else float(width)
    return {"name": name, "dataset": dataset, "width": width, "masked": bool(masked)}


def is_masked(model: nn.Module) -> bool:
    """Whether ``model`` has masked layers (it was sparsified)."""
    from ..nn import masked_layers

    return bool(masked_layers(model))


def build(arch: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of ``arch`` (sparsified when ``arch["masked"]``)."""
    model = _lib("models").build(arch["name"], arch["dataset"], width=arch.get("width", 1))
    if arch.get("masked"):
        from ..nn import sparsify

        model = sparsify(model)
    return model


def to_blob(model: nn.Module, arch: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (state on CPU, arch's ``masked`` set from the model)."""
    arch = dict(arch, masked=is_masked(model))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"kind": KIND, "arch": arch, "state_dict": state, "meta": meta}


def from_blob(blob: Any, where: str = "checkpoint") -> nn.Module:
    """Rebuild the model stored by :func:`to_blob`; ValueError naming ``where`` if malformed."""
    if not isinstance(blob, dict) or blob.get("kind") != KIND or "arch" not in blob:
        raise ValueError(
            f"{where} is not a sparse-adv-fast model checkpoint (written by `train`, `prune` "
            "or `iwi`: a dict with kind, arch and state_dict)"
        )
    model = build(blob["arch"])
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{where}: state_dict does not match its arch {blob['arch']}: {e}") from e
    return model


def save_model(
    model: nn.Module, arch: dict[str, Any], path: str | os.PathLike[str], **meta: Any
) -> None:
    """Save ``model`` with its architecture spec atomically to ``path``."""
    _lib("checkpoint").save_atomic(to_blob(model, arch, **meta), path)


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, checkpoint dict)`` from a file written by :func:`save_model`."""
    blob = _lib("checkpoint").load(path)
    return from_blob(blob, where=f"checkpoint {os.fspath(path)!r}"), blob


@torch.no_grad()
def zero_fraction(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the Linear/Conv2d layers (the table's sparsity)."""
    from ..nn import weight_sparsity

    return float(weight_sparsity(model))
