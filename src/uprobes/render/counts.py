"""Hit counts per probe: a table for people, one JSON line for programs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

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
