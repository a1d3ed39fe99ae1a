"""ruff over the code, the tests, the benchmarks and the examples (rules in
pyproject.toml, [tool.ruff]): errors, import order, likely bugs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "bench",
         "examples"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert "No module named ruff" not in output, \
        "ruff is missing: it is a test dependency, `./bootstrap test` installs it"
    assert proc.returncode == 0, f"ruff found problems (exit {proc.returncode}):\n{output}"
