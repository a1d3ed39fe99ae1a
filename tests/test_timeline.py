"""One clock for every event: hits of both engines on CLOCK_MONOTONIC, and the
clock snapshots (MONOTONIC, REALTIME, BOOTTIME) every timestamped output keeps."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler

from uprobes.commands import main

ENGINES = ("kernel", "ptrace")


@pytest.fixture
def timeline_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("timeline.c")


def trace_docs(argv: list[str]) -> list[dict[str, Any]]:
    out = io.StringIO()
    assert main(["trace", "--json", *argv], out=out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def check_clocks(clocks: dict[str, dict[str, int]], stamps: list[int]) -> None:
    start, end = clocks["start"], clocks["end"]
    for name in ("monotonic_ns", "realtime_ns", "boottime_ns"):
        assert 0 < start[name] <= end[name], (name, clocks)
    # BOOTTIME counts suspend too; MONOTONIC does not: never behind it.
    assert start["boottime_ns"] >= start["monotonic_ns"]
    # Every event lies between the snapshots, on their MONOTONIC clock.
    assert stamps and all(start["monotonic_ns"] <= ts <= end["monotonic_ns"] for ts in stamps)


@pytest.mark.parametrize("engine", ENGINES)
def test_json_hits_lie_between_the_clock_snapshots(timeline_exe: Path, engine: str) -> None:
    *hits, summary = trace_docs(["-e", engine, f"{timeline_exe}:mark n=%di:s32",
                                 f"{timeline_exe}:work", "--", str(timeline_exe), "2", "0", "0"])
    assert [h["args"]["n"] for h in hits if h["probe"] == "uprobes/mark"] == [1, 2]
    assert len(hits) == 4 and summary["summary"]["events"] == 4
    check_clocks(summary["summary"]["clocks"], [h["ts_ns"] for h in hits])


def test_chrome_json_keeps_the_clock_snapshots(timeline_exe: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "trace.json"
    assert main(["trace", "--format", "perfetto", "-o", str(out_file),
                 f"{timeline_exe}:mark n=%di:s32", "--", str(timeline_exe), "0"],
                out=io.StringIO()) == 0
    doc = json.loads(out_file.read_text())
    stamps = [int(e["ts"] * 1000) for e in doc["traceEvents"] if e["ph"] != "M"]
    assert len(stamps) == 2
    check_clocks(doc["uprobes"]["clocks"], stamps)
