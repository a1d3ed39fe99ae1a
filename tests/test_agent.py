"""`uprobes agent`: probes kept in place, counts and latencies served at
/metrics, every probe removed when it is stopped; bad input refused."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_support import (
    CALLS_PER_ROUND,
    KINDS,
    Agent,
    Caller,
    Series,
    free_port,
    our_groups,
    pick,
    wait_for_count,
)
from conftest import Compiler


@pytest.fixture
def caller_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("agent_calls.c")


def _one_round(exe: Path, *argv: str) -> tuple[Agent, Caller, dict[str, str], Series]:
    """An agent started with `argv` (served on a free port), and its metrics
    once one round of the caller's calls has returned."""
    port = free_port()
    agent = Agent("--prometheus", f"127.0.0.1:{port}", *argv)
    try:
        agent.ready()
        caller = Caller(exe)
        caller.round()
        who = {"executable": str(exe), "comm": caller.comm}
        got = wait_for_count(agent, port, "uprobes_hits_total", CALLS_PER_ROUND,
                             probe="uprobes/handle__return", **who)
    except BaseException:
        agent.kill()
        raise
    return agent, caller, who, got


def test_quick_start_counts_times_and_labels_then_removes_every_probe(caller_exe: Path) -> None:
    """Hits per probe, executable, comm and fetched `kind` (bounded by
    --max-series, the rest in the overflow metric), a histogram of the
    calls' durations; SIGTERM ends it with status 0 and no probe left."""
    agent, caller, who, got = _one_round(caller_exe, "--label", "kind", "--max-series", "3",
                                         f"{caller_exe}:handle kind=%di:s32",
                                         f"r {caller_exe}:handle")
    try:
        entries = pick(got, "uprobes_hits_total", probe="uprobes/handle", **who)
        per_kind = CALLS_PER_ROUND // KINDS
        # kinds 0, 1, 2 came first and got the 3 series; 3 and 4 overflowed
        assert sorted(dict(lb)["kind"] for lb in entries) == ["0", "1", "2"]
        assert set(entries.values()) == {per_kind}
        line = f"{caller_exe}:handle kind=%di:s32"
        assert pick(got, "uprobes_series_overflow_total", line=line,
                    metric="uprobes_hits") == {
            frozenset({("line", line), ("metric", "uprobes_hits")}): 2 * per_kind}
        assert pick(got, "uprobes_series_overflow_total", line=line,
                    metric="uprobes_call_duration_seconds") != {}
        counts = pick(got, "uprobes_call_duration_seconds_count", probe="uprobes/handle", **who)
        assert sorted(counts.values()) == [per_kind] * 3
        # each call sleeps 2.5 ms: none is in a bucket below 2.097 ms
        below = pick(got, "uprobes_call_duration_seconds_bucket", le="0.002097152", **who)
        assert below and set(below.values()) == {0}
        sums = pick(got, "uprobes_call_duration_seconds_sum", **who)
        assert all(v >= per_kind * 0.0025 for v in sums.values())
        caller.end()
        status, err = agent.stop(signal.SIGTERM)
    finally:
        agent.kill()
    assert status == 0, err
    assert "Traceback" not in err
    assert our_groups(agent.proc.pid) == []


def test_sigint_ends_it_cleanly_too(caller_exe: Path) -> None:
    port = free_port()
    agent = Agent("--prometheus", f"127.0.0.1:{port}", f"{caller_exe}:handle")
    try:
        agent.ready()
        assert our_groups(agent.proc.pid) != []
        status, err = agent.stop(signal.SIGINT)
    finally:
        agent.kill()
    assert status == 0, err
    assert our_groups(agent.proc.pid) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uprobes", "agent", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,status,words", [
    (["--prometheus", "127.0.0.1:9464", "libc:malloc size=%nosuch"], 2, "register"),
    (["--prometheus", "localhost", "libc:malloc"], 2, "HOST:PORT"),
    (["--prometheus", "127.0.0.1:99999", "libc:malloc"], 2, "HOST:PORT"),
    (["--prometheus", "127.0.0.1:9464", "--label", "size", "libc:malloc"], 2, "--label size"),
    (["--prometheus", "127.0.0.1:9464", "--label", "comm", "libc:malloc comm=%di"], 2,
     "sets itself"),
    (["libc:malloc"], 2, "give a sink"),
    (["--prometheus", "127.0.0.1:9464"], 2, "give probe lines"),
    (["--prometheus", "127.0.0.1:9464", "-e", "ptrace", "--counts-only", "libc:malloc"], 2,
     "kernel engine"),
    (["--otlp", "ftp://127.0.0.1:4318", "libc:malloc"], 2, "OTLP endpoint"),
    (["--pyroscope", "127.0.0.1:4040", "libc:malloc"], 2, "Pyroscope URL"),
])
def test_bad_input_is_one_line_and_status_2(args: list[str], status: int, words: str) -> None:
    done = _cli(*args)
    assert done.returncode == status, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("uprobes: error: ") and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_a_runtime_error(tracefs: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = _cli("--prometheus", f"127.0.0.1:{port}", "libc:malloc")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("uprobes: error: cannot serve /metrics at 127.0.0.1:")
    assert len(done.stderr.splitlines()) == 1


def test_a_scrape_is_answered_while_hits_pour_in(tracefs: Path, compile_c: Compiler) -> None:
    """The endpoint answers while the probing thread is flooded: no lock the
    probing thread takes per hit may starve it (it did: a scrape waited for
    as long as the flood lasted). The flood is killed once the scrapes are
    done and may last 300 s: with 20 s, a loaded machine's slow agent start
    and scrapes ate into the margin of "the flood outlasts the scrapes". A
    starved scrape still fails: it would wait past urlopen's 30 s."""
    load = compile_c("agent_load.c")
    port = free_port()
    agent = Agent("--prometheus", f"127.0.0.1:{port}", f"{load}:hit")
    try:
        agent.ready()
        flood = subprocess.Popen([str(load), "0", "300"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout is not None and flood.stdin is not None
            assert flood.stdout.readline().strip() == "ready"
            flood.stdin.write("go\n")
            flood.stdin.flush()
            wait_for_count(agent, port, "uprobes_hits_total", 1000, probe="uprobes/hit")
            took = []
            for _ in range(3):
                started = time.monotonic()
                agent.metrics(port)
                took.append(time.monotonic() - started)
            assert flood.poll() is None, "the flood ended before the scrapes did"
        finally:
            flood.kill()
            flood.communicate(timeout=60)
        status, err = agent.stop()
    finally:
        agent.kill()
    assert status == 0, err
    assert max(took) < 5, took


def test_the_service_unit_never_signals_the_watchers() -> None:
    """The unit's KillMode leaves the agent's watchers (its child processes,
    in the unit's cgroup) alone: they undo what a crashed or killed agent
    leaves, so a SIGKILL as the agent ends ("mixed", "control-group") would
    strike them just when they have work to do."""
    unit = Path(__file__).parent.parent / "docs" / "uprobes-agent.service"
    modes = [line.split("=", 1)[1].strip() for line in unit.read_text().splitlines()
             if line.startswith("KillMode=")]
    assert modes == ["process"], modes


def test_a_dwarf_label_at_O0_times_its_calls(tracefs: Path, compile_c: Compiler) -> None:
    """`handle kind` by its DWARF name at -O0: the entry goes after the
    prologue, where `kind` is stored, and still pairs with its return (the
    return address read at the CFA there): a duration per kind, each call."""
    exe = compile_c("agent_calls.c", "-O0")
    agent, caller, who, got = _one_round(exe, "--label", "kind", f"{exe}:handle kind",
                                         f"r {exe}:handle")
    try:
        counts = pick(got, "uprobes_call_duration_seconds_count", probe="uprobes/handle", **who)
        assert sorted((dict(lb)["kind"], n) for lb, n in counts.items()) == [
            (str(k), CALLS_PER_ROUND // KINDS) for k in range(KINDS)]
        caller.end()
        status, err = agent.stop(signal.SIGTERM)
    finally:
        agent.kill()
    assert status == 0, err
