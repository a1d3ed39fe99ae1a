"""`python -m bench.session_filter` end to end, so the bench cannot rot.

The figures are not checked (speed goals live in the bench): only that both
rows ran and handed the same 10 events, and that the pushed one read no
record but those (the kernel dropped the rest).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kernel
def test_session_filter_bench_runs(tracefs: Path) -> None:
    proc = run_in_session([sys.executable, "-m", "bench.session_filter", "--calls", "2000",
                           "--repeats", "1"], 120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^(condition=|filter=) .* handled +(\d+) +records +([\d,]+) ", proc.stdout,
                      re.M)
    assert [(kind, handled) for kind, handled, _ in rows] == [("condition=", "10"),
                                                              ("filter=", "10")], proc.stdout
    assert rows[0][2] == "10"
