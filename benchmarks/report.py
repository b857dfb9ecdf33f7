"""Turn a pytest-benchmark JSON into a markdown table of ratios, measured side by side.

Usage: ``python benchmarks/report.py BENCH.json [--out RESULTS_SECTION.md]``

Every benchmark sets ``benchmark.group`` and ``extra_info["impl"]``; one entry per group
sets ``extra_info["baseline"] = True``. The table gives each entry's median time and its
ratio to the baseline of its group (``speed-up`` = baseline time / time, so > 1 is faster).
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


def table(data: dict) -> str:
    """Markdown for every group of the benchmark JSON ``data``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]].append(b)
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown CPU"
    lines = [
        f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, "
        f"Python {machine.get('python_version', '?')}; "
        f"run {data.get('datetime', '')[:19]}.",
        "",
        "| group | impl | median | speed-up vs baseline |",
        "|---|---|---|---|",
    ]
    for g in sorted(groups):
        rows = groups[g]
        base = next((r for r in rows if r.get("extra_info", {}).get("baseline")), None)
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
            lines.append(f"| {g} | {impl}{note} | {_fmt_time(med)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Print (or write) the ratio table for a pytest-benchmark JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    md = table(json.loads(args.json.read_text()))
    if args.out:
        args.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
