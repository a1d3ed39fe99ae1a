"""Hit counts per probe: a table for people, one JSON line for programs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from uprobes.analysis.keyed import Aggregate, KeyedCounts
from uprobes.render.json import write_json
from uprobes.render.table import write_table


def ranked(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """By count, highest first; ties by name."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def write_count_table(out: TextIO, counts: Mapping[str, int], title: str | None = None) -> None:
    """Probes that were hit, most hits first; the unhit ones summed up in one line."""
    rows = [(name, str(n)) for name, n in ranked(counts) if n]
    write_table(out, ["PROBE", "COUNT"], rows, title=title, right=[1])
    unhit = sum(1 for n in counts.values() if not n)
    if unhit:
        out.write(f"({unhit} of {len(counts)} probes not hit)\n")


def write_count_json(out: TextIO, counts: Mapping[str, int]) -> None:
    """`{"GRP/EVENT": count, ...}` on one line, most hits first, every probe listed."""
    write_json(out, dict(ranked(counts)))


def _keyed_rows(keys: Mapping[int | str, Aggregate]) -> list[tuple[int | str, Aggregate]]:
    return sorted(keys.items(), key=lambda kv: (-kv[1].count, str(kv[0])))


def write_keyed_table(out: TextIO, counts: KeyedCounts) -> None:
    """Per probe, its keys by hits, most first; with a value, its sum, min,
    max and mean per key; a table that filled says how many hits it could not key."""
    first = True
    for name, keys in sorted(counts.keys.items()):
        if not first:
            out.write("\n")
        first = False
        head = [counts.by.upper(), "COUNT"]
        if counts.value is not None:
            head += [f"SUM({counts.value})", "MIN", "MAX", "AVG"]
        rows = []
        for key, agg in _keyed_rows(keys):
            row = [str(key), str(agg.count)]
            if counts.value is not None:
                row += [str(agg.sum), *("-" if m is None else str(m) for m in (agg.min, agg.max)),
                        f"{agg.mean:.1f}"]
            rows.append(row)
        write_table(out, head, rows, title=name, right=list(range(1, len(head))))
        if counts.overflow.get(name):
            out.write(f"({counts.overflow[name]} hits not keyed: the table of "
                      f"{name} was full)\n")


def write_keyed_json(out: TextIO, counts: KeyedCounts) -> None:
    """`{"GRP/EVENT": {"by": KEY, "overflow": N, "keys": [{"key": K, "count": N,
    ["sum", "min", "max", "avg"]}, ...]}}` on one line."""
    doc: dict[str, object] = {}
    for name, keys in sorted(counts.keys.items()):
        rows = []
        for key, agg in _keyed_rows(keys):
            row: dict[str, object] = {"key": key, "count": agg.count}
            if counts.value is not None:
                row.update(sum=agg.sum, min=agg.min, max=agg.max, avg=round(agg.mean, 3))
            rows.append(row)
        doc[name] = {"by": counts.by, "overflow": counts.overflow.get(name, 0), "keys": rows}
    write_json(out, doc)
