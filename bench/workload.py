"""The shared bench workload: a compiled loop calling one noinline function N times.

Every tool in a bench probes the same binary and function, so per-hit figures
compare like with like.  See workload.c for the two functions (first
instruction emulated vs not).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("workload.c")
FUNCTIONS = ("work_emulated", "work_boosted")  # (and work_c, for bench/inprogram.py)
# The workload's last line: when its loop started and how long it took (CLOCK_MONOTONIC ns).
RESULT = re.compile(r"start_ns=(\d+) loop_ns=(\d+)")


def loop_ns(output: str) -> int | None:
    """The loop time the workload printed in `output` (None: it printed none).

    Timing the loop inside the workload leaves out every tool's start-up
    and teardown: what is left is the hits' cost (plus the calls' own)."""
    found = RESULT.search(output)
    return int(found[2]) if found else None


@dataclass(frozen=True)
class Workload:
    exe: Path

    def argv(self, hits: int, function: str) -> list[str]:
        """The command that calls `function` `hits` times."""
        return [str(self.exe), str(hits), function]

    def expected_sum(self, hits: int) -> int:
        return hits * (hits + 1) // 2


def build(out_dir: Path | None = None, flags: tuple[str, ...] = ()) -> Workload:
    """Compile workload.c (cached by its content and `flags`) and return it."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha1(source + " ".join(flags).encode()).hexdigest()[:10]
    out = out_dir or Path(tempfile.gettempdir())
    exe = out / f"uprobes-bench-workload-{tag}"
    if not exe.exists():
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-g", *flags, "-o", str(tmp), str(SOURCE)], check=True)
        tmp.rename(exe)
    return Workload(exe)
