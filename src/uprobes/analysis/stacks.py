"""Distinct user stacks per probe, counted: what `uprobes stacks` reports.

A stack is keyed by where each frame is in its file (path, symbol and
offset; a frame no symbol covers, by its link-time address), never by its
runtime address: the same call path in two processes (or in one process
before and after an exec) is one stack, whatever ASLR did. Only a frame in
no file at all (JIT code) keeps its runtime address.

Two views of the same counts:
- `distinct`: the exact call sites, for reading (`malloc+0x0 <- g_strdup+0x1e
  <- ...`);
- `folded`: one line per path through the functions, as flame-graph tools
  read it (`comm;main;parse;malloc 42`, outermost first; Brendan Gregg's
  flamegraph.pl, inferno, speedscope): call sites in one function merge.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from uprobes.model.event import Event, Frame, printable

FrameKey = tuple[str | None, str | None, int]


def frame_key(frame: Frame) -> FrameKey:
    """Where a frame is, independent of where its file was mapped (a
    Python frame: its function and line)."""
    if frame.python:
        return frame.path, frame.symbol, -1 if frame.line is None else frame.line
    if frame.symbol is None:
        where = frame.runtime_addr if frame.link_addr is None else frame.link_addr
        return frame.path, None, where
    return frame.path, frame.symbol, frame.offset


def folded_name(frame: Frame) -> str:
    """A frame in folded form: its function without a symbol version, else
    `[file]` (perf's habit for code no symbol covers); never a `;`, which
    separates frames. A Python frame is `qualname (file.py:LINE)`, as
    py-spy folds them, so a flame graph shows lines."""
    if frame.python and frame.path is None:
        name = str(frame.symbol)
    elif frame.python:
        line = "?" if frame.line is None else frame.line
        name = printable(f"{frame.symbol} ({os.path.basename(frame.path or '?')}:{line})")
    elif frame.symbol is not None:
        name = frame.symbol.split("@", 1)[0]  # malloc@@GLIBC_2.2.5: one malloc
    elif frame.path:
        name = f"[{os.path.basename(frame.path)}]"
    else:
        name = "[unknown]"
    return name.replace(";", ":")


@dataclass
class ProbeStacks:
    """The stacks one probe was hit with."""

    hits: int = 0
    unwalked: int = 0
    """Hits that came without a stack (none could be captured)."""
    counts: Counter[tuple[FrameKey, ...]] = field(default_factory=Counter)
    frames: dict[tuple[FrameKey, ...], tuple[Frame, ...]] = field(default_factory=dict)
    folded: Counter[str] = field(default_factory=Counter)

    def top(self, n: int | None = None) -> list[tuple[int, tuple[Frame, ...]]]:
        """The `n` most frequent distinct stacks (all with None), as
        (count, frames innermost first); ties in a stable order."""
        ranked = sorted(self.counts.items(), key=lambda kv: -kv[1])  # ties: first seen first
        return [(count, self.frames[key]) for key, count in ranked[:n]]


class StackCounter:
    """Counts each event's stack under its probe; feed it `add`."""

    MEMO_MAX = 4096  # stacks whose keys are remembered

    def __init__(self) -> None:
        self.probes: dict[str, ProbeStacks] = {}
        # (id of a stack tuple, comm) -> (the tuple, its key, its folded
        # path): a walk remembered by the symbolizer hands on the same tuple
        # for the same stack, so a hot stack is keyed once, not per hit
        # (the tuple is kept here, so its id is not reused meanwhile).
        self._keys: dict[tuple[int, str], tuple[tuple[Frame, ...], tuple[FrameKey, ...], str]] \
            = {}

    def add(self, ev: Event) -> None:
        stacks = self.probes.get(ev.probe)
        if stacks is None:
            stacks = self.probes[ev.probe] = ProbeStacks()
        stacks.hits += 1
        if not ev.stack:
            stacks.unwalked += 1
            return
        known = self._keys.get((id(ev.stack), ev.comm))
        if known is not None and known[0] is ev.stack:
            _, key, path = known
        else:
            key = tuple(frame_key(f) for f in ev.stack)
            path = ";".join([ev.comm.replace(";", ":") or "[unknown]",
                             *(folded_name(f) for f in reversed(ev.stack))])
            if len(self._keys) >= self.MEMO_MAX:
                del self._keys[next(iter(self._keys))]
            self._keys[(id(ev.stack), ev.comm)] = (ev.stack, key, path)
        if key not in stacks.frames:
            stacks.frames[key] = ev.stack
        stacks.counts[key] += 1
        stacks.folded[path] += 1

    def folded(self) -> Iterator[tuple[str, int]]:
        """Every probe's folded paths, summed (a flame graph shows them
        together; its leaves are the probed functions), sorted by path."""
        total: Counter[str] = Counter()
        for stacks in self.probes.values():
            total.update(stacks.folded)
        return iter(sorted(total.items()))
