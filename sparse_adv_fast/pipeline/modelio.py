"""Model checkpoints that rebuild themselves: architecture spec + state_dict (masks included).

Format (a dict, saved with ``saf.checkpoint.save_atomic``)::

    {"kind": "sparse_adv_fast.model", "arch": {"name", "dataset", "width", "masked"},
     "state_dict": ..., "meta": {...}}

``masked`` says whether the model was sparsified (its state_dict then holds ``weight_mask``
buffers), so loading calls ``saf.sparsify`` before ``load_state_dict(strict=True)``.

A checkpoint is untrusted input. Its ``arch`` must hold exactly the four fields above
(:func:`check_arch`: a known model name, a known dataset, a width in ``(0, MAX_WIDTH]``, a
bool) and its ``state_dict`` must match the shapes of that architecture, which are worked
out on the meta device first: so a loaded model is never larger than the tensors the file
itself holds, and a hostile file cannot make the loader allocate without bound.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

KIND = "sparse_adv_fast.model"
ARCH_FIELDS = ("name", "dataset", "width", "masked")


def _lib(name: str) -> Any:
    return importlib.import_module(f"sparse_adv_fast.{name}")


def check_arch(arch: Any, where: str = "model") -> dict[str, Any]:
    """A copy of architecture spec ``arch`` once every field is checked; else a one-line
    ``ValueError`` naming ``where`` and the field (nothing is built or allocated)."""
    if not isinstance(arch, Mapping):
        raise ValueError(f"{where}: arch must be a dict with {', '.join(ARCH_FIELDS)}, got "
                         f"{type(arch).__name__}")
    unknown = [k for k in arch if k not in ARCH_FIELDS]
    if unknown:
        raise ValueError(f"{where}: arch has unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"expected only {', '.join(ARCH_FIELDS)}")
    for field in ARCH_FIELDS:
        if field not in arch:
            raise ValueError(f"{where}: arch lacks {field!r}")
    checks = (("name", _lib("models").check_name), ("dataset", _lib("data").info),
              ("width", _lib("models").check_width), ("masked", _check_bool))
    for field, check in checks:
        try:
            check(arch[field])
        except ValueError as e:
            msg = str(e) if str(e).startswith(field) else f"{field}: {e}"
            raise ValueError(f"{where}: arch {msg}") from None
    return dict(arch)


def _check_bool(v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")


def arch_spec(
    name: str, dataset: str, width: float = 1, masked: bool = False
) -> dict[str, Any]:
    """The architecture spec stored in a checkpoint (an integral width is stored as int);
    checked by :func:`check_arch`."""
    _lib("models").check_width(width)
    width = int(width) if float(width).is_integer() else float(width)
    return check_arch({"name": name, "dataset": dataset, "width": width, "masked": bool(masked)})


def is_masked(model: nn.Module) -> bool:
    """Whether ``model`` has masked layers (it was sparsified)."""
    from ..nn import masked_layers

    return bool(masked_layers(model))


def build(arch: dict[str, Any], where: str = "model") -> nn.Module:
    """A freshly initialised model of ``arch`` (sparsified when ``arch["masked"]``); a bad
    ``arch`` is a one-line ``ValueError`` naming ``where`` before anything is built."""
    arch = check_arch(arch, where)
    try:
        model = _lib("models").build(arch["name"], arch["dataset"], width=arch["width"])
    except ValueError as e:  # e.g. a width for which base * width is not an integer
        raise ValueError(f"{where}: arch {arch}: {e}") from None
    if arch["masked"]:
        from ..nn import sparsify

        model = sparsify(model)
    return model


def _shapes(arch: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the state_dict of ``arch``, worked out on the meta device (no
    memory is allocated for the weights, however large the architecture)."""
    with torch.device("meta"):
        model = build(arch, where)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_state(state: Any, arch: dict[str, Any], where: str) -> None:
    """``state`` must be a dict of tensors with exactly the keys and shapes of ``arch``."""
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{where}: state_dict must be a dict of tensors")
    want = _shapes(arch, where)
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} is {tuple(state[k].shape)}, arch needs {want[k]}"
             for k in want if k in state and tuple(state[k].shape) != want[k]]
    problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
        [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + wrong[:3]
    if problems:
        raise ValueError(f"{where}: state_dict does not match its arch {arch}: "
                         f"{'; '.join(problems)}")


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
    arch = check_arch(blob["arch"], where)
    _check_state(blob.get("state_dict"), arch, where)  # before the real (allocating) build
    model = build(arch, where)
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:  # e.g. a dtype that cannot be cast
        raise ValueError(f"{where}: state_dict does not match its arch {arch}: {e}") from e
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
