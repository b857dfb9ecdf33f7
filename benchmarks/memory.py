"""Memory per layer: this library's masked layers vs torch.nn.utils.prune.

Reports, per layer, the bytes held by parameters + buffers, the derived tensors a layer
keeps between steps (torch.prune's recomputed ``weight`` attribute; this library's cached
forms in ``ops._cache``: the masked weight copy or the CSR of the sparse path), and the
extra bytes per weight over the dense layer, with the bool mask and with the bit-packed one
(``pack_mask_``). Run: ``python benchmarks/memory.py``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn.utils import prune

from sparse_adv_fast import backends
from sparse_adv_fast.nn import MaskedConv2d, MaskedLinear
from sparse_adv_fast.ops import _cache


def _state_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


def _cache_bytes() -> int:
    """Bytes of every cached derived form, counting a shared tensor once."""
    seen: dict[int, int] = {}
    for e in list(_cache._entries.values()):
        for v in e.forms.values():
            for t in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen[t.data_ptr()] = _tensor_bytes(t)
    return sum(seen.values())


def _layers(kind: str):
    if kind == "linear":
        return (lambda: nn.Linear(2048, 2048), lambda: MaskedLinear(2048, 2048),
                torch.randn(8, 2048))
    return (lambda: nn.Conv2d(64, 64, 3, padding=1), lambda: MaskedConv2d(64, 64, 3, padding=1),
            torch.randn(2, 64, 16, 16))


def measure(kind: str, sparsity: float, backend: str) -> list[tuple[str, int, int, float]]:
    """``(impl, state bytes, held derived bytes, extra bytes per weight)`` rows."""
    make_dense, make_masked, x = _layers(kind)
    rows = []
    dense = make_dense()
    base = _state_bytes(dense)
    nw = dense.weight.numel()
    rows.append(("dense", base, 0, 0.0))

    pruned = make_dense()
    mask = torch.rand(pruned.weight.shape) >= sparsity
    prune.custom_from_mask(pruned, "weight", mask)
    pruned(x).sum().backward()
    held = _tensor_bytes(pruned.weight)  # recomputed every forward, kept as an attribute
    st = _state_bytes(pruned)
    rows.append(("torch.prune", st, held, (st + held - base) / nw))

    for packed in (False, True):
        _cache.clear()
        masked = make_masked()
        masked.set_mask(mask)
        if packed:
            masked.pack_mask_()
        with backends.using(backend):
            masked(x.clone().requires_grad_()).sum().backward()
        held = _cache_bytes()
        st = _state_bytes(masked)
        name = f"masked ({backend}{', packed mask' if packed else ''})"
        rows.append((name, st, held, (st + held - base) / nw))
    _cache.clear()
    return rows


def main() -> None:
    """Print the table for linear 2048x2048 and conv 64->64 3x3 at a few sparsities."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpp" if backends._reason("cpp") is None else "torch")
    args = ap.parse_args()
    print("| layer | sparsity | impl | params+buffers | held derived | extra B/weight |")
    print("|---|---|---|---|---|---|")
    for kind in ("linear", "conv"):
        for sp in (0.5, 0.95):
            for impl, st, held, extra in measure(kind, sp, args.backend):
                print(f"| {kind} | {sp} | {impl} | {st / 1024:.0f} KiB | {held / 1024:.0f} KiB "
                      f"| {extra:.2f} |")


if __name__ == "__main__":
    main()
