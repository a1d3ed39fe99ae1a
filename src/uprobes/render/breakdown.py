"""`latency --breakdown`: each function's parts (analysis/breakdown.py) as a
table, then the histogram of each part; or as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from uprobes.analysis.breakdown import Breakdown
from uprobes.analysis.histogram import Histogram
from uprobes.render.histogram import human, write_histograms
from uprobes.render.json import write_json


def part_histograms(breakdowns: Mapping[str, Breakdown]) -> dict[str, Histogram]:
    """`FUNCTION: PART` -> the part's histogram (for the pictures)."""
    return {f"{name}: {part}": h for name, b in breakdowns.items() for part, h in b.parts.items()}


def write_breakdowns(out: TextIO, breakdowns: Mapping[str, Breakdown], unit: str) -> None:
    for name, b in sorted(breakdowns.items(), key=lambda kv: (-kv[1].calls, kv[0])):
        out.write(f"\n{name}: where the time of {b.calls} calls went "
                  f"({human(b.total_ns / max(b.calls, 1))} a call)\n")
        width = max(len(p) for p in b.parts)
        out.write(f"  {'part':<{width}}  {'mean':>10}  {'share':>6}  {'p50':>10}  {'p99':>10}\n")
        for part, h in b.parts.items():
            share = 100.0 * h.total / b.total_ns if b.total_ns else 0.0
            out.write(f"  {part:<{width}}  {human(h.mean):>10}  {share:>5.1f}%  "
                      f"{human(h.percentile(50)):>10}  {human(h.percentile(99)):>10}\n")
        out.write("  (off-cpu parts and on-cpu add up to the calls' time; a system call's "
                  "time includes its time off the CPU)\n\n")
        write_histograms(out, {f"{name}: {part}": h for part, h in b.parts.items()}, unit)


def write_breakdowns_json(out: TextIO, hists: Mapping[str, Histogram],
                          breakdowns: Mapping[str, Breakdown]) -> None:
    """One line: `{NAME: {count, mean_ns, p50_ns, p99_ns, max_ns, total_ns, parts:
    {PART: {total_ns, mean_ns, share, p50_ns, p99_ns, max_ns}}}}`."""
    doc: dict[str, object] = {}
    for name, h in sorted(hists.items(), key=lambda kv: (-kv[1].count, kv[0])):
        b = breakdowns.get(name, Breakdown())
        doc[name] = {
            "count": h.count, "mean_ns": round(h.mean, 1), "p50_ns": h.percentile(50),
            "p99_ns": h.percentile(99), "max_ns": h.max, "total_ns": b.total_ns,
            "parts": {part: {"total_ns": p.total, "mean_ns": round(p.mean, 1),
                             "share": round(p.total / b.total_ns, 4) if b.total_ns else 0.0,
                             "p50_ns": p.percentile(50), "p99_ns": p.percentile(99),
                             "max_ns": p.max} for part, p in b.parts.items()}}
    write_json(out, doc)
