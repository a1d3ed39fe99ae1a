"""`uprobes agent --config FILE`: the TOML config, SIGHUP reloads that keep
the counts of unchanged probes, bad configs named by file, line and key,
files waited for, and examples/agent.toml as users run it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from agent_support import CALLS_PER_ROUND as ROUND
from agent_support import KINDS as KINDS_SEEN
from agent_support import Agent, Caller, free_port, our_groups, pick, wait_for_count
from conftest import Compiler

ROOT = Path(__file__).parent.parent


@pytest.fixture
def caller_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("agent_calls.c")


def _write(path: Path, port: int, *probes: str) -> Path:
    path.write_text(f'[prometheus]\nlisten = "127.0.0.1:{port}"\n\n' + "\n".join(probes))
    return path


def _probe(line: str, **keys: object) -> str:
    text = f"[[probe]]\nline = {line!r}\n"
    for k, v in keys.items():
        text += f"{k} = {v!r}\n".replace("'", '"')
    return text


def test_sighup_reload_adds_and_removes_probes_and_keeps_unchanged_counts(
        caller_exe: Path, tmp_path: Path) -> None:
    port = free_port()
    entry = f"{caller_exe}:handle kind=%di:s32"
    conf = _write(tmp_path / "agent.toml", port, _probe(entry, labels=["kind"]))
    agent = Agent("--config", str(conf))
    try:
        agent.ready()
        caller = Caller(caller_exe)
        who = {"executable": str(caller_exe), "comm": caller.comm}
        caller.round()
        wait_for_count(agent, port, "uprobes_hits_total", ROUND,
                       probe="uprobes/handle", **who)

        # The return line added: the entry line is unchanged and keeps counting.
        _write(conf, port, _probe(entry, labels=["kind"]), _probe(f"r {caller_exe}:handle"))
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_said("reloaded")
        agent.ready()
        caller.round()
        got = wait_for_count(agent, port, "uprobes_hits_total", ROUND,
                             probe="uprobes/handle__return", **who)
        got = wait_for_count(agent, port, "uprobes_hits_total", 2 * ROUND,
                             probe="uprobes/handle", **who)
        entries = pick(got, "uprobes_hits_total", probe="uprobes/handle", **who)
        assert set(entries.values()) == {2 * ROUND // KINDS_SEEN}
        got = wait_for_count(agent, port, "uprobes_call_duration_seconds_count",
                             ROUND, probe="uprobes/handle", **who)

        # The same file again: nothing to replace, the probes stay in place.
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_said("the probes are unchanged, left in place")

        # A bad file is refused: one line naming file, line and key; the probes stay.
        conf.write_text(conf.read_text().replace("labels", "lables", 1))
        agent.proc.send_signal(signal.SIGHUP)
        said = agent.wait_said("reload refused")
        assert f"{conf}:6: probe[0].lables: unknown key" in said, said
        caller.round()
        wait_for_count(agent, port, "uprobes_hits_total", 3 * ROUND,
                       probe="uprobes/handle", **who)

        # The entry line removed: its series go, the return line's stay.
        _write(conf, port, _probe(f"r {caller_exe}:handle"))
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_said("reloaded")
        agent.ready()
        caller.round()
        got = wait_for_count(agent, port, "uprobes_hits_total", 3 * ROUND,
                             probe="uprobes/handle__return", **who)
        assert pick(got, "uprobes_hits_total", probe="uprobes/handle") == {}
        caller.end()
        status, err = agent.stop()
    finally:
        agent.kill()
    assert status == 0, err
    assert "Traceback" not in err
    assert our_groups(agent.proc.pid) == []


def test_a_file_that_does_not_exist_yet_is_waited_for(caller_exe: Path, tmp_path: Path) -> None:
    port = free_port()
    later = tmp_path / "bin" / "server"
    conf = _write(tmp_path / "agent.toml", port, _probe(f"{later}:handle"))
    agent = Agent("--config", str(conf))
    try:
        agent.wait_said(f"waiting for {later} to exist")
        assert agent.metrics(port)  # serving meanwhile
        later.parent.mkdir()
        shutil.copy(caller_exe, later)
        agent.ready()
        caller = Caller(later)
        caller.round()
        wait_for_count(agent, port, "uprobes_hits_total", ROUND,
                       probe="uprobes/handle", executable=str(later))
        caller.end()
        status, err = agent.stop()
    finally:
        agent.kill()
    assert status == 0, err


def test_the_example_config_runs(tracefs: Path, tmp_path: Path) -> None:
    """examples/agent.toml as documented (the listen address moved to a free
    port): Python's opens counted with their executable, a name lookup
    counted by name and timed; the program that is not installed is waited
    for."""
    port = free_port()
    agent = Agent("--config", str(ROOT / "examples" / "agent.toml"),
                  "--prometheus", f"127.0.0.1:{port}")
    try:
        agent.wait_said("waiting for /opt/example/bin/server to exist")
        agent.ready()
        subprocess.run(["/usr/bin/python3.11", "-c", "import socket; "
                        "open('/etc/hostname').close(); socket.getaddrinfo('localhost', 80)"],
                       check=True, timeout=60)
        who = {"executable": "/usr/bin/python3.11", "comm": "python3.11"}
        wait_for_count(agent, port, "uprobes_hits_total", 1, probe="uprobes/open64", **who)
        wait_for_count(agent, port, "uprobes_call_duration_seconds_count", 1,
                       probe="uprobes/getaddrinfo", node="localhost", **who)
        status, err = agent.stop()
    finally:
        agent.kill()
    assert status == 0, err
    assert "Traceback" not in err


def _start(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uprobes", "agent", "--config", str(conf)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text,where", [
    ('[prometheus]\nlisten = "127.0.0.1:9464"\n\n[[probe]]\nline = "libc:malloc"\ncolor = 1\n',
     ":6: probe[0].color: unknown key"),
    ('[prometheus]\nlisten = "nowhere"\n[[probe]]\nline = "libc:malloc"\n',
     ":2: prometheus.listen: "),
    ('[prometheus]\nlisten = "127.0.0.1:9464"\n[[probe]]\nline = "libc:malloc"\n'
     '[[probe]]\nline = "libc:malloc x=%nosuch"\n', ":6: probe[1].line: "),
    ('[prometheus]\nlisten = "127.0.0.1:9464"\n[[probe]]\nline = "libc:malloc"\n'
     'labels = ["size"]\n', ":5: probe[0].labels: "),
    ('[prometheus]\nlisten = "127.0.0.1:9464"\n[[probe]]\nline = "libc:malloc\n',
     ":4: not TOML"),
    ('engine = "warp"\n[[probe]]\nline = "libc:malloc"\n', ":1: engine: "),
    ('[prometheus]\nmax_series = 0\n[[probe]]\nline = "libc:malloc"\n',
     ":2: prometheus.max_series: "),
    ('[prometheus]\nlisten = "127.0.0.1:9464"\n', ": probe: give at least one"),
    ('[otlp]\nendpoint = "localhost:4318"\n[[probe]]\nline = "libc:malloc"\n',
     ":2: otlp.endpoint: OTLP endpoint"),
    ('[pyroscope]\nurl = "http://127.0.0.1:4040"\ninterval = -1\n[[probe]]\n'
     'line = "libc:malloc"\nstacks = true\n', ":3: pyroscope.interval: "),
    ('[pyroscope]\nurl = "http://127.0.0.1:4040"\n[[probe]]\nline = "libc:malloc"\n'
     'stacks = "yes"\n', ":5: probe[0].stacks: "),
])
def test_a_bad_config_names_file_line_and_key_and_does_not_start(
        text: str, where: str, tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(text)
    done = _start(conf)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"uprobes: error: {conf}{where}"), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_missing_config_file(tmp_path: Path) -> None:
    done = _start(tmp_path / "nope.toml")
    assert done.returncode == 2
    assert done.stderr == f"uprobes: error: {tmp_path}/nope.toml: cannot read it: " \
                          "No such file or directory\n"
