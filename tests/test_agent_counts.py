"""`uprobes agent --counts-only`: the kernel counts each probe's hits and the
agent reads the counters at each scrape, so its CPU does not follow the hit
rate; a count per probe (executable: the probed file), every probe removed
at the end; what it cannot keep is refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from agent_support import Agent, Caller, free_port, our_groups, pick, wait_for_count
from conftest import Compiler


@pytest.fixture
def caller_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("agent_calls.c")


def test_counts_only_counts_every_call_and_removes_every_probe(caller_exe: Path,
                                                               tmp_path: Path) -> None:
    """Three rounds of the fixture's calls: /metrics holds exactly its calls
    under the probe, its file, and no comm; a SIGHUP reload of the same probes
    keeps the count; SIGTERM leaves no probe."""
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f'counts_only = true\n[prometheus]\nlisten = "127.0.0.1:{port}"\n'
                      f'[[probe]]\nline = "{caller_exe}:handle"\n')
    agent = Agent("--config", str(config))
    try:
        agent.ready()
        caller = Caller(caller_exe)
        for _ in range(3):
            caller.round()
        series = wait_for_count(agent, port, "uprobes_hits_total", caller.calls,
                                probe="uprobes/handle")
        got = pick(series, "uprobes_hits_total", probe="uprobes/handle")
        assert list(got.values()) == [caller.calls]
        (labels,) = got
        assert dict(labels) == {"probe": "uprobes/handle", "executable": str(caller_exe),
                                "comm": ""}
        agent.proc.send_signal(1)  # SIGHUP: the same probes, reloaded
        agent.wait_said("unchanged, left in place")
        caller.round()
        caller.end()
        wait_for_count(agent, port, "uprobes_hits_total", caller.calls, probe="uprobes/handle")
        status, err = agent.stop()
        assert status == 0, err
        assert not our_groups(agent.proc.pid)
    finally:
        agent.kill()


@pytest.mark.parametrize(("args", "said"), [
    (["--label", "kind", "X:handle kind=%di"], "not extra labels"),
    (["--comm", "x", "X:handle"], "not a comm filter"),
    (["--otlp", "http://127.0.0.1:9", "X:handle"], "leave OTLP and Pyroscope out"),
])
def test_what_counts_only_cannot_keep_is_one_line(caller_exe: Path, args: list[str],
                                                  said: str) -> None:
    argv = [a.replace("X:", f"{caller_exe}:") for a in args]
    run = subprocess.run([sys.executable, "-m", "uprobes", "agent", "--counts-only",
                          "--prometheus", f"127.0.0.1:{free_port()}", *argv],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("uprobes: error: "), run.stderr
    assert said in run.stderr and run.stderr.count("\n") == 1, run.stderr
