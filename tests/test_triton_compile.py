"""Every Triton kernel in ``kernels/`` compiles to sm_90 code here, without a GPU.

The suite runs the kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which never
generates code, so a kernel that only breaks in lowering (a type the backend rejects, a
``tl.dot`` shape ptxas refuses) would first fail on a user's GPU. This test compiles each
kernel ahead of time for ``GPUTarget("cuda", 90, 32)`` (H100) in a subprocess with the
interpreter off (``@triton.jit`` picks interpreter or compiler when a module is imported,
and this process imported the kernels interpreted).

The kernels are enumerated from the modules, not listed by hand: every ``@triton.jit``
function found must either have compile specs in ``SPECS`` or be a device helper listed in
``HELPERS`` (compiled inside the kernels that call it), so a new kernel cannot be forgotten.

Run alone: ``python tests/test_triton_compile.py`` (prints one line per compiled kernel).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from typing import Any

import pytest

KERNEL_PACKAGE = "sparse_adv_fast.kernels"
TARGET = ("cuda", 90, 32)

#: Device functions: only ever called from kernels, compiled as part of them.
HELPERS = {
    "_common.load_mask",
    "masked_conv2d._tile_ids",
    "pgd_step._scalar",
    "pgd_step._round",
    "pgd_step._row_norm",
}

# fp16 lowers as bf16 does in the GEMMs (same tensor-core path); fp64 takes the FMA path.
# Forward kernels get every GEMM dtype, gradient kernels the two an attack or autocast uses.
_GEMM_DTYPES = ("fp32", "bf16", "fp64")
_GRAD_DTYPES = ("fp32", "bf16")
_STEP_DTYPES = ("fp32", "bf16", "fp16")


def _gemm_specs(ptrs: tuple[str, ...], dtypes: tuple[str, ...] = _GRAD_DTYPES
                ) -> list[tuple[dict[str, str], dict[str, Any], dict]]:
    """One spec per dtype for a masked GEMM kernel: bit-packed mask, the untuned config."""
    out = []
    for dt in dtypes:
        acc = "fp64" if dt == "fp64" else "fp32"
        types = {p: f"*{dt}" for p in ptrs} | {"m_ptr": "*i32"}
        const = {"BITS": True, "ACC": acc, "PREC": "ieee" if dt in ("fp32", "fp64") else "tf32",
                 "BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_R": 32}
        out.append((types, const, {"num_warps": 4, "num_stages": 3}))
    return out


def _elementwise_specs(ptrs: tuple[str, ...], **const: Any):
    """One spec per storage dtype for a pgd_step kernel (fp32 compute, as the launcher does)."""
    scalars = {s: "fp64" for s in ("alpha", "eps", "lo", "hi")}
    return [({p: f"*{dt}" for p in ptrs} | scalars | {"part_ptr": "*fp32", "gpart_ptr": "*fp32",
             "dpart_ptr": "*fp32", "npart_ptr": "*fp32"}, {"CDT": "fp32", **const},
             {"num_warps": 8})
            for dt in _STEP_DTYPES]


def _specs() -> dict[str, list[tuple[dict[str, str], dict[str, Any], dict]]]:
    """Representative (signature types, constexprs, options) per kernel ``module.name``.

    Signature entries not given default to ``i32`` (sizes and strides); ``ACC`` / ``CDT``
    name a ``tl`` dtype and are resolved in the subprocess.
    """
    lin_ptrs = ("a_ptr", "b_ptr", "c_ptr", "bias_ptr")
    lin = [(t, {**c, "B_MASK": b, "K_IS_R": k, "C_MASK": cm, "HAS_BIAS": hb, "GROUP_P": 8}, o)
           for b, k, cm, hb, dts in ((True, True, False, True, _GEMM_DTYPES),  # forward
                                     (True, False, False, False, _GRAD_DTYPES),  # grad_input
                                     (False, False, True, False, _GRAD_DTYPES))  # grad_weight
           for t, c, o in _gemm_specs(lin_ptrs, dts)]
    fwd = [(t, {**c, "HAS_BIAS": True}, o)
           for t, c, o in _gemm_specs(("x_ptr", "w_ptr", "b_ptr", "y_ptr"), _GEMM_DTYPES)]
    return {
        "masked_linear._masked_mm": lin,          # forward, grad_input, grad_weight
        "masked_conv2d._fwd_kernel": fwd,
        "masked_conv2d._dgrad_kernel": _gemm_specs(("gy_ptr", "w_ptr", "gx_ptr")),
        "masked_conv2d._wgrad_kernel": _gemm_specs(("gy_ptr", "x_ptr", "gw_ptr")),
        "masked_conv2d._mask_mul_kernel": [
            ({"w_ptr": f"*{dt}", "m_ptr": "*u8", "out_ptr": f"*{dt}"}, {"BLOCK": 1024}, {})
            for dt in _STEP_DTYPES
        ],
        "pgd_step._linf_step_kernel": _elementwise_specs(
            ("xa_ptr", "g_ptr", "x_ptr", "out_ptr"), BLOCK=2048),
        "pgd_step._sumsq_kernel": [
            s for mode in (0, 1) for s in _elementwise_specs(
                ("a_ptr", "g_ptr", "x_ptr"), MODE=mode, TINY=1e-12, PARTS=4, ITERS=4,
                BLOCK=2048)
        ],
        "pgd_step._l2_step_kernel": _elementwise_specs(
            ("xa_ptr", "g_ptr", "x_ptr", "out_ptr"), TINY=1e-12, PARTS=4, BLOCK=2048),
        "pgd_step._linf_init_kernel": _elementwise_specs(
            ("x_ptr", "n_ptr", "out_ptr"), BLOCK=2048),
        "pgd_step._l2_init_kernel": _elementwise_specs(
            ("x_ptr", "n_ptr", "out_ptr"), TINY=1e-12, PARTS=4, BLOCK=2048),
    }


def _jit_functions() -> dict[str, Any]:
    """Every ``@triton.jit`` function in the kernel modules, as ``module.name`` -> JITFunction.

    Autotuned or fixed-config kernels are wrappers; their ``.fn`` is the JITFunction.
    """
    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(KERNEL_PACKAGE)
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for name, obj in vars(mod).items():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            # imported helpers are reported under the module that defines them
            if isinstance(fn, JITFunction) and fn.__module__ == mod.__name__:
                found[f"{info.name}.{name}"] = fn
    return found


def compile_all() -> dict[str, int]:
    """Compile every kernel for ``TARGET``; returns compiled-variant counts per kernel.

    Raises AssertionError for a kernel that is neither specified nor a helper, or whose
    compiled output lacks ptx or cubin.
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    found = _jit_functions()
    specs = _specs()
    unlisted = set(found) - set(specs) - HELPERS
    stale = (set(specs) | HELPERS) - set(found)
    assert not unlisted, f"Triton kernels without compile specs in {__file__}: {unlisted}"
    assert not stale, f"specs for kernels that no longer exist: {stale}"
    counts = {}
    for key, variants in specs.items():
        fn = found[key]
        for types, const, opts in variants:
            const = {k: getattr(tl, f"float{v[2:]}") if k in ("ACC", "CDT") else v
                     for k, v in const.items()}
            sig = {a: "constexpr" if a in const else types.get(a, "i32") for a in fn.arg_names}
            ck = triton.compile(ASTSource(fn, sig, const), target=GPUTarget(*TARGET),
                                options=opts)
            assert ck.asm.get("ptx") and ck.asm.get("cubin"), f"{key}: no ptx/cubin"
            assert f".target sm_{TARGET[1]}" in ck.asm["ptx"], f"{key}: wrong target"
        counts[key] = len(variants)
        print(f"compiled {key} x{len(variants)}", flush=True)
    return counts


@pytest.mark.slow
@pytest.mark.triton
def test_every_triton_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "TRITON_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache: really compile
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    compiled = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("compiled")}
    assert compiled == set(_specs())


if __name__ == "__main__":
    compile_all()
