"""The worked example of docs/targets.md: Python's own USDT probes in Debian's
/usr/bin/python3.11, traced in both engines: each function the script calls,
with file, name and line, entries and returns, and its output unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, need

PY311 = "/usr/bin/python3.11"
SCRIPT = FIXTURES / "py_calls.py"
FETCH = "file=+0($arg1):string fn=+0($arg2):string line=$arg3"


def _line_of(fn: str) -> int:
    return next(i for i, text in enumerate(SCRIPT.read_text().splitlines(), 1)
                if text.startswith(f"def {fn}("))


@pytest.mark.parametrize("engine", [pytest.param("kernel", marks=pytest.mark.root), "ptrace"])
def test_python_function_entry_and_return(engine: str, tmp_path: Path) -> None:
    need(Path(PY311).exists(), f"{PY311} is not installed")
    if engine == "kernel":
        need(Path("/sys/kernel/tracing/uprobe_events").exists(), "no tracefs")
    out = tmp_path / "trace.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "uprobes", "trace", "-e", engine, "--json", "-o", str(out),
         f"usdt:{PY311}:python:function__entry {FETCH}",
         f"usdt:{PY311}:python:function__return {FETCH}", "--", PY311, str(SCRIPT)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "HELLO WORLD\n"
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    ours = [(d["probe"].split("/")[1], d["args"]["fn"], d["args"]["line"])
            for d in docs if "args" in d and d["args"]["file"] == str(SCRIPT)
            and d["args"]["fn"] in ("shout", "greet")]
    shout, greet = _line_of("shout"), _line_of("greet")
    # Entries give the def's line, returns the line that returns. 3.11 fires
    # function__return for every call, function__entry only once a profile
    # function is set: the first shout/greet pair returns without entering.
    assert ours == [("function__return", "greet", greet + 1),
                    ("function__return", "shout", shout + 1),
                    ("function__entry", "shout", shout), ("function__entry", "greet", greet),
                    ("function__return", "greet", greet + 1),
                    ("function__return", "shout", shout + 1)]
