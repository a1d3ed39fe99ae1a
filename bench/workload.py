"""The shared bench workload: a compiled loop calling one noinline function N times.

Every tool in a bench probes the same binary and function, so per-hit figures
compare like with like.  See workload.c for the two functions (first
instruction emulated vs not).
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("workload.c")
FUNCTIONS = ("work_emulated", "work_boosted")


@dataclass(frozen=True)
class Workload:
    exe: Path

    def argv(self, hits: int, function: str) -> list[str]:
        """The command that calls `function` `hits` times."""
        return [str(self.exe), str(hits), function]

    def expected_sum(self, hits: int) -> int:
        return hits * (hits + 1) // 2


def build(out_dir: Path | None = None) -> Workload:
    """Compile workload.c (cached by its content) and return it."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha1(source).hexdigest()[:10]
    out = out_dir or Path(tempfile.gettempdir())
    exe = out / f"uprobes-bench-workload-{tag}"
    if not exe.exists():
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-g", "-o", str(tmp), str(SOURCE)], check=True)
        tmp.rename(exe)
    return Workload(exe)
