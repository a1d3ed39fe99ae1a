"""The package type-checks: mypy, strict, as configured in pyproject.toml.

Run as a test so the README's test command (and so CI) checks it: a type
error lands nowhere. mypy's cache (.mypy_cache in the repository) makes a
second run quick; a clean clone's first run reads everything once.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_passes_on_the_package() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--no-color-output"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert "No module named mypy" not in output, \
        "mypy is missing: it is a test dependency, `./bootstrap test` installs it"
    assert proc.returncode == 0, f"mypy found errors (exit {proc.returncode}):\n{output}"
    # pyproject's `files` names the package: a configuration that checks
    # nothing would pass too.
    checked = re.search(r"no issues found in (\d+) source files", output)
    assert checked is not None, output
    assert int(checked.group(1)) >= len(list((ROOT / "src" / "uprobes").rglob("*.py"))), output
