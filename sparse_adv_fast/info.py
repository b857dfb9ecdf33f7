"""``python -m sparse_adv_fast.info``: versions, devices, backends and the dispatch choices
``auto`` measured on this machine (with the times that decided each), for bug reports."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from . import __version__, backends
from .backends import _autotune


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, object]:
    """Everything :func:`main` prints, as a dict."""
    cuda = torch.cuda.is_available()
    return {
        "sparse_adv_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_build": torch.version.cuda or "none",
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "cpu_threads": torch.get_num_threads(),
        "backend_choice": backends.current(),
        "autotune": "on" if _autotune.enabled() else f"off ({_autotune.ENV_AUTOTUNE}=0)",
        "dispatch_cache": str(_autotune.cache_path()),
        "backends": backends.available(),
        "dispatch": backends.choices(),
    }


def _print_dispatch(choices: dict[str, dict]) -> None:
    print(f"dispatch choices ({len(choices)} measured; auto takes the fastest, and anything but "
          f"torch only when at least {_autotune.MARGIN:.0%} faster than torch, "
          f"{_autotune.DENSE_MARGIN:.0%} above density {_autotune.DENSE_FROM:g}):")
    if not choices:
        print("  none yet: they are measured on first use of each op/shape")
    for text in sorted(choices):
        print(f"  {text}\n      {_autotune.explain(choices[text])}")


def main() -> None:
    """Print versions, devices and, for each backend, whether it runs here and why not."""
    info = collect()
    width = max(map(len, info))
    for key, val in info.items():
        if key in ("backends", "dispatch"):
            continue
        print(f"{key:<{width}}  {val}")
    print("backends:")
    for name, ok in info["backends"].items():  # type: ignore[union-attr]
        print(f"  {name:<8} {'available' if ok is True else 'unavailable: ' + str(ok)}")
    _print_dispatch(info["dispatch"])  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
