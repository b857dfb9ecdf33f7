"""The demo's results: rows, ``results.json``, the markdown table ``results.md``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..checkpoint import write_atomic

LABELS = {"iwi_ticket": "IWI ticket -> dense"}
METHOD_NAMES = {"pgd": "PGD-AT", "trades": "TRADES", "fgsm_rs": "FGSM-RS", "natural": "natural"}


def label(name: str, method: str = "pgd") -> str:
    """Human name of a row (``imp_80`` -> ``IMP ticket 80%``)."""
    if name == "dense":
        return f"dense ({METHOD_NAMES.get(method, method)})"
    if name in LABELS:
        return LABELS[name]
    if name.startswith("imp_"):
        return f"IMP ticket {name[4:]}%"
    if name.startswith("iwi_widen"):
        return f"IWI widen {name[len('iwi_widen'):]}"
    return name


def finite(obj: Any) -> Any:
    """``obj`` with NaN / inf floats replaced by None, recursively (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def make_row(name: str, ev: dict[str, Any], method: str = "pgd") -> dict[str, Any]:
    """One table row from an ``eval_<name>`` stage result (``method``: the training one)."""
    m = finite(ev.get("metrics", {}))
    radius = m.get("first_order_radius", {}) if isinstance(m, dict) else {}
    return {
        "model": name,
        "label": label(name, method),
        "sparsity": ev["sparsity"],
        "clean": ev["clean"],
        "robust": dict(ev["robust"]),
        "worst_case": ev["worst_case"],
        "n": ev["n"],
        "params": ev.get("params"),
        "first_order_radius_median": radius.get("median"),
        "first_order_radius_mean": radius.get("mean"),
        "mean_margin": m.get("mean_margin"),
        "mean_input_grad_norm": m.get("mean_input_grad_norm"),
        "metrics": m,
    }


def results_dict(
    config: dict[str, Any], rows: list[dict[str, Any]], *, ran: list[str], skipped: list[str],
    seconds: float,
) -> dict[str, Any]:
    """Everything ``results.json`` holds."""
    return {
        "config": config,
        "eps": config["eps"],
        "norm": "linf",
        "rows": rows,
        "stages_ran": ran,
        "stages_skipped": skipped,
        "seconds": seconds,
    }


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def table(results: dict[str, Any]) -> str:
    """The results as a markdown table (accuracies and sparsity in %)."""
    rows = results["rows"]
    attacks = list(dict.fromkeys(a for r in rows for a in r["robust"]))
    multi = len(attacks) > 1
    head = ["model", "sparsity %", "clean %", *[f"{a} %" for a in attacks]]
    head += ["worst case %"] if multi else []
    head += ["FO radius (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["label"], _pct(r["sparsity"]), _pct(r["clean"])]
        cells += [_pct(r["robust"].get(a)) for a in attacks]
        cells += [_pct(r["worst_case"])] if multi else []
        cells += [_num(r["first_order_radius_median"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(results: dict[str, Any]) -> str:
    """What each column means (written under the table)."""
    eps = results["eps"]
    rows = results["rows"]
    n = rows[0]["n"] if rows else 0
    attacks = ", ".join(dict.fromkeys(a for r in rows for a in r["robust"]))
    return (
        f"clean % = accuracy on the test split ({n} samples); "
        f"robust % = accuracy under the named L-inf attack ({attacks}) at eps = {eps:g}"
        + ("; worst case % = a sample counts only if it survives every attack" if "," in attacks
           else "")
        + "; sparsity % = fraction of exactly-zero weights in the conv/linear layers; "
        "FO radius = first-order robustness radius, the median over correctly classified "
        "test samples of the logit "
        "margin divided by the dual norm (L1 for L-inf) of the margin's input gradient "
        "(larger = a bigger perturbation is needed to flip the prediction, to first order)."
    )


def markdown(results: dict[str, Any]) -> str:
    """The full ``results.md``: title, settings, table, legend."""
    c = results["config"]
    title = (
        f"# sparse-adv-fast demo: {c['model']} on {c['dataset']}"
        + (" (--quick)" if c.get("quick") else "")
    )
    settings = (
        f"Training: {c['method']} (L-inf eps {c['eps']:g}, {c['train_steps']} steps), "
        f"{c['epochs']} epochs dense, {c['retrain_epochs']} per retraining; IMP with rewinding to "
        f"iteration {c['rewind_at']}, global magnitude pruning; IWI ticket = dense net started "
        f"from the sparsest ticket's surviving weights; IWI widen = {c['widen']}x-wide net "
        f"started from the dense net's weights; IWI models trained at lr {c['iwi_lr']:g} "
        f"(others {c['lr']:g})."
    )
    return f"{title}\n\n{settings}\n\n{table(results)}\n\n{legend(results)}\n"


def write_all(results: dict[str, Any], out: str | os.PathLike[str]) -> None:
    """Write ``results.json`` and ``results.md`` to ``out`` (atomically)."""
    out = Path(out)
    text = json.dumps(finite(results), indent=2, allow_nan=False) + "\n"
    write_atomic(out / "results.json", text)
    write_atomic(out / "results.md", markdown(results))
