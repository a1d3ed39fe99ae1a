"""Per-hit cost from timed runs: the slope between a small and a big hit count.

A tool's run costs startup + hits x per-hit.  Timing each tool at two hit
counts, alternately and repeatedly, and taking the median of the slopes
cancels startup (gdb reading symbols, Python importing) and most of the noise
of a shared machine.  Tools run side by side in one loop, so they see the same
machine state.
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class Skip(Exception):
    """A tool that cannot run here (not installed, not built yet): the message says why."""


@dataclass
class Outcome:
    """One run: the hits the tool counted (None if it does not say), its syscalls,
    the workload's own loop time (bench.workload.loop_ns), the records it
    reported lost (a tracer: hits = delivered + lost)."""

    hits: int | None
    syscalls: int | None = None
    loop_ns: int | None = None
    lost: int | None = None


@dataclass
class Series:
    """Timed runs of one tool at the small and the big hit count."""

    small: list[float] = field(default_factory=list)
    big: list[float] = field(default_factory=list)
    hits_seen: set[tuple[int, int | None]] = field(default_factory=set)
    syscalls: dict[int, int] = field(default_factory=dict)

    def per_hit(self, n_small: int, n_big: int) -> float:
        """Seconds per hit: the median of the repeats' slopes."""
        return statistics.median((b - s) / (n_big - n_small)
                                 for s, b in zip(self.small, self.big))

    def startup(self, n_small: int, n_big: int) -> float:
        return statistics.median(self.small) - self.per_hit(n_small, n_big) * n_small

    def counted_right(self) -> bool | None:
        """Whether every run counted exactly its hits (None: the tool does not count)."""
        counted = [(n, got) for n, got in self.hits_seen if got is not None]
        return None if not counted else all(n == got for n, got in counted)

    def syscalls_per_hit(self, n_small: int, n_big: int) -> float | None:
        if n_small not in self.syscalls or n_big not in self.syscalls:
            return None
        return (self.syscalls[n_big] - self.syscalls[n_small]) / (n_big - n_small)


def timed(run: Callable[[int], Outcome], hits: int) -> tuple[float, Outcome]:
    start = time.perf_counter()
    outcome = run(hits)
    return time.perf_counter() - start, outcome


def run_checked(argv: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command, its output captured; a failure is an error of the bench."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc


def strace_calls(summary: Path) -> int:
    """The total number of syscalls in an `strace -c -o FILE` summary."""
    for line in summary.read_text().splitlines():
        words = line.split()
        if words and words[-1] == "total":   # % time, seconds, usecs/call, calls, [errors]
            return int(words[3])
    raise RuntimeError(f"no total in {summary}")


def tree_env(src: str | None) -> dict[str, str]:
    """The environment that runs `python -m uprobes` from the source tree `src` (a
    checkout's src/) with this interpreter; None: the installed package.  Bytecode is
    written, as an installed package has it (the warm-up run compiles it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if src is not None:
        env["PYTHONPATH"] = os.path.abspath(src)
    return env


def tree_labels(srcs: Sequence[str | None]) -> list[str]:
    """A short name per source tree for a table: its checkout's short commit (`+` if
    the tree has uncommitted changes), else its directory's name (the checkout's, for
    a `src/`); the path where two would read the same."""
    def label(src: str | None) -> str:
        if src is None:
            return "installed"
        path = os.path.abspath(src)
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True).stdout.strip()
            return head.stdout.strip() + ("+" if dirty else "")
        base = os.path.basename(path)
        return os.path.basename(os.path.dirname(path)) if base == "src" else base
    labels = [label(src) for src in srcs]
    return [lab if labels.count(lab) == 1 else os.path.abspath(src or lab)
            for lab, src in zip(labels, srcs)]


def wait_for(proc: subprocess.Popen[bytes], marker: bytes, timeout: float, what: str) -> bytes:
    """Read `proc`'s stderr until `marker` appears; what was read.  An error if the
    process ends, or says nothing for `timeout` seconds, first."""
    assert proc.stderr is not None
    seen = b""
    while marker not in seen:
        ready, _, _ = select.select([proc.stderr], [], [], timeout)
        chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
        if not chunk:
            raise RuntimeError(f"{what} ended or hung before {marker.decode()!r}:\n"
                               + seen.decode(errors="replace"))
        seen += chunk
    return seen


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)
