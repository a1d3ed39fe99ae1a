"""`uprobes top`: rates per probe and process, a waiting line, an exact final summary."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler, killed_after

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


def test_a_table_per_interval_in_a_pipe(target: Path, tmp_path: Path) -> None:
    """A live table shows the hits while the command still runs (it ends
    only once one did), then the final summary."""
    go = tmp_path / "go"
    os.mkfifo(go)
    top = subprocess.Popen([sys.executable, "-m", "uprobes", "top", "-i", "0.1", f"{target}:add",
                            "--", "/bin/sh", "-c", f"{target} 3; read _ < {go}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert top.stdout is not None
    text = ""
    try:
        with killed_after(top):
            while not re.search(r"HITS/S.*\n.*uprobes/add", text):  # a live table with the hits
                line = top.stdout.readline()
                assert line, f"top ended before a live table showed the hits: {text!r}"
                text += line
            with open(go, "w") as release:
                release.write("\n")
            rest, err = top.communicate(timeout=120)
    finally:
        top.kill()
        top.wait()
    assert top.returncode == 0, err
    text += rest
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
