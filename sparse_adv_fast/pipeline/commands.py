"""The work behind ``train``, ``prune``, ``iwi``, ``eval`` and ``bench`` (the CLI only parses).

Every function validates what it can before doing any work and raises ``ValueError`` /
``FileNotFoundError`` with a message naming the problem.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import modelio, runtime
from .demo import DEFAULT_EPS

TRAIN_METHODS = ("natural", "pgd", "trades", "fgsm_rs")
PRUNE_METHODS = ("magnitude", "imp", "hydra", "random")
IWI_MODES = ("ticket", "widen")
EVAL_SUITES = ("pgd10", "pgd20x5", "fgsm", "apgd", "apgd-ce", "apgd-dlr")
_PGD = re.compile(r"^pgd[1-9][0-9]*(x[1-9][0-9]*)?$")



# Held out of the training split for validation (the catastrophic-overfitting check):
# training commands never look at the test split.
VAL_FRACTION = 0.1


def _train_val(dataset: str, batch_size: int, data_dir: str | None, seed: int) -> tuple:
    train, val, _ = _lib("data").split_loaders(
        dataset, val_size=VAL_FRACTION, batch_size=batch_size, data_dir=data_dir, seed=seed
    )
    return train, val

def check_suites(names: tuple[str, ...]) -> tuple[str, ...]:
    """Validate attack suite names: the named ones, ``pgd<k>`` or ``pgd<k>x<restarts>``."""
    bad = [n for n in names if n not in EVAL_SUITES and not _PGD.match(n)]
    if bad or not names:
        raise ValueError(
            f"unknown attack suite(s) {bad}; choose from {', '.join(EVAL_SUITES)}, "
            "pgd<steps> or pgd<steps>x<restarts>"
        )
    return names


def _lib(name: str) -> Any:
    return importlib.import_module(f"sparse_adv_fast.{name}")


def check_data_dir(dataset: str, data_dir: str | None) -> None:
    """For file-based datasets the data folder must exist (checked before any work)."""
    if dataset == "digits":
        return
    data = _lib("data")
    folder = Path(data_dir or os.environ.get(data.DATA_DIR_ENV, "data")).expanduser()
    if not folder.is_dir():
        how = "--data-dir" if data_dir else f"--data-dir (or ${data.DATA_DIR_ENV})"
        raise FileNotFoundError(
            f"data directory {str(folder)!r} for {dataset} does not exist; pass {how} "
            "pointing at the dataset's standard files"
        )


def eps_for(dataset: str, eps: float | None) -> float:
    """``eps`` or the dataset's default L-inf radius."""
    if eps is None:
        return DEFAULT_EPS[dataset]
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (inputs live in [0, 1]), got {eps}")
    return eps


def _check_out(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a checkpoint file name")
    if not out.parent.exists():
        raise FileNotFoundError(f"folder {str(out.parent)!r} for --out does not exist")
    return out


def _load(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    return modelio.load_model(path)


def _fit(model: nn.Module, loaders: Any, *, method: str, epochs: int, lr: float, eps: float,
         steps: int, progress: bool) -> Any:
    return _lib("train").fit(model, loaders, method=method, epochs=epochs, lr=lr, eps=eps,
                             steps=steps, progress=progress)


def train(
    *, dataset: str, model: str, width: float, method: str, epochs: int, eps: float | None,
    lr: float, steps: int, batch_size: int, seed: int, data_dir: str | None, out: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Build ``model`` for ``dataset``, train it with ``method``, save a model checkpoint."""
    check_data_dir(dataset, data_dir)
    eps = eps_for(dataset, eps)
    out_path = _check_out(out)
    arch = modelio.arch_spec(model, dataset, width)
    torch.manual_seed(seed)
    net = modelio.build(arch)  # unknown model names fail here, before data is read
    loaders = _train_val(dataset, batch_size, data_dir, seed)
    with runtime.threads_for(dataset):
        hist = _fit(net, loaders, method=method, epochs=epochs, lr=lr, eps=eps, steps=steps,
                    progress=progress)
    modelio.save_model(net, arch, out_path, method=method, eps=eps, epochs=epochs,
                       history=hist.as_dict())
    return {"out": str(out_path), "history": hist.as_dict()}


def imp_schedule(sparsity: float, rounds: int, start: float = 0.0) -> tuple[float, ...]:
    """IMP targets going from ``start`` to ``sparsity`` in ``rounds`` rounds, each pruning
    the same fraction of the survivors (0 -> 0.875 in 3 rounds: 0.5, 0.75, 0.875)."""
    if not start < sparsity:
        raise ValueError(f"the model is already {start:.4f} sparse; IMP needs a higher "
                         f"--sparsity than that, got {sparsity}")
    ratio = (1.0 - sparsity) / (1.0 - start)
    out = [1.0 - (1.0 - start) * ratio ** ((i + 1) / rounds) for i in range(rounds)]
    out[-1] = sparsity  # exact target despite float rounding
    return tuple(out)


def prune(
    *, checkpoint: str, method: str, sparsity: float, scope: str, out: str, epochs: int,
    rounds: int, train_method: str, eps: float | None, lr: float, steps: int, batch_size: int,
    seed: int, data_dir: str | None, progress: bool = True,
) -> dict[str, Any]:
    """Prune a saved model; ``imp`` / ``hydra`` also train (``epochs`` per round / fine-tune).

    ``magnitude`` / ``random`` prune once (no training). ``imp`` uses the checkpoint's
    weights as the rewind point: ``rounds`` rounds of train, prune, rewind, then the final
    ticket is trained. ``hydra`` learns scores for ``epochs`` epochs, then fine-tunes the
    weights as long.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown prune method {method!r}; choose one of {PRUNE_METHODS}")
    out_path = _check_out(out)
    net, blob = _load(checkpoint)
    arch = blob["arch"]
    needs_data = method in ("imp", "hydra")
    if needs_data:
        check_data_dir(arch["dataset"], data_dir)
    eps = eps_for(arch["dataset"], eps)
    torch.manual_seed(seed)
    with runtime.threads_for(arch["dataset"]):
        net = _prune(net, arch, method=method, sparsity=sparsity, scope=scope, epochs=epochs,
                     rounds=rounds, train_method=train_method, eps=eps, lr=lr, steps=steps,
                     batch_size=batch_size, seed=seed, data_dir=data_dir, progress=progress)
    modelio.save_model(net, arch, out_path, pruned_by=method, sparsity=sparsity, scope=scope)
    return {"out": str(out_path), "sparsity": modelio.zero_fraction(net)}


def _prune(
    net: nn.Module, arch: dict[str, Any], *, method: str, sparsity: float, scope: str,
    epochs: int, rounds: int, train_method: str, eps: float, lr: float, steps: int,
    batch_size: int, seed: int, data_dir: str | None, progress: bool,
) -> nn.Module:
    p = _lib("prune")
    if method == "magnitude":
        net = p.magnitude(net, sparsity, scope=scope)
    elif method == "random":
        net = p.random(net, sparsity, scope=scope, generator=torch.Generator().manual_seed(seed))
    else:
        loaders = _train_val(arch["dataset"], batch_size, data_dir, seed)
        kw = dict(method=train_method, epochs=epochs, lr=lr, eps=eps, steps=steps,
                  progress=progress)
        if method == "imp":
            start = _lib("nn").sparsity(net) if modelio.is_masked(net) else 0.0
            schedule = imp_schedule(sparsity, rounds, start)
            net = _lib("nn").sparsify(net) if not modelio.is_masked(net) else net
            p.imp(net, lambda m: _fit(m, loaders, **kw), sparsities=schedule, scope=scope)
        else:
            net = p.hydra(net, sparsity, loaders[0], epochs=epochs, eps=eps, alpha=eps / 4,
                          steps=steps, scope=scope, progress=progress)
        _fit(net, loaders, **kw)
    return net


def iwi(
    *, source: str, mode: str, width: float | None, init: str | None, out: str, epochs: int,
    method: str, eps: float | None, lr: float, steps: int, batch_size: int, seed: int,
    data_dir: str | None, progress: bool = True,
) -> dict[str, Any]:
    """Inverse Weights Inheritance from a saved source model, then adversarial training.

    ``ticket``: a dense model of the source's architecture and width; ``widen``: the same
    family at ``width`` (default twice the source's). ``init`` defaults to ``zero`` (ticket)
    and ``preserve`` (widen: the source's function, with trainable new units).
    """
    if mode not in IWI_MODES:
        raise ValueError(f"unknown IWI mode {mode!r}; choose one of {IWI_MODES}")
    out_path = _check_out(out)
    src, blob = _load(source)
    sarch = blob["arch"]
    check_data_dir(sarch["dataset"], data_dir)
    eps = eps_for(sarch["dataset"], eps)
    if mode == "ticket":
        if width is not None and width != sarch["width"]:
            raise ValueError(
                f"IWI ticket mode keeps the source's width {sarch['width']}; got --width {width}"
            )
        width = sarch["width"]
    elif width is None:
        width = 2 * sarch["width"]
    elif width <= sarch["width"]:
        raise ValueError(f"IWI widen needs --width > the source's {sarch['width']}, got {width}")
    arch = modelio.arch_spec(sarch["name"], sarch["dataset"], width)
    if init is None:
        init = "preserve" if mode == "widen" else "zero"
    torch.manual_seed(seed)
    target = _lib("iwi").inherit(src, modelio.build(arch), mode=mode, init=init)
    loaders = _train_val(sarch["dataset"], batch_size, data_dir, seed)
    with runtime.threads_for(sarch["dataset"]):
        hist = _fit(target, loaders, method=method, epochs=epochs, lr=lr, eps=eps, steps=steps,
                    progress=progress)
    modelio.save_model(target, arch, out_path, iwi_mode=mode, source=os.fspath(source),
                       history=hist.as_dict())
    return {"out": str(out_path), "width": width}


def evaluate(
    *, checkpoint: str, attacks: tuple[str, ...], eps: float | None, max_batches: int | None,
    batch_size: int, data_dir: str | None, progress: bool = True,
) -> dict[str, Any]:
    """Clean / robust accuracy of a saved model on its dataset's test split, as a dict."""
    check_suites(attacks)
    net, blob = _load(checkpoint)
    arch = blob["arch"]
    check_data_dir(arch["dataset"], data_dir)
    eps = eps_for(arch["dataset"], eps)
    _, test = _lib("data").loaders(arch["dataset"], batch_size=batch_size, data_dir=data_dir)
    with runtime.threads_for(arch["dataset"]):
        res = _lib("train").evaluate(net.eval(), test, attacks=tuple(attacks), eps=eps,
                                     max_batches=max_batches, progress=progress)
    return {
        "checkpoint": os.fspath(checkpoint),
        "arch": arch,
        "eps": eps,
        "norm": "linf",
        "sparsity": modelio.zero_fraction(net),
        "clean": float(res["clean"]),
        "robust": {k: float(v) for k, v in res["robust"].items()},
        "worst_case": float(res["worst_case"]),
        "n": int(res["n"]),
    }


SOURCE_ROOT = Path(__file__).resolve().parents[2]


def benchmarks_dir() -> Path:
    """The source checkout's top-level ``benchmarks/`` folder (FileNotFoundError if absent)."""
    bench = SOURCE_ROOT / "benchmarks"
    if not bench.is_dir():
        raise FileNotFoundError(
            f"no benchmarks/ folder at {bench}: `bench` runs the benchmarks of a source checkout "
            "of sparse-adv-fast (an installed wheel does not ship them)"
        )
    return bench


def bench(*, json_out: str, extra: list[str]) -> int:
    """Run the benchmarks into ``json_out`` and print the ratio table; the exit status."""
    bdir = benchmarks_dir()
    out = Path(json_out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(bdir), "--benchmark-only",
           f"--benchmark-json={out}", *extra]
    rc = subprocess.call(cmd, cwd=bdir.parent)
    if rc != 0:
        return rc
    return subprocess.call([sys.executable, str(bdir / "report.py"), str(out)], cwd=bdir.parent)


def dump_json(obj: Any, path: str | None) -> None:
    """``obj`` as JSON to ``path`` or, when None, to stdout."""
    text = json.dumps(obj, indent=2) + "\n"
    if path is None:
        sys.stdout.write(text)
    else:
        from .stages import write_text_atomic

        write_text_atomic(text, path)
