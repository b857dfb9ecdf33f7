"""The study's ``results.json``, ``results.md`` (tables + verdicts) and plots with error bars."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..checkpoint import write_atomic
from .plots import _figure, _save
from .report import finite

PLOTS = ("study_robustness.png", "study_paired.png")


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(iv: dict[str, Any]) -> str:
    """``mean ± half`` in percent (no half-width with one seed)."""
    if iv.get("mean") is None:
        return "-"
    if iv.get("half") is None:
        return _pct(iv["mean"])
    return f"{_pct(iv['mean'])} ± {_pct(iv['half'])}"


def _diff(d: dict[str, Any] | None) -> str:
    """``+mean [lo, hi]`` in points."""
    if not d or d.get("mean") is None:
        return "-"
    s = f"{100 * d['mean']:+.1f}"
    if d.get("lo") is not None:
        s += f" [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
    return s


def table(results: dict[str, Any]) -> str:
    """Per arm: tuned lr, sparsity, clean and worst-case robust accuracy (mean ± half-width
    of the t-interval), the paired difference against dense AT and its verdict, and the
    training steps (every arm's must be equal)."""
    head = ["arm", "lr", "sparsity %", "clean %", "robust (worst case) %",
            "Δ robust vs dense AT (pts)", "verdict", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in results["arms"].items():
        steps = sorted({v["steps"] for v in r["seeds"].values()})
        vs = r.get("vs_dense_at")
        cells = [f"{r['label']} (`{name}`)", "-" if r["lr"] is None else f"{r['lr']:g}",
                 _pct(r["sparsity"]["mean"]), _ci(r["clean"]), _ci(r["worst_case"]),
                 "reference" if name == "dense_at" else _diff(vs),
                 "" if vs is None else vs["verdict"], "/".join(map(str, steps)) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_section(results: dict[str, Any]) -> str:
    """Each claim's verdict and the paired comparisons it rests on."""
    out = []
    for c in results["claims"]:
        out.append(f"**Claim {c['id']}: {c['text']}.** Verdict: **{c['verdict']}**.")
        for k in c["comparisons"]:
            out.append(f"- `{k['arm']}` − `{k['baseline']}`: {_diff(k)} points "
                       f"(n = {k['n']} paired seeds) → {k['verdict']}")
        if not c["comparisons"]:
            out.append("- no comparison: the arms it needs were not run")
        out.append("")
    return "\n".join(out).rstrip()


def tuning_section(results: dict[str, Any]) -> str:
    """The learning-rate grid per arm with each rate's validation robust accuracy."""
    lines = ["| arm | family | validation worst case % per lr | selected |", "|---|---|---|---|"]
    for arm, t in results["tuning"].items():
        per = ", ".join(f"{lr}: {_pct(v)}" for lr, v in t["val_worst_case"].items())
        lines.append(f"| `{arm}` | {t['family']} | {per} | {t['selected_lr']:g} |")
    return "\n".join(lines)


def iwi_section(results: dict[str, Any]) -> str:
    """How many inherited zeros stay dead (still exactly zero after training)."""
    rows = [(a, r) for a, r in results["arms"].items() if "dead_fraction" in r]
    if not rows:
        return ""
    lines = ["| arm | zeros at inheritance | still exactly zero at the end % |", "|---|---|---|"]
    for a, r in rows:
        zeros = [v["iwi"]["inherited_zeros"] for v in r["seeds"].values() if "iwi" in v]
        total = [v["iwi"]["weights"] for v in r["seeds"].values() if "iwi" in v]
        z = f"{sum(zeros) / len(zeros):.0f} of {total[0]}" if zeros else "-"
        lines.append(f"| `{a}` | {z} | {_ci(r['dead_fraction'])} |")
    return "\n".join(lines)


def _num_ci(iv: dict[str, Any], digits: int) -> str:
    """``mean ± half`` of a plain number (no half-width with one seed)."""
    if iv.get("mean") is None:
        return "-"
    if iv.get("half") is None:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} ± {iv['half']:.{digits}f}"


def radius_section(results: dict[str, Any]) -> str:
    """Per arm: the median first-order radius (the margin / input-gradient-norm link between
    sparsity and robustness) and its rank correlation with FAB's minimal perturbation."""
    rows = [(a, r) for a, r in results["arms"].items() if "radius_median_radius" in r]
    if not rows:
        return ""
    lines = ["| arm | sparsity % | first-order radius (median) | Spearman ρ with FAB's minimal "
             "perturbation |", "|---|---|---|---|"]
    for a, r in rows:
        lines.append(f"| `{a}` | {_ci(r['sparsity'])} | {_num_ci(r['radius_median_radius'], 4)}"
                     f" | {_num_ci(r['radius_spearman'], 2)} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The full ``results.md``."""
    c, b = results["config"], results["budget"]
    lvl = f"{100 * results['level']:g} %"
    parts = [
        f"# Controlled study: {c['model']} on {c['dataset']}" + (" (quick)" if c["quick"] else ""),
        f"Seeds {results['seeds']} (paired across arms). Robust accuracy = per-sample worst "
        f"case over {', '.join(c['eval_attacks'])} at L-inf eps {results['eps']:g} on the test "
        f"split; rows are mean ± the half-width of the {lvl} t-interval over seeds; Δ is the "
        f"mean paired difference against dense AT with its {lvl} interval.",
        f"Budget: every arm spends {b['start_steps']} steps of the shared dense start "
        f"(k = {b['start_epochs']} epoch(s)) plus {b['budget_steps']} steps "
        f"(B = {b['budget_epochs']} epochs = {b['imp_rounds'] + 1} segments of "
        f"{b['segment_epochs']}); IMP: {b['imp_rounds']} round(s) at rate {c['imp_rate']:g} "
        f"to sparsity {100 * b['target_sparsity']:.1f} %, rewinding to iteration "
        f"{b['start_steps']} with the schedule restarting there. Training: {c['method']} "
        f"({c['train_steps']} attack steps). Learning rates tuned on the validation split "
        f"({c['val_size']} training samples held out; attacks {', '.join(c['val_attacks'])}) "
        "on the first seed; the test split is never used for selection.",
        table(results),
        "## Verdicts",
        "A comparison is *held* when its interval lies above 0, *not held* when below 0, "
        "*inconclusive* when it contains 0; a claim is held when all its comparisons are, not "
        "held when any is not.",
        claims_section(results),
        "## Learning-rate selection (validation, first seed)",
        tuning_section(results),
    ]
    radius = radius_section(results)
    if radius:
        parts += ["## First-order radius (margin / input-gradient norm, L∞ threat)",
                  "min over classes j ≠ y of (f_y − f_j) / ‖∇ₓ(f_y − f_j)‖₁ on the first "
                  f"{results['config'].get('radius_points')} test points, and how well it "
                  "ranks the minimal perturbation FAB-T finds (all targets).", radius]
    iwi = iwi_section(results)
    if iwi:
        parts += ["## IWI: do inherited zeros stay dead?", iwi]
    return "\n\n".join(parts) + "\n"


# ---- plots --------------------------------------------------------------------------------


def _bars(iv: dict[str, Any]) -> tuple[float, float]:
    m = 100 * iv["mean"]
    h = 0.0 if iv.get("half") is None else 100 * iv["half"]
    return m, h


def robustness_plot(results: dict[str, Any], path: Path) -> None:
    """Clean and worst-case robust accuracy per arm, mean with the interval as error bars."""
    arms = [(a, r) for a, r in results["arms"].items() if r["worst_case"]["mean"] is not None]
    fig = _figure()
    fig.set_size_inches(7, 0.45 * len(arms) + 1.5)
    ax = fig.add_subplot()
    ys = list(range(len(arms)))[::-1]
    for metric, marker, color, off in (("worst_case", "o", "C1", -0.12), ("clean", "s", "C0",
                                                                            0.12)):
        ms, hs = zip(*(_bars(r[metric]) for _, r in arms), strict=True) if arms else ((), ())
        ax.errorbar(ms, [y + off for y in ys], xerr=hs, fmt=marker, color=color, capsize=3,
                    label="robust (worst case)" if metric == "worst_case" else "clean")
    ax.set_yticks(ys)
    ax.set_yticklabels([r["label"] for _, r in arms], fontsize=8)
    ax.set_xlabel(f"test accuracy (%), mean ± {100 * results['level']:g} % interval")
    ax.set_title(f"accuracy per arm ({len(results['seeds'])} seed(s), eps {results['eps']:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def paired_plot(results: dict[str, Any], path: Path) -> None:
    """Paired differences of robust accuracy, one per claim comparison, with intervals."""
    comps = [(c["id"], k) for c in results["claims"] for k in c["comparisons"]
             if k["mean"] is not None]
    fig = _figure()
    fig.set_size_inches(7, 0.45 * len(comps) + 1.5)
    ax = fig.add_subplot()
    ys = list(range(len(comps)))[::-1]
    for y, (_, k) in zip(ys, comps, strict=True):
        m = 100 * k["mean"]
        h = 0.0 if k["half"] is None else 100 * k["half"]
        color = {"held": "C2", "not held": "C3"}.get(k["verdict"], "C7")
        ax.errorbar([m], [y], xerr=[h], fmt="o", color=color, capsize=3)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"claim {cid}: {k['arm']} − {k['baseline']}" for cid, k in comps],
                       fontsize=8)
    ax.set_xlabel("paired difference in worst-case robust accuracy (points); green held, "
                  "red not held, grey inconclusive")
    ax.set_title("the claims' comparisons")
    ax.grid(alpha=0.3)
    _save(fig, path)


def write_all(results: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out``; the plot paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(finite(results), indent=2, allow_nan=False)
                 + "\n")
    write_atomic(out / "results.md", markdown(results))
    paths = [out / p for p in PLOTS]
    robustness_plot(results, paths[0])
    paired_plot(results, paths[1])
    return paths


__all__ = ["PLOTS", "markdown", "paired_plot", "robustness_plot", "table", "write_all"]
