"""`python -m bench.startup` end to end, so the start-up bench cannot rot.

The figures are not checked (speed goals live in the bench, not in timed
tests): only that each spec ran, reached 'tracing' and got a row.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kernel
def test_startup_bench_runs(tracefs: Path) -> None:
    specs = ["libc:getppid", "usdt:/usr/bin/python3.11:python:function__entry"]
    proc = run_in_session([sys.executable, "-m", "bench.startup", "-n", "1", *specs], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for spec in specs:
        row = rf"^\| `{re.escape(spec)}` \| installed( \| [\d.]+ s){{3}} \|$"
        assert re.search(row, proc.stdout, re.M), proc.stdout
