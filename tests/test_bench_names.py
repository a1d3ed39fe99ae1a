"""`python -m bench.names` end to end on libstdc++, so the bench docs/names.md
cites cannot rot: every case ran in both modes (the figures are not checked)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]
LIBSTDCXX = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"


def test_bench_names_runs_each_case() -> None:
    proc = run_in_session([sys.executable, "-m", "bench.names", "--runs", "1", LIBSTDCXX], 300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| libstdc++")]
    assert [r.split("|")[3].split()[0] for r in rows] == ["list", "resolve"]
    for row in rows:  # four figures: CPU and wall, demangled and raw
        assert len(re.findall(r"\| \d+\.\d\d ", row + " ")) == 4, row
