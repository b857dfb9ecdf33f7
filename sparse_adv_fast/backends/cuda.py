"""The ``cuda`` backend: plain CUDA kernels behind ``extern "C"`` launchers.

The extension takes the raw CUDA stream as an integer; :class:`_StreamBound` passes the
current stream of the tensors' device (and makes that device current for the launch) so
callers use the same signatures as other backends. The kernels cover the dtypes in
:data:`DTYPES`; a call in any other dtype (a bf16/fp16 conv under autocast, say) runs the
op's torch reference (cuDNN / cuBLAS) instead of failing, see :class:`_DtypeRouted`.
"""

from __future__ import annotations

import shutil
from typing import Any

from . import _build


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here, or None."""
    import torch

    if not torch.version.cuda:
        return "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # pragma: no cover - broken install
        return f"torch.utils.cpp_extension unusable: {e}"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc / CUDA_HOME not found, cannot build the CUDA extension"
    return _build.compiler_reason()


class _StreamBound:
    """Wraps the extension: every function gets ``stream=`` of the current CUDA stream."""

    def __init__(self, ext: Any) -> None:
        self._ext = ext

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._ext, name)
        if not callable(fn):
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            import torch

            # Launch on the tensors' device and its current stream (not the process's
            # current device), so tensors on cuda:1 work while cuda:0 is current.
            dev = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
            if dev is None:
                kwargs.setdefault("stream", torch.cuda.current_stream().cuda_stream)
                return fn(*args, **kwargs)
            with torch.cuda.device(dev):
                kwargs.setdefault("stream", torch.cuda.current_stream(dev).cuda_stream)
                return fn(*args, **kwargs)

        return call


def _dtypes(op: str) -> frozenset:
    """The floating dtypes the CUDA kernels of ``op`` take (csrc/<op>/binding.cpp)."""
    import torch

    half = {torch.float16, torch.bfloat16}
    return frozenset({
        "masked_conv2d": {torch.float32},
        "masked_linear": {torch.float32, torch.float64, *half},
        "pgd_step": {torch.float32, torch.float64, *half},
    }.get(op, {torch.float32}))


class _DtypeRouted:
    """Sends each call whose first tensor has a dtype the kernels lack to ``fallback``
    (the op's torch reference, same contract), so a forced ``cuda`` backend still runs
    half-precision convolutions; everything else goes to the extension."""

    def __init__(self, ext: Any, dtypes: frozenset, fallback: Any) -> None:
        self._ext, self._dtypes, self._fallback = ext, dtypes, fallback

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._ext, name)
        ref = getattr(self._fallback, name, None)
        if not callable(fn) or ref is None:
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            import torch

            t = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if t is not None and t.dtype not in self._dtypes:
                return ref(*args, **kwargs)
            return fn(*args, **kwargs)

        return call


def loader(op: str) -> _DtypeRouted:
    """The CUDA extension for ``op`` with the stream argument bound, routing dtypes it
    does not compile for to the op's torch reference."""
    from ..ops import op_module  # lazy: the ops import the backends

    return _DtypeRouted(_StreamBound(_build.load(op, "cuda")), _dtypes(op), op_module(op)._REF)
