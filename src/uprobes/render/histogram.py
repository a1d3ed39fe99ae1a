"""Latency histograms as funclatency draws them, and as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from uprobes.analysis.histogram import Histogram
from uprobes.render.json import write_json

UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000}
_UNIT_WORDS = {"ns": "nsecs", "us": "usecs", "ms": "msecs"}
BAR = 40


def write_histograms(out: TextIO, hists: Mapping[str, Histogram], unit: str = "ns") -> None:
    """One block per function, most calls first: the log2 distribution in
    `unit`, then count, mean, p50/p90/p99 and max."""
    if not hists:
        out.write("no calls seen\n")
        return
    first = True
    for name, h in sorted(hists.items(), key=lambda kv: (-kv[1].count, kv[0])):
        if not first:
            out.write("\n")
        first = False
        out.write(f"{name}\n")
        if not h.count:
            out.write("  no completed calls\n")
            continue
        _write_bars(out, rebucket(h, UNITS[unit]), _UNIT_WORDS[unit])
        out.write(f"  count {h.count}  mean {human(h.mean)}  p50 {human(h.percentile(50))}"
                  f"  p90 {human(h.percentile(90))}  p99 {human(h.percentile(99))}"
                  f"  max {human(h.max)}\n")


def rebucket(h: Histogram, div: int) -> list[tuple[int, int, int]]:
    """The log2 rows in units of `div` ns (values floored to the unit, as
    funclatency's -u/-m do); empty rows at the ends left out."""
    if div == 1:
        return h.log2_buckets()
    rows: dict[int, int] = {}
    for lo, _, n in h.log2_buckets():
        if n:
            b = max((lo // div).bit_length(), 1)
            rows[b] = rows.get(b, 0) + n
    return [(0 if b == 1 else 1 << (b - 1), (1 << b) - 1, rows.get(b, 0))
            for b in range(min(rows), max(rows) + 1)]


def _write_bars(out: TextIO, rows: list[tuple[int, int, int]], unit_word: str) -> None:
    peak = max(n for _, _, n in rows) or 1
    w = max(10, *(len(str(hi)) for _, hi, _ in rows))
    out.write(f"{unit_word:>{w}}{' ' * (w + 5)}: count     distribution\n")
    for lo, hi, n in rows:
        stars = "*" * (n * BAR // peak)
        out.write(f"{lo:>{w}} -> {hi:<{w}} : {n:<8} |{stars:<{BAR}}|\n")


def human(ns: float) -> str:
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.1f} us"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.2f} ms"
    return f"{ns / 1_000_000_000:.3f} s"


def write_histograms_json(out: TextIO, hists: Mapping[str, Histogram],
                          extra: Mapping[str, object] | None = None) -> None:
    """One line: `{NAME: {count, mean_ns, min_ns, p50_ns, p90_ns, p99_ns, max_ns,
    buckets: [[lo_ns, hi_ns, count], ...]}}`; `extra`: more keys in each NAME's."""
    write_json(out, {name: histogram_doc(h, extra)
                     for name, h in sorted(hists.items(), key=lambda kv: (-kv[1].count, kv[0]))})


def histogram_doc(h: Histogram, extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """One histogram as `write_histograms_json` writes it."""
    return {
        "count": h.count, "mean_ns": round(h.mean, 1), "min_ns": h.min or 0,
        "p50_ns": h.percentile(50), "p90_ns": h.percentile(90), "p99_ns": h.percentile(99),
        "max_ns": h.max, "buckets": [list(row) for row in h.log2_buckets()], **(extra or {}),
    }
