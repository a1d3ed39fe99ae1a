"""`uprobes top`: rates per probe and process, a waiting line, an exact final summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import Compiler
from uprobes.commands import main


@pytest.fixture
def target(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("target.c")


def test_final_summary_counts_every_hit_per_process(target: Path) -> None:
    out = io.StringIO()
    status = main(["top", "--json", "-i", "0.2", f"{target}:add", f"{target}:greet",
                   "--", str(target), "40"], out=out)
    assert status == 0
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    final = docs[-1]
    assert final["lost"] == 0
    by_probe = {row["probe"]: row for row in final["summary"]}
    assert set(by_probe) == {"uprobes/add", "uprobes/greet"}
    assert all(row["total"] == 40 and row["comm"] == target.name[:15] for row in by_probe.values())
    assert len({row["pid"] for row in by_probe.values()}) == 1


def test_until_the_first_hit_it_says_what_it_waits_for(target: Path) -> None:
    out = io.StringIO()
    status = main(["top", "-i", "0.2", "--duration", "0.9", f"{target}:fib"], out=out)
    assert status == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("waiting for the first hit of 1 probe line(s) system-wide")
    assert lines[-1] == "no hits"


def test_a_table_per_interval_in_a_pipe(target: Path) -> None:
    out = io.StringIO()
    assert main(["top", "-i", "0.1", f"{target}:add", "--", "/bin/sh", "-c",
                 f"sleep 0.3; {target} 3; sleep 0.3"], out=out) == 0
    text = out.getvalue()
    assert "PROBE" in text and "HITS/S" in text  # at least one live table after the hits
    assert text.splitlines()[-2].split()[:4] == ["PROBE", "PID", "COMM", "TOTAL"]
    assert text.splitlines()[-1].split()[-1] == "3"


def test_if_comm_and_tid_filter_hits(target: Path) -> None:
    out = io.StringIO()
    assert main(["top", "--json", "-i", "5", "--if", "a >= 30 && a & 1",
                 f"{target}:add a=%di:s64", "--", str(target), "40"], out=out) == 0
    final = json.loads(out.getvalue().splitlines()[-1])
    assert [row["total"] for row in final["summary"]] == [5]  # 31 33 35 37 39
    out = io.StringIO()
    assert main(["top", "--json", "--comm", "nobody", f"{target}:add",
                 "--", str(target), "40"], out=out) == 0
    assert json.loads(out.getvalue().splitlines()[-1])["summary"] == []


def test_the_ptrace_engine_counts_every_filtered_hit(compile_c: Compiler) -> None:
    exe = compile_c("target.c")
    out = io.StringIO()
    assert main(["top", "-e", "ptrace", "--json", "-i", "5", "--if", "a >= 30 && a & 1",
                 f"{exe}:add a=%di:s64", "--", str(exe), "40"], out=out) == 0
    final = json.loads(out.getvalue().splitlines()[-1])
    assert [row["total"] for row in final["summary"]] == [5] and final["lost"] == 0
