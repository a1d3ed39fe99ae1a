"""`python -m bench.claims` end to end, so the bench cannot rot: both figures
are measured and each line states a goal. The figures are not checked
(speed and memory goals live in the bench, not in timed tests)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kernel
def test_bench_claims_measures_both_figures(tracefs: Path) -> None:
    proc = run_in_session([sys.executable, "-m", "bench.claims", "--calls", "2000",
                           "--hits", "20000"], 300, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert re.fullmatch(r"latency -e ptrace, median of 2,000 calls: [\d,]+ ns "
                        r"\(goal < 10 ns: (met|NOT MET)\)", lines[0]), lines[0]
    assert re.fullmatch(r"trace --json, peak RSS over 20,000 hits: \d+ MiB "
                        r"\(goal < 200 MiB: (met|NOT MET)\)", lines[1]), lines[1]
