"""Build script for sparse-adv-fast.

The Python package installs anywhere. Native extensions are built lazily (JIT, cached)
on first use; this script can also build the CPU (and, with CUDA torch and nvcc, the
CUDA) extensions ahead of time when torch is importable in the build environment, i.e.
``pip install --no-build-isolation -e .``. ``SPARSE_ADV_FAST_NO_BUILD=1`` skips every
native build, ``SPARSE_ADV_FAST_NO_CUDA=1`` skips only the CUDA one.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
OPS = ("masked_linear", "masked_conv2d", "pgd_step", "max_pool2d")


def _native_extensions() -> tuple[list, dict]:
    if os.environ.get("SPARSE_ADV_FAST_NO_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # isolated build env: extensions are JIT-built on first use
        return [], {}
    exts = []
    cflags = ["-O3", "-fopenmp"]
    for op in OPS:
        src = ROOT / "csrc" / op
        cpu = [str(src / "binding.cpp"), str(src / f"{op}_cpu.cpp")]
        if all(Path(p).exists() for p in cpu):
            exts.append(
                cpp_extension.CppExtension(
                    f"sparse_adv_fast._C_{op}_cpp",
                    cpu,
                    extra_compile_args=cflags,
                    extra_link_args=["-fopenmp"],
                )
            )
        cu = src / f"{op}.cu"
        if (
            cu.exists()
            and torch.version.cuda
            and cpp_extension.CUDA_HOME
            and os.environ.get("SPARSE_ADV_FAST_NO_CUDA") != "1"
        ):
            exts.append(
                cpp_extension.CUDAExtension(
                    f"sparse_adv_fast._C_{op}_cuda",
                    [*cpu, str(cu)],
                    extra_compile_args={"cxx": [*cflags, "-DSAF_WITH_CUDA"], "nvcc": ["-O3"]},
                    extra_link_args=["-fopenmp"],
                )
            )
    if not exts:
        return [], {}
    return exts, {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _native_extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
