"""Counted stacks (`uprobes stacks`): a ranked list for people, folded lines
for flame-graph tools, one JSON line for programs."""

from __future__ import annotations

from typing import TextIO

from uprobes.analysis.stacks import StackCounter
from uprobes.render.json import write_json


def write_stacks(out: TextIO, counter: StackCounter, top: int | None) -> None:
    """Per probe (most hits first): its hits, then its `top` stacks, each as
    its count and share of the probe's hits, then one frame a line,
    innermost first, as `trace --stack` prints a hit's stack."""
    ranked = sorted(counter.probes.items(), key=lambda kv: (-kv[1].hits, kv[0]))
    for i, (name, stacks) in enumerate(ranked):
        if i:
            out.write("\n")
        shown = stacks.top(top)
        more = len(stacks.counts) - len(shown)
        out.write(f"{name}: {stacks.hits} hits, {len(stacks.counts)} distinct stacks"
                  + (f" ({more} not shown)" if more > 0 else "") + "\n")
        for count, frames in shown:
            out.write(f"  {count} ({100.0 * count / stacks.hits:.1f}%)\n")
            out.write("".join(f"\t{frame}\n" for frame in frames))
        if stacks.unwalked:
            out.write(f"  {stacks.unwalked} hits without a stack\n")


def write_folded(out: TextIO, counter: StackCounter) -> None:
    """`comm;outermost;...;innermost COUNT`, one path a line."""
    out.write("".join(f"{path} {count}\n" for path, count in counter.folded()))


def write_stacks_json(out: TextIO, counter: StackCounter, top: int | None) -> None:
    """`{"PROBE": {"hits": N, "unwalked": N, "stacks": [{"count": N,
    "frames": [{"addr", "symbol", "offset", "file"}, ...]}, ...]}}` on one
    line, frames innermost first, stacks most frequent first."""
    write_json(out, {
        name: {"hits": s.hits, "unwalked": s.unwalked,
               "stacks": [{"count": count, "frames": [f.as_dict() for f in frames]}
                          for count, frames in s.top(top)]}
        for name, s in sorted(counter.probes.items(), key=lambda kv: (-kv[1].hits, kv[0]))})
