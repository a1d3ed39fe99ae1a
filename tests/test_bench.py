"""`python -m bench --quick --ours` end to end, so the comparison bench cannot rot.

Only our engines and the raw kernel counter: the other tools (bpftrace, perf,
gdb, ltrace, frida) are the bench's business, never the suite's.  What is
checked is that every row ran and counted exactly; the figures are not
(speed goals live in the bench, not in timed tests).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kernel
def test_bench_quick_runs_our_engines_exactly(tracefs: Path, tmp_path: Path) -> None:
    proc = run_in_session([sys.executable, "-m", "bench", "--quick", "--ours", "--sizes", "1",
                           "--out", str(tmp_path)], 120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "bench.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("tool", "") and not cells[0].startswith("-"):
            rows[(cells[0], cells[1])] = cells
    wanted = [("raw uprobe PMU counter (perf_event_open)", "entry"),
              ("uprobes count -e kernel", "entry"),
              ("uprobes trace (text, 2 args)", "entry"),
              ("uprobes trace --json (2 args)", "entry"),
              ("uprobes count -e ptrace", "entry (push: emulated)"),
              ("uprobes count -e ptrace", "entry (mov: boosted)"),
              ("uprobes count -e ptrace", "entry (mov: not boosted, stepped)"),
              ("uprobes count -e ptrace", "return (probes on the rets)"),
              ("uprobes count -e ptrace", "return (--uretprobe)")]
    for key in wanted:
        assert key in rows, f"{key} missing from\n{table}"
        tool, probe, function, ns, ratio, hits, count = rows[key]
        assert count.startswith("exact"), f"{key}: {count}"
        assert re.fullmatch(r"-?[\d,]+", ns), f"{key}: {ns}"
        assert ratio.endswith("x"), f"{key}: {ratio}"
    attach = [ln for ln in table.splitlines() if ln.startswith("| uprobes count -e kernel")
              and "placed" in ln]
    assert attach and "1 (1 placed)" in attach[0], table


def test_inprogram_bench_runs_our_rows_exactly(tmp_path: Path) -> None:
    """`python -m bench.inprogram --only uprobes` end to end (the other tools
    are the bench's business): every row of ours saw every call."""
    proc = run_in_session([sys.executable, "-m", "bench.inprogram", "--calls", "3000",
                           "--repeats", "1", "--only", "uprobes"], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from bench.inprogram import rows as bench_rows
    ours = [r.tool for r in bench_rows() if r.tool.startswith("uprobes ")]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| uprobes ")]
    assert [ln.split("|")[1].strip() for ln in rows] == ours, proc.stdout  # each ran, once
    assert all(ln.rstrip(" |").endswith("exact") for ln in rows), proc.stdout


def test_record_drain_bench_runs(tmp_path: Path) -> None:
    """`python -m bench.record_drain` at one small lap: a row per ring shape,
    and the recordings it made are gone."""
    proc = run_in_session([sys.executable, "-m", "bench.record_drain", "--laps", "1",
                           "--repeats", "1", "--dir", str(tmp_path)], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln for ln in proc.stdout.splitlines() if re.match(r"\| (64|128) bytes \|", ln)]
    assert len(rows) == 2, proc.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.root  # the agent's process events (a netlink socket only root binds)
def test_agent_bench_ptrace_mode_runs_and_counts_the_calls() -> None:
    """`bench.agent_idle --mode ptrace`: the agent follows a program started
    before it and one after, and the calls it counts are the programs' (the
    share of the rate is a figure, bounded loosely: none counted twice, and
    most counted even on a loaded machine). The window's calls are the
    rate's give or take a program's lag at each end (it catches up on the
    calls it owes): 99.9% measured at load 5, and one program 70 ms later
    at the first scrape than at the last would make it more than 101% (the
    bound was 101); a process counted twice would make it 150%."""
    proc = run_in_session([sys.executable, "-m", "bench.agent_idle", "--mode", "ptrace",
                           "--seconds", "3", "--scrape", "1", "--rate", "20000",
                           "--processes", "2"], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = re.fullmatch(r"ptrace     : 2 processes, 40000 calls/s timed ([\d.]+)%; \d+ scrapes "
                       r"of 1 series over \d+ s; the agent's CPU [\d.]+ s = [\d.]+% of a core "
                       r"\(watchers [\d.]+ s\); the programs' [\d.]+%\n", proc.stdout)
    assert got, proc.stdout
    assert 50 <= float(got.group(1)) <= 110, proc.stdout
