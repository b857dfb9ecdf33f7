"""Score queries through a frozen inference graph.

A score-based attack (Square: 5000 queries a point) spends nearly all of its time in
forward passes of a model that does not change. On CPU, TorchScript's
``optimize_for_inference`` (weights folded in as constants, MKL-DNN layouts kept between
layers, conv + ReLU fused) runs those forwards 1.5-3.5x faster than eager PyTorch on
small convolutional nets. The graph is only used when it is *checked* to answer like the
model: it is built by tracing, compared with the eager model on the caller's own batch
and on a one-row batch (a trace that baked in the batch size fails there), and any
failure or mismatch falls back to the eager model for good. The decision is cached per
model and invalidated when any parameter or buffer changes (in place or replaced).

The graph only ever *ranks* candidate points inside the attack; whether a returned point
fools the model is decided by the caller with the eager model.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

Forward = Callable[[Tensor], Tensor]
_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Forward]] = \
    weakref.WeakKeyDictionary()
# Relative to the logits' scale: float reassociation in fused kernels, never a real change.
_RTOL = 1e-4


def _signature(model: nn.Module, x: Tensor) -> tuple:
    state = [(t.data_ptr(), t._version, tuple(t.shape)) for t in
             (*model.parameters(), *model.buffers())]
    return (tuple(state), tuple(x.shape[1:]), x.dtype, x.device, torch.get_num_threads())


def _agrees(got: Tensor, ref: Tensor) -> bool:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.isfinite(got).all()) and bool(
        ((got - ref).abs() <= _RTOL * (1.0 + scale)).all())


def _build(model: nn.Module, x: Tensor) -> Forward | None:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings: the checks below decide
            graph = torch.jit.optimize_for_inference(
                torch.jit.freeze(torch.jit.trace(model, x, check_trace=False)))
            for probe in (x, x[:1]):
                if not _agrees(graph(probe), model(probe)):
                    return None
    except Exception:  # any model TorchScript cannot take stays eager
        return None
    return graph


def query_forward(model: nn.Module, x: Tensor, enabled: bool = True) -> Forward:
    """The forward to use for no-grad score queries of ``model`` on batches like ``x``:
    a checked frozen graph on CPU, else ``model`` itself. Call under ``torch.no_grad()``
    with the model in eval mode."""
    if not enabled or x.device.type != "cpu" or x.shape[0] == 0 or model.training:
        return model
    key = _signature(model, x)
    hit = _cache.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    graph = _build(model, x)
    fwd: Forward = graph if graph is not None else model
    _cache[model] = (key, fwd)
    return fwd
