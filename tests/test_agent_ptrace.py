"""`uprobes agent -e ptrace`: calls timed inside each process that runs the
probed executable, those running when the agent starts and those started
after it (the kernel's process events), each detached when it exits and
all of them when the agent ends; the series never go down."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from agent_support import (
    CALLS_PER_ROUND,
    Agent,
    Caller,
    Series,
    free_port,
    parse_metrics,
    pick,
)
from conftest import Compiler, need, read_fd_until, wait_until

from uprobes.agent.config import AgentConfig, AgentProbe, from_command_line
from uprobes.agent.following import Following
from uprobes.agent.metrics import Metrics
from uprobes.agent.processes import ProcessWatch
from uprobes.engines.ptrace.permissions import tracer_of
from uprobes.errors import KernelError
from uprobes.sys.proc_events import ProcEvents

# The agent finds processes through the kernel's process connector (a
# netlink socket only root may bind) and reads and attaches to processes
# of any user: root's, as it runs (test_not_root.py leaves these out).
pytestmark = pytest.mark.root


@pytest.fixture
def caller_exe(compile_c: Compiler) -> Path:
    return compile_c("agent_calls.c", name="agent-calls-ptrace")


def _agent(exe: Path, port: int) -> Agent:
    return Agent("-e", "ptrace", "--prometheus", f"127.0.0.1:{port}", f"{exe}:handle",
                 f"r {exe}:handle")


def _config(path: Path, exe: Path, port: int, more: str = "") -> str:
    """Write an agent config timing `exe`'s handle (and `more` TOML) to `path`."""
    head = (f'engine = "ptrace"\n[prometheus]\nlisten = "127.0.0.1:{port}"\n'
            f'[[probe]]\nline = "{exe}:handle"\n'
            f'[[probe]]\nline = "r {exe}:handle"\n')
    path.write_text(head + more)
    return head


def _stopped(agent: Agent) -> str:
    """Stop `agent` with SIGTERM: it must exit 0 with no traceback; what it said."""
    status, err = agent.stop(signal.SIGTERM)
    assert status == 0 and "Traceback" not in err, err
    return err


def _fork(caller: Caller, command: str) -> int:
    """Ask `caller` to fork (`daemon`, `spawn`): the child's pid."""
    assert caller.proc.stdin is not None and caller.proc.stdout is not None
    caller.proc.stdin.write(f"{command}\n")
    caller.proc.stdin.flush()
    said = caller.proc.stdout.readline()
    assert said.startswith("child "), said
    return int(said.split()[1])


def _followed(agent: Agent, port: int) -> float:
    return sum(pick(agent.metrics(port), "uprobes_followed_processes").values())


def _calls(got: Series, caller: Caller) -> float:
    return sum(pick(got, "uprobes_call_duration_seconds_count", probe="uprobes/handle",
                    executable=str(caller.exe), comm=caller.comm).values())


def _proc_events() -> bool:
    try:
        with ProcEvents():
            return True
    except KernelError:
        return False


def test_a_running_process_is_timed_and_left_as_it_was(caller_exe: Path) -> None:
    port = free_port()
    caller = Caller(caller_exe)
    agent = _agent(caller_exe, port)
    try:
        agent.ready()  # in place in the processes already running
        assert _followed(agent, port) == 1
        tracer = tracer_of(caller.proc.pid)  # a thread of the agent's
        assert tracer and Path(f"/proc/{agent.proc.pid}/task/{tracer}").exists()
        caller.round()
        caller.round()
        got = agent.metrics(port)
        who = {"executable": str(caller_exe), "comm": caller.comm}
        assert _calls(got, caller) == 2 * CALLS_PER_ROUND  # read from the program: exact
        for probe in ("uprobes/handle", "uprobes/handle__return"):
            assert sum(pick(got, "uprobes_hits_total", probe=probe, **who).values()) == \
                2 * CALLS_PER_ROUND
        # each call sleeps 2.5 ms: none is in a bucket below 2.097 ms
        below = pick(got, "uprobes_call_duration_seconds_bucket", le="0.002097152", **who)
        assert below and set(below.values()) == {0}
        status, err = agent.stop(signal.SIGTERM)
        assert status == 0, err
        assert "Traceback" not in err
        assert tracer_of(caller.proc.pid) == 0
        caller.round()  # untraced, it runs on
        caller.end()
    finally:
        agent.kill()
        caller.proc.kill()


def test_processes_started_after_the_agent_are_followed_until_they_exit(
        caller_exe: Path) -> None:
    need(_proc_events(), "the kernel's process events (netlink process connector) are "
                         "not available here")
    port = free_port()
    agent = _agent(caller_exe, port)
    callers: list[Caller] = []
    try:
        agent.ready()
        assert _followed(agent, port) == 0
        first = Caller(caller_exe)  # started after the agent: its exec is an event
        callers.append(first)
        wait_until(lambda: _followed(agent, port) == 1, "the new process followed")
        first.round()
        first.round()
        assert _calls(agent.metrics(port), first) == 2 * CALLS_PER_ROUND
        first.end()  # it exits: its tracer detaches, its calls stay in the series
        wait_until(lambda: _followed(agent, port) == 0, "the exited process let go")
        assert _calls(agent.metrics(port), first) == 2 * CALLS_PER_ROUND
        second = Caller(caller_exe)  # the same executable and comm: the same series
        callers.append(second)
        wait_until(lambda: _followed(agent, port) == 1, "the next process followed")
        second.round()
        assert _calls(agent.metrics(port), second) == 3 * CALLS_PER_ROUND
        status, err = agent.stop(signal.SIGINT)
        assert status == 0, err
        assert "Traceback" not in err and "note" not in err, err
        assert tracer_of(second.proc.pid) == 0
        second.round()
        second.end()
    finally:
        agent.kill()
        for c in callers:
            c.proc.kill()


def test_without_process_events_new_processes_are_found_in_proc(caller_exe: Path) -> None:
    """In a network namespace of its own the process connector is not to be
    had (it answers the initial one only): the agent says so and looks at
    /proc every 2 s instead, and a process started after it is followed."""
    need(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
    agent = subprocess.Popen(["unshare", "--net", sys.executable, "-m", "uprobes", "agent",
                              "-e", "ptrace", "--duration", "600", f"{caller_exe}:handle",
                              f"r {caller_exe}:handle"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    caller: Caller | None = None
    try:
        assert agent.stderr is not None
        err = read_fd_until(agent.stderr.fileno(), "probe lines in place", 120)
        assert "looked for in /proc every 2 s" in err, err
        caller = Caller(caller_exe)
        wait_until(lambda: tracer_of(caller.proc.pid) != 0, "the new process followed")
        caller.round()
        agent.send_signal(signal.SIGTERM)
        out, rest = agent.communicate(timeout=120)
        assert agent.returncode == 0, err + rest
        page = parse_metrics(out)
        assert _calls(page, caller) == CALLS_PER_ROUND
        assert tracer_of(caller.proc.pid) == 0
        caller.end()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate(timeout=60)
        if caller is not None:
            caller.proc.kill()


def test_a_child_that_outlives_its_parent_is_followed_on(caller_exe: Path) -> None:
    """A daemon's start: the process forks and exits at once. The child,
    followed from its fork by the parent's tracer, gets a tracer of its own
    when that one ends with its parent; its calls go on into the series."""
    port = free_port()
    caller = Caller(caller_exe)
    agent = _agent(caller_exe, port)
    child = 0
    try:
        agent.ready()
        caller.round()
        before = tracer_of(caller.proc.pid)
        assert before
        child = _fork(caller, "daemon")
        assert caller.proc.wait(60) == 0  # the parent exits; the child reads on
        wait_until(lambda: tracer_of(child) not in (0, before) and _followed(agent, port) == 1,
                   "the child followed by a tracer of its own")
        caller.round()  # made by the child
        assert _calls(agent.metrics(port), caller) == 2 * CALLS_PER_ROUND
        status, err = agent.stop(signal.SIGTERM)
        assert status == 0 and "Traceback" not in err, err
        assert tracer_of(child) == 0
        caller.proc.stdin.close()  # the child's input ends: it exits
        wait_until(lambda: not Path(f"/proc/{child}").exists()
                   or "Z" in Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1][:3],
                   "the child's exit")
    finally:
        agent.kill()
        caller.proc.kill()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_process_that_execs_another_program_is_let_go(caller_exe: Path) -> None:
    """Followed for the program it ran: once it execs another, its tracer
    detaches (the calls it made stay in the series)."""
    port = free_port()
    caller = Caller(caller_exe)
    agent = _agent(caller_exe, port)
    try:
        agent.ready()
        caller.round()
        assert caller.proc.stdin is not None and caller.proc.stdout is not None
        caller.proc.stdin.write("exec\n")  # now it is /bin/cat
        caller.proc.stdin.flush()
        wait_until(lambda: tracer_of(caller.proc.pid) == 0 and _followed(agent, port) == 0,
                   "the process let go")
        assert _calls(agent.metrics(port), caller) == CALLS_PER_ROUND
        caller.proc.stdin.write("still here\n")
        caller.proc.stdin.flush()
        assert caller.proc.stdout.readline() == "still here\n"
        caller.proc.stdin.close()
        assert caller.proc.wait(60) == 0
        status, err = agent.stop(signal.SIGTERM)
        assert status == 0 and "Traceback" not in err, err
    finally:
        agent.kill()
        caller.proc.kill()


def test_a_fork_child_that_execs_another_program_is_let_go(caller_exe: Path) -> None:
    """A child followed by its parent's tracer is let go once it execs a
    program with no probe in it; the parent stays followed."""
    child, port = 0, free_port()
    caller = Caller(caller_exe)
    agent = _agent(caller_exe, port)
    try:
        agent.ready()
        child = _fork(caller, "spawn")  # the child runs /bin/sleep
        wait_until(lambda: Path(f"/proc/{child}/exe").resolve() == Path("/bin/sleep").resolve()
                   and tracer_of(child) == 0, "the child let go")
        caller.round()
        assert _calls(agent.metrics(port), caller) == CALLS_PER_ROUND
        assert tracer_of(caller.proc.pid) != 0
        _stopped(agent)
        caller.end()
    finally:
        agent.kill()
        caller.proc.kill()
        if child:
            os.kill(child, signal.SIGKILL)


def test_other_lines_are_counted_in_the_same_process(caller_exe: Path, tmp_path: Path) -> None:
    """A line with no return line of its function is counted in the program
    (trap-free counters, by the same tracer that times handle), a library's
    too when `executable` says which processes."""
    port = free_port()
    config = tmp_path / "agent.toml"
    _config(config, caller_exe, port,
            f'[[probe]]\nline = "libc:nanosleep"\nexecutable = "{caller_exe}"\n')
    caller = Caller(caller_exe)
    agent = Agent("--config", str(config))
    try:
        agent.ready()
        caller.round()
        got = agent.metrics(port)
        who = {"executable": str(caller_exe), "comm": caller.comm}
        assert _calls(got, caller) == CALLS_PER_ROUND
        naps = pick(got, "uprobes_hits_total", probe="uprobes/nanosleep", **who)
        assert sum(naps.values()) == CALLS_PER_ROUND  # one nanosleep per call
        _stopped(agent)
        caller.end()
    finally:
        agent.kill()
        caller.proc.kill()


def test_sighup_keeps_the_tracers_counts(caller_exe: Path, tmp_path: Path) -> None:
    """A reload that adds a line detaches and attaches again, and the series
    of the lines kept keep their counts; an unchanged one leaves all as is.
    What every process's tracer says (how many probes are trap-free) is
    said once."""
    port = free_port()
    config = tmp_path / "agent.toml"
    head = _config(config, caller_exe, port)
    caller, idle = Caller(caller_exe), Caller(caller_exe)
    agent = Agent("--config", str(config))
    try:
        agent.ready()
        caller.round()
        config.write_text(head + f'[[probe]]\nline = "libc:nanosleep"\n'
                                 f'executable = "{caller_exe}"\n')
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_said("3 probe lines in place")
        caller.round()
        who = {"executable": str(caller_exe), "comm": caller.comm}
        got = agent.metrics(port)
        assert _calls(got, caller) == 2 * CALLS_PER_ROUND  # kept across the reload
        assert sum(pick(got, "uprobes_hits_total", probe="uprobes/nanosleep",
                        **who).values()) == CALLS_PER_ROUND  # placed at the reload
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_said("unchanged")
        caller.round()
        assert _calls(agent.metrics(port), caller) == 3 * CALLS_PER_ROUND
        status, err = agent.stop(signal.SIGTERM)
        assert status == 0 and "Traceback" not in err, err
        assert err.count("probes trap-free") == 1, err  # said once, not per process
        assert tracer_of(caller.proc.pid) == 0
        caller.end()
        idle.end()
    finally:
        agent.kill()
        caller.proc.kill()
        idle.proc.kill()


def test_a_reload_with_a_probe_that_cannot_be_resolved_keeps_the_old_probes(
        caller_exe: Path, tmp_path: Path) -> None:
    """The ptrace engine resolves a config's probes as it starts following:
    one that names no function is refused at a reload before the probes
    before it are taken out, so they are followed on without a gap (the
    same tracer) and the agent does not end."""
    port = free_port()
    config = tmp_path / "agent.toml"
    head = _config(config, caller_exe, port)
    caller = Caller(caller_exe)
    agent = Agent("--config", str(config))
    try:
        agent.ready()
        caller.round()
        tracer = tracer_of(caller.proc.pid)
        config.write_text(head + f'[[probe]]\nline = "{caller_exe}:no_such_function"\n')
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_said("reload refused, the probes stay as they were")
        # refused before the probes were taken out: the same tracer, no gap
        assert tracer_of(caller.proc.pid) == tracer != 0
        caller.round()
        assert _calls(agent.metrics(port), caller) == 2 * CALLS_PER_ROUND
        err = _stopped(agent)
        assert "no_such_function" in err and "reloaded" not in err, err
        caller.end()
    finally:
        agent.kill()
        caller.proc.kill()


def test_a_waited_for_file_whose_probe_cannot_be_resolved_is_left_out(
        caller_exe: Path, tmp_path: Path) -> None:
    """A file waited for appears without the function probed: its probe is
    left out with one line, and the others are followed on."""
    port = free_port()
    later = tmp_path / "later"
    config = tmp_path / "agent.toml"
    _config(config, caller_exe, port, f'[[probe]]\nline = "{later}:no_such_function"\n')
    caller = Caller(caller_exe)
    agent = Agent("--config", str(config))
    try:
        agent.ready()
        tracer = tracer_of(caller.proc.pid)
        shutil.copy(caller_exe, later)
        agent.wait_said("not placed, the others run on")
        assert tracer_of(caller.proc.pid) == tracer != 0  # the others never taken out
        caller.round()
        assert _calls(agent.metrics(port), caller) == CALLS_PER_ROUND
        _stopped(agent)
        caller.end()
    finally:
        agent.kill()
        caller.proc.kill()


def test_process_events_the_kernel_drops_are_told(tmp_path: Path) -> None:
    """Its reader held up and its buffer small, the watch loses events (the
    kernel drops them): it says so, for /proc to be looked at."""
    if not _proc_events():
        pytest.skip("no process events here (CAP_NET_ADMIN in the initial namespaces)")
    held, missed = threading.Event(), threading.Event()
    watch = ProcessWatch(lambda pid: held.wait(60), lambda text: None,
                         lambda forever: missed.set(), buffer_bytes=1)
    with watch:
        try:
            for _ in range(200):  # each a fork and an exec: far more than the buffer holds
                subprocess.run(["true"], check=True)
        finally:
            held.set()
        wait_until(missed.is_set, "the events dropped told")


def test_after_events_were_dropped_proc_is_scanned(caller_exe: Path) -> None:
    """A process started while events were being dropped (none told of it)
    is followed once the run hears that some were: /proc is scanned."""
    config = from_command_line([f"{caller_exe}:handle", f"r {caller_exe}:handle"], [], [],
                               None, 1000, "ptrace")
    following = Following(config, Metrics(), lambda text: None, lambda config: None)
    following.begin(events=True)
    caller: Caller | None = None
    try:
        wait_until(lambda: following.placed, "the run ready")  # its scan done
        caller = Caller(caller_exe)
        assert tracer_of(caller.proc.pid) == 0  # nothing told of it
        following.missed(False)
        wait_until(lambda: tracer_of(caller.proc.pid) != 0, "the process followed")
        caller.round()
    finally:
        following.end()
        if caller is not None:
            caller.proc.kill()
    assert tracer_of(caller.proc.pid) == 0


def test_processes_not_followed_are_counted_and_noted_once(caller_exe: Path) -> None:
    """Processes whose tracer fails (here: a function the program does not
    have, looked up in each process) are counted in a metric, and one note
    says why, not one each."""
    missing = AgentProbe(f"{caller_exe}:no_such_function", executable=str(caller_exe))
    config = AgentConfig((missing,), engine="ptrace")
    notes: list[str] = []
    metrics = Metrics()
    following = Following(config, metrics, notes.append, lambda config: None)
    callers = [Caller(caller_exe) for _ in range(3)]
    try:
        following.begin(events=False)
        wait_until(lambda: following.placed, "the run ready")
        wait_until(lambda: metrics.snapshot().dropped.get("not_followed") == len(callers),
                   "each process counted")
    finally:
        following.end()
        for caller in callers:
            caller.proc.kill()
    said = [n for n in notes if "not followed" in n]
    assert len(said) == 1 and "not_followed" in said[0], notes


@pytest.mark.parametrize("lines,words", [
    (["--label", "kind", "EXE:handle kind=%di:s32"], "leave out labels"),
    (["libc:malloc", "r libc:malloc"], "is a library"),
])
def test_what_it_cannot_follow_is_refused_in_one_line(caller_exe: Path, lines: list[str],
                                                      words: str) -> None:
    done = subprocess.run([sys.executable, "-m", "uprobes", "agent", "-e", "ptrace",
                           "--prometheus", "127.0.0.1:9464",
                           *(line.replace("EXE", str(caller_exe)) for line in lines)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("uprobes: error: ") and words in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1


def _watchers(pid: int) -> list[int]:
    """The orphan reapers among the children of process `pid`."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"orphan_reaper" in cmdline:
                found.append(int(child))
    return found


def test_one_watcher_serves_every_process_and_a_kill_9_harms_none(caller_exe: Path) -> None:
    """Every followed process's tracer records what it placed with one orphan
    watcher (a Python process each, before); the agent killed outright, the
    watcher undoes what would trap and the programs run on."""
    port = free_port()
    callers = [Caller(caller_exe), Caller(caller_exe)]
    agent = _agent(caller_exe, port)
    try:
        agent.ready()
        assert _followed(agent, port) == 2
        for c in callers:
            c.round()
        assert len(_watchers(agent.proc.pid)) == 1
        agent.proc.kill()  # SIGKILL: no clean detach
        agent.proc.wait(60)
        for c in callers:
            wait_until(lambda c=c: tracer_of(c.proc.pid) == 0, "the kernel's detach")
            c.round()  # no SIGTRAP: what was placed is harmless or undone
            c.end()
    finally:
        agent.kill()
        for c in callers:
            c.proc.kill()
