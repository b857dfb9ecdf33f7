"""Turn a pytest-benchmark JSON into a markdown table of ratios, measured side by side.

Usage: ``python benchmarks/report.py BENCH.json [--out RESULTS_SECTION.md]``

Every benchmark sets ``benchmark.group`` and ``extra_info["impl"]``; one entry per group
sets ``extra_info["baseline"] = True``. The table gives each entry's median time and its
ratio to the baseline of its group (``speed-up`` = baseline time / time, so > 1 is faster).

Groups whose entries carry ``extra_info["images"]`` (the end-to-end suite) get their own
table: images/s, the speed-up, and where ``extra_info["mac_ideal"]`` (dense MACs / non-zero
MACs) is given, the fraction of that ideal the speed-up reaches.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path


def _fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if s * scale >= 1:
            return f"{s * scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _header(data: dict) -> list[str]:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown CPU"
    return [
        f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, "
        f"Python {machine.get('python_version', '?')}; "
        f"run {data.get('datetime', '')[:19]}.",
        "",
    ]


def _groups(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]].append(b)
    return groups


def _baseline(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r.get("extra_info", {}).get("baseline")), None)


def _is_end_to_end(rows: list[dict]) -> bool:
    return any("images" in r.get("extra_info", {}) for r in rows)


def table(data: dict) -> str:
    """Markdown for every group of the benchmark JSON ``data``."""
    groups = _groups(data)
    lines = _header(data) + [
        "| group | impl | median | spread | speed-up vs baseline |",
        "|---|---|---|---|---|",
    ]
    op_groups = [g for g in sorted(groups) if not _is_end_to_end(groups[g])]
    for g in op_groups:
        rows = groups[g]
        base = _baseline(rows)
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            info = r.get("extra_info", {})
            impl = info.get("impl", r["name"])
            med = r["stats"]["median"]
            if base is None:
                ratio = "n/a (no baseline)"
            elif r is base:
                ratio = "1.00 (baseline)"
            else:
                ratio = f"{base['stats']['median'] / med:.2f}x"
            extra = {k: v for k, v in info.items() if k not in ("impl", "baseline")}
            note = f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else ""
            lines.append(f"| {g} | {impl}{note} | {_fmt_time(med)} | {_spread(r)} | {ratio} |")
    if not op_groups:
        lines = _header(data)
    e2e = end_to_end_table(groups)
    return "\n".join(lines) + "\n" + (("\n" + e2e) if e2e else "")


def _spread(row: dict) -> str:
    """(max - min) / median of the row's rounds: how far apart its timings lie."""
    st = row["stats"]
    med = st["median"]
    return f"{(st['max'] - st['min']) / med:.0%}" if med > 0 else ""


def end_to_end_table(groups: dict[str, list[dict]]) -> str:
    """The end-to-end groups: images/s, speed-up over the baseline, fraction of MAC ideal."""
    names = [g for g in sorted(groups) if _is_end_to_end(groups[g])]
    if not names:
        return ""
    lines = [
        "| group | impl | images/s | spread | speed-up vs baseline | MAC ideal "
        "| fraction of ideal |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in names:
        rows = groups[g]
        base = _baseline(rows)
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            info = r.get("extra_info", {})
            med = r["stats"]["median"]
            ips = info["images"] / med if med > 0 else float("inf")
            speed = base["stats"]["median"] / med if base is not None and med > 0 else None
            ideal = info.get("mac_ideal")
            tag = " (baseline)" if r is base else ""
            speed_s = "n/a (no baseline)" if speed is None else f"{speed:.2f}x{tag}"
            ideal_s = "" if ideal is None else f"{ideal:.2f}x"
            frac = "" if ideal is None or speed is None else f"{speed / ideal:.0%}"
            lines.append(f"| {g} | {info.get('impl', r['name'])} | {ips:.1f} | {_spread(r)} | "
                         f"{speed_s} | {ideal_s} | {frac} |")
    return "\n".join(lines) + "\n"


SPARSITY_AXIS = {"dense": 0.0, "layer90": 0.90, "layer95": 0.95, "layer99": 0.99,
                 "global90": 0.90, "global95": 0.95}


def speedup_plot(groups: dict[str, list[dict]], path: Path, task: str = "pgd10",
                 impl: str = "saf") -> None:
    """PNG: ``impl``'s speed-up over the group baseline against sparsity, one line per model
    and pruning scope (end-to-end groups named ``<task> <model> <sparsity>``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for g, rows in groups.items():
        parts = g.split()
        if len(parts) != 3 or parts[0] != task or parts[2] not in SPARSITY_AXIS:
            continue
        base = _baseline(rows)
        mine = next((r for r in rows if r.get("extra_info", {}).get("impl") == impl), None)
        if base is None or mine is None:
            continue
        speed = base["stats"]["median"] / mine["stats"]["median"]
        sp = SPARSITY_AXIS[parts[2]]
        scopes = ("layer", "global") if parts[2] == "dense" else (parts[2].rstrip("0123456789"),)
        for scope in scopes:  # the dense point starts both curves
            series[f"{parts[1]} {scope}"].append((sp, speed))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(series.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot([100 * x for x in xs], ys, marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(f"{task} speed-up of {impl} over the baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Print (or write) the ratio table for a pytest-benchmark JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG of the PGD-10 speed-up against sparsity")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    md = table(data)
    if args.plot:
        speedup_plot(_groups(data), args.plot)
    if args.out:
        args.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
