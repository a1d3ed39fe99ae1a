"""`uprobes trace --format perfetto`: a Chrome trace-event file with a slice per call."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import Compiler, without_clocks

from uprobes.commands import main


@pytest.fixture
def latency_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("latency.c")


def test_calls_become_nested_slices_and_other_hits_instants(latency_exe: Path,
                                                            tmp_path: Path) -> None:
    out_file = tmp_path / "trace.json"
    status = main(["trace", "--format", "perfetto", "-o", str(out_file),
                   f"{latency_exe}:fib n=%di:s32", f"r {latency_exe}:fib v=$retval:s64",
                   f"{latency_exe}:nap us=%di:s64", "--", str(latency_exe)], out=io.StringIO())
    assert status == 0
    doc = json.loads(out_file.read_text())
    assert without_clocks(doc["uprobes"]) == {"events": 177 * 2 + 25, "lost": 0}
    events = doc["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    instants = [e for e in events if e["ph"] == "i"]
    names = {e["name"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {"process_name": latency_exe.name[:15], "thread_name": latency_exe.name[:15]}
    # fib(10): 177 calls, each a slice with its argument and its return value.
    assert len(slices) == 177 and {s["name"] for s in slices} == {"fib"}
    for s in slices:
        n, v = s["args"]["n"], s["args"]["return"]["v"]
        assert v == _fib(n)
    # Nesting: every slice lies inside the slice of its caller (fib(n+1) or fib(n+2)).
    outer = max(slices, key=lambda s: s["dur"])
    assert outer["args"]["n"] == 10
    for s in slices:
        assert outer["ts"] <= s["ts"] and s["ts"] + s["dur"] <= outer["ts"] + outer["dur"] + 1e-3
    # nap has no return probe: 25 instants, never held back as open calls.
    assert len(instants) == 25 and {i["name"] for i in instants} == {"nap"}
    assert sorted(i["args"]["us"] for i in instants) == [0] * 20 + [2000] * 5


def test_json_and_another_format_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--json", "--format", "perfetto", "libc:malloc", "--", "/bin/true"]) == 2
    assert capsys.readouterr().err.startswith("uprobes: error: --json is --format jsonl")


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
