"""Attaching to processes in awkward states: stopped by a signal, filtered by
seccomp, zombies, or ending while the probes are placed. uprobes ends (each
run bounded here), says what it found in one line, and the program finishes
as it would have untraced."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Compiler

UPROBES = [sys.executable, "-m", "uprobes"]
LOOPS = 2000
# the bound of every uprobes run here: a hang fails the test, it never waits forever
RUN_S = int(os.environ.get("ATTACH_EDGES_RUN_S", "60"))


@pytest.fixture(scope="module")
def threads_exe(compile_c: Compiler) -> Path:
    return compile_c("threads.c", "-pthread")


def _state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("" once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text[text.rindex(")") + 2]


def _wait_state(pid: int, states: str) -> None:
    deadline = time.monotonic() + 120
    while _state(pid) not in states and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(pid) in states, (pid, _state(pid))


def _stopped(exe: Path) -> subprocess.Popen[str]:
    """threads.c waiting for its go line, then stopped with SIGSTOP."""
    proc = subprocess.Popen([str(exe), str(LOOPS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TARGET_WAIT": "1"})
    assert proc.stdout is not None
    assert proc.stdout.readline().split()[0] == "ready"
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_state(proc.pid, "T")
    return proc


def _continue_and_finish(proc: subprocess.Popen[str]) -> None:
    """SIGCONT, the go line: the program runs to its end, unharmed."""
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate("go\n", timeout=RUN_S)
    assert proc.returncode == 0, proc.returncode
    assert out == f"calls work={4 * LOOPS}\n"


def _one_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("uprobes: error:")]
    assert len(errors) <= 1, stderr


@pytest.mark.parametrize("how", [["count"], ["count", "--no-trapfree"], ["trace"],
                                 ["trace", "--no-trapfree"]])
def test_a_stopped_process_is_attached_and_left_stopped(how: list[str], threads_exe: Path,
                                                         tracefs: Path) -> None:
    proc = _stopped(threads_exe)
    try:
        done = subprocess.run([*UPROBES, how[0], "-e", "ptrace", *how[1:], "-p", str(proc.pid),
                               f"{threads_exe}:work", "--duration", "0.5"],
                              capture_output=True, text=True, timeout=RUN_S)
        _one_line(done.stderr)
        assert done.returncode == 0, done.stderr
        assert f"process {proc.pid} is stopped" in done.stderr, done.stderr
        if how[0] == "count":
            assert "(1 of 1 probes not hit)" in done.stdout, done.stdout  # it did not run
        else:
            assert done.stdout == "", done.stdout
        assert _state(proc.pid) == "T"  # still stopped, and no longer traced
        assert "TracerPid:\t0\n" in Path(f"/proc/{proc.pid}/status").read_text()
        _continue_and_finish(proc)
    finally:
        proc.kill()
        proc.wait()


def _attached_to_stopped(threads_exe: Path, *extra: str) -> tuple[subprocess.Popen[str],
                                                                  subprocess.Popen[str]]:
    """uprobes counting in a stopped threads.c, once it said it counts."""
    proc = _stopped(threads_exe)
    run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", *extra, "-p", str(proc.pid),
                            f"{threads_exe}:work"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run, "Ctrl-C to stop")
    except BaseException:
        proc.kill()
        raise
    return proc, run


def _wait_for(run: subprocess.Popen[str], text: str) -> str:
    """Until `run` wrote `text` on its stderr (bounded: a hang fails): what it wrote."""
    assert run.stderr is not None
    seen = b""
    deadline = time.monotonic() + RUN_S
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([run.stderr], [], [], left)[0]:
            run.kill()
            pytest.fail(f"uprobes never wrote {text!r}: {seen.decode()}")
        chunk = os.read(run.stderr.fileno(), 4096)
        if not chunk:
            pytest.fail(f"uprobes ended before {text!r}: {seen.decode()}")
        seen += chunk
    return seen.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_a_run_on_a_stopped_process(sig: int, threads_exe: Path,
                                                       tracefs: Path) -> None:
    proc, run = _attached_to_stopped(threads_exe)
    try:
        run.send_signal(sig)
        out, err = run.communicate(timeout=RUN_S)
        _one_line(err)
        assert run.returncode == 0, err
        assert "(1 of 1 probes not hit)" in out, out
        _continue_and_finish(proc)
    finally:
        run.kill()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("trapfree", [[], ["--no-trapfree"]])
def test_sigkill_of_uprobes_leaves_a_stopped_process_able_to_go_on(
        trapfree: list[str], threads_exe: Path, tracefs: Path) -> None:
    proc, run = _attached_to_stopped(threads_exe, *trapfree)
    try:
        run.kill()
        run.communicate(timeout=RUN_S)
        _continue_and_finish(proc)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def seccomp_exe(compile_c: Compiler) -> Path:
    return compile_c("seccomp_kill.c", "-pthread")


def _filtered(exe: Path, syscall: str, action: str) -> subprocess.Popen[str]:
    """seccomp_kill.c with its filter in place, waiting for its go line."""
    proc = subprocess.Popen([str(exe), syscall, action, str(LOOPS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.stderr else "")
    return proc


def _finish(proc: subprocess.Popen[str]) -> None:
    """The go line: the program makes its calls and ends normally."""
    out, err = proc.communicate("go\n", timeout=RUN_S)
    assert proc.returncode == 0, (proc.returncode, err)
    assert out == f"calls work={LOOPS}\n"


@pytest.mark.parametrize("action", ["kill", "kill_process"])
def test_a_seccomp_filter_that_kills_memfd_create_keeps_the_int3s(
        action: str, seccomp_exe: Path, tracefs: Path) -> None:
    """Trap-free counters need an injected memfd_create: refused before it
    runs, the probe falls back to an int3 and counts every call."""
    proc = _filtered(seccomp_exe, "memfd_create", action)
    try:
        run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "-p", str(proc.pid),
                                f"{seccomp_exe}:work"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert run.stderr is not None
        first = _wait_for(run, "Ctrl-C to stop")
        _finish(proc)
        out, err = run.communicate(timeout=RUN_S)  # it ends with the program
        err = first + err
        _one_line(err)
        assert run.returncode == 0, err
        assert "seccomp filter would kill" in err and "memfd_create" in err, err
        assert out.split() == ["PROBE", "COUNT", "uprobes/work", str(LOOPS)], out
    finally:
        proc.kill()
        proc.wait()


def test_a_seccomp_filter_that_kills_process_vm_readv_keeps_stacks_trap_free(
        seccomp_exe: Path, tracefs: Path) -> None:
    """A trap-free stack copy makes no system call (trapfree/stackbounds.py):
    with a filter that kills process_vm_readv the probe is trap-free all
    the same, and the program ends as untraced with every call's stack
    counted. (It used to be copied by a process_vm_readv the program's own
    code made at each hit, and such a probe took an int3.)"""
    proc = _filtered(seccomp_exe, "process_vm_readv", "kill_process")
    try:
        run = subprocess.Popen([*UPROBES, "stacks", "--folded", "-e", "ptrace", "-p",
                                str(proc.pid), f"{seccomp_exe}:work"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert run.stderr is not None
        first = _wait_for(run, "1 of 1 probes trap-free")  # placed
        _finish(proc)
        out, err = run.communicate(timeout=RUN_S)  # it ends with the program
        assert run.returncode == 0, first + err
        counts = [int(line.rpartition(" ")[2]) for line in out.splitlines() if ";work " in line]
        assert sum(counts) == LOOPS, out
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("how", [["count", "--comm"], ["count", "--by", "comm", "--comm"],
                                 ["count", "--by", "comm"], ["latency", "--by", "comm"]])
def test_a_seccomp_filter_that_kills_prctl_keeps_comm_out_of_the_program(
        how: list[str], seccomp_exe: Path, tracefs: Path) -> None:
    """`--comm` in the counting code, and `--by comm`, ask for the thread's
    name (prctl) at each hit: with a filter that kills the process for
    prctl, the name is not asked for there (the probe records, or is left
    out, and says why) and the program lives."""
    if how[-1] == "--comm":
        how = [*how, seccomp_exe.name[:15]]
    proc = _filtered(seccomp_exe, "prctl", "kill_process")
    try:
        run = subprocess.Popen([*UPROBES, how[0], "-e", "ptrace", *how[1:], "-p", str(proc.pid),
                                f"{seccomp_exe}:work"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert run.stderr is not None
        first = _wait_for(run, "Ctrl-C to stop")
        _finish(proc)
        out, err = run.communicate(timeout=RUN_S)
        err = first + err
        _one_line(err)
        assert run.returncode == 0, err
        assert "seccomp filter would kill the process on prctl()" in err + out, err
        if "--by" in how:
            assert "the thread's name cannot be asked for in the program (thread" in err + out, \
                (out, err)
        else:
            assert out.split() == ["PROBE", "COUNT", "uprobes/work", str(LOOPS)], out
    finally:
        proc.kill()
        proc.wait()


def _count_attached(exe: Path, proc: subprocess.Popen[str], *argv: str) -> tuple[str, str]:
    """`count -e ptrace ARGV -p` the waiting `proc`: its output and notes."""
    run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", *argv, "-p", str(proc.pid),
                            f"{exe}:work"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    first = _wait_for(run, "Ctrl-C to stop")
    _finish(proc)
    out, err = run.communicate(timeout=RUN_S)
    _one_line(first + err)
    assert run.returncode == 0, first + err
    return out, first + err


@pytest.mark.parametrize("cond", ['comm != "nobody"', 'comm == "nobody"'])
def test_a_name_that_cannot_be_read_decides_nothing(cond: str, seccomp_exe: Path,
                                                    tracefs: Path) -> None:
    """A filter that fails prctl with an error: a compiled name test cannot
    tell the thread's name, so the hit counts neither as `==` nor as `!=`
    (`!=` held for every hit before); one line says how many."""
    proc = _filtered(seccomp_exe, "prctl", "errno")
    try:
        out, err = _count_attached(seccomp_exe, proc, "--if", cond)
        assert "uprobes/work" not in out, out
        assert f"{LOOPS} hits whose thread name could not be read" in err, err
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("command", ["count", "latency"])
def test_a_name_that_cannot_be_read_is_keyed_as_unknown(command: str, seccomp_exe: Path,
                                                        tracefs: Path) -> None:
    """`--by comm` with a filter that fails prctl with an error: every hit
    is keyed under `[unknown]`, not under the empty name (which a thread
    may have: prctl(PR_SET_NAME, ""))."""
    proc = _filtered(seccomp_exe, "prctl", "errno")
    try:
        run = subprocess.Popen([*UPROBES, command, "-e", "ptrace", "--by", "comm", "-p",
                                str(proc.pid), f"{seccomp_exe}:work"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        first = _wait_for(run, "Ctrl-C to stop")
        _finish(proc)
        out, err = run.communicate(timeout=RUN_S)
        _one_line(first + err)
        assert run.returncode == 0, first + err
        rows = [line.split() for line in out.splitlines()]
        if command == "count":
            assert ["[unknown]", str(LOOPS)] in rows, out
        else:
            assert out.splitlines()[0] == "uprobes/work comm=[unknown]", out
            assert f"count {LOOPS} " in out, out
    finally:
        proc.kill()
        proc.wait()


def test_the_name_is_read_once_per_hit(seccomp_exe: Path, tracefs: Path) -> None:
    """Four `--comm` terms, none the thread's: a hit asks for the name at
    most once (a prctl system call each, counted by the kernel's
    tracepoint), not once per term; with the verdict kept under the
    kernel's rename word (filters.md), once in all unless a rename or a new
    task anywhere on the machine moves the word meanwhile."""
    from uprobes.sys import perf
    event = tracefs / "events/syscalls/sys_enter_prctl/id"
    if not event.exists():
        pytest.skip("no syscall tracepoints in this kernel")
    proc = _filtered(seccomp_exe, "rt_sigaction", "errno")  # a filter that lets prctl by
    try:
        with perf.open_counting(int(event.read_text()), pid=proc.pid) as calls:
            calls.enable()
            out, err = _count_attached(seccomp_exe, proc, "--comm", "a", "--comm", "b",
                                       "--comm", "c", "--comm", "d")
            assert "1 of 1 probes trap-free (a jump to an in-process counter" in err, err
            assert 1 <= calls.read_count() <= LOOPS
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("mode", ["thread", "args", "late"])
def test_stack_copies_make_no_system_call_a_seccomp_filter_could_kill(
        mode: str, compile_c: Compiler, tracefs: Path) -> None:
    """stack_seccomp.c: `thread`, a filter in the second thread only (the
    placing thread has none); `args`, one that lets process_vm_readv through
    only with the right pid; `late`, each thread installs, halfway through
    its calls, a filter that kills the process on process_vm_readv or
    getpid, which the probes' placement could not see. A trap-free stack
    copy makes no system call (trapfree/stackbounds.py): the probes are
    trap-free, the program ends as untraced, and every call's stack is
    counted. Before: `late` was killed by SIGSYS at the first hit after its
    filter (the copy was getpid and process_vm_readv at each hit); `thread`
    and `args` kept the int3 path, judged at placement."""
    exe = compile_c("stack_seccomp.c", "-O2", "-pthread")
    calls = 50
    if mode == "late":  # launched too: its second thread is born after placement
        run = subprocess.run([*UPROBES, "stacks", "--folded", "-e", "ptrace", f"{exe}:target",
                              "--", str(exe), mode, str(calls)], input="go\n",
                             capture_output=True, text=True, timeout=RUN_S)
        assert run.returncode == 0, run.stderr
        assert f"calls target={2 * calls}\n" in run.stdout, run.stderr
        assert f";start_thread;worker;calls;outer;target {calls}\n" in run.stdout, run.stdout
    proc = subprocess.Popen([str(exe), mode, str(calls)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        run2 = subprocess.Popen([*UPROBES, "stacks", "--folded", "-e", "ptrace", "-p",
                                 str(proc.pid), f"{exe}:target"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = _wait_for(run2, "1 of 1 probes trap-free")  # placed
        out, err = proc.communicate("go\n", timeout=RUN_S)
        assert (proc.returncode, out) == (0, f"calls target={2 * calls}\n"), err
        out, err = run2.communicate(timeout=RUN_S)  # it ends with the program
        assert run2.returncode == 0, first + err
        counts = [int(line.rpartition(" ")[2]) for line in out.splitlines()
                  if line.endswith(f";outer;target {line.rpartition(' ')[2]}")]
        assert sum(counts) == 2 * calls, out
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("how", [[], ["--no-trapfree"]])
def test_a_seccomp_filter_that_kills_mmap_is_refused_in_one_line(
        how: list[str], seccomp_exe: Path, tracefs: Path) -> None:
    """No XOL area can be mapped: the ptrace engine says so and leaves."""
    proc = _filtered(seccomp_exe, "mmap", "kill")
    try:
        done = subprocess.run([*UPROBES, "count", "-e", "ptrace", *how, "-p", str(proc.pid),
                               f"{seccomp_exe}:work"], capture_output=True, text=True,
                              timeout=RUN_S)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(f"uprobes: error: process {proc.pid}: its seccomp "
                                      "filter would kill the thread on an injected mmap()"), \
            done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "TracerPid:\t0\n" in Path(f"/proc/{proc.pid}/status").read_text()
        _finish(proc)
    finally:
        proc.kill()
        proc.wait()


def test_a_zombie_is_named_one(threads_exe: Path, tracefs: Path) -> None:
    zombie = subprocess.Popen(["/bin/true"])
    try:
        _wait_state(zombie.pid, "Z")  # exited, not collected: we never wait() on it here
        for engine in ("ptrace", "kernel"):
            done = subprocess.run([*UPROBES, "count", "-e", engine, "-p", str(zombie.pid),
                                   "libc:malloc"], capture_output=True, text=True,
                                  timeout=RUN_S)
            assert done.returncode == 2, done.stderr
            assert done.stderr == (f"uprobes: error: process {zombie.pid} has exited (a zombie: "
                                   "its parent has not collected it yet); there is nothing "
                                   "left to probe\n")
    finally:
        zombie.wait()


def _kill_when_traced(pid: int, delay: float) -> threading.Thread:
    """A thread that SIGKILLs `pid` `delay` s after a tracer attached to it."""
    def watch() -> None:
        deadline = time.monotonic() + RUN_S
        status = Path(f"/proc/{pid}/status")
        while time.monotonic() < deadline:
            try:
                if "TracerPid:\t0\n" not in status.read_text():
                    break
            except OSError:
                return
            time.sleep(0.0005)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.mark.parametrize("how", [[], ["--no-trapfree"]])
@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01, 0.03, 0.1])
def test_a_process_killed_while_its_probes_are_placed(delay: float, how: list[str],
                                                      threads_exe: Path, tracefs: Path) -> None:
    """Killed at some point of the attach (threads seized, stopped, probes
    placed, resumed): its end is reported as such, never as our error."""
    proc = subprocess.Popen([str(threads_exe), str(LOOPS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TARGET_WAIT": "1"})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[0] == "ready"
        watcher = _kill_when_traced(proc.pid, delay)
        done = subprocess.run([*UPROBES, "count", "-e", "ptrace", *how, "-p", str(proc.pid),
                               f"{threads_exe}:work", "libc:str*"],
                              capture_output=True, text=True, timeout=RUN_S)
        watcher.join(RUN_S)
        _one_line(done.stderr)
        assert done.returncode == 0, done.stderr
        assert f"process {proc.pid} exited" in done.stderr, done.stderr
        assert "uprobes: error" not in done.stderr, done.stderr
    finally:
        proc.kill()
        proc.wait()


_KILLED_IN_DETACH = """
import os, signal, sys
from uprobes.commands.resolve import parse_specs
from uprobes.engines.launch import launch
from uprobes.engines.ptrace.tracer import PtraceTracer
from uprobes.resolve.resolver import Resolver

exe = sys.argv[1]
probes = Resolver().resolve_all(parse_specs([exe + ":work"]))
cmd = launch([exe, "1000000000"])
with PtraceTracer(probes, child=cmd.pid, trapfree=True) as tracer:
    cmd.release()
    tracer.run(None, 0.3)
    tracer._quiesce()  # every thread in a stop of ours, as the detach begins
    os.kill(cmd.pid, signal.SIGKILL)  # the program ends meanwhile: its threads die stopped
print(cmd.wait())
"""


def test_threads_killed_during_the_detach_do_not_hold_the_commands_exit(
        threads_exe: Path, tracefs: Path) -> None:
    """A traced thread that dies is collected by its tracer's wait(__WALL)
    alone, and its leader's exit waits for it: the detach collects them, so
    the launcher's wait for the command returns."""
    done = subprocess.run([sys.executable, "-c", _KILLED_IN_DETACH, str(threads_exe)],
                          capture_output=True, text=True, timeout=RUN_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "137\n", (done.stdout, done.stderr)


def _kill_mid_placement(run_pid: int) -> threading.Thread:
    """A thread that SIGKILLs run `run_pid`'s command as soon as the first
    trap-free counters are mapped in it (the jumps are being placed)."""
    def watch() -> None:
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            try:
                for kid in Path(f"/proc/{run_pid}/task/{run_pid}/children").read_text().split():
                    if "uprobes-counters" in Path(f"/proc/{kid}/maps").read_text():
                        os.kill(int(kid), signal.SIGKILL)
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.0005)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.mark.parametrize("attempt", range(3))
def test_a_command_killed_while_its_probes_are_placed(attempt: int, threads_exe: Path,
                                                      tracefs: Path) -> None:
    """Its exit status passes through (137), as any end of the command."""
    run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", f"{threads_exe}:work",
                            "libc:str*", "--", str(threads_exe), str(LOOPS)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = _kill_mid_placement(run.pid)
    try:
        _, err = run.communicate(timeout=RUN_S)
    finally:
        run.kill()
    watcher.join(RUN_S)
    _one_line(err)
    assert "uprobes: error" not in err, err
    assert run.returncode == 137, err


def test_a_stopped_process_continued_while_attached_counts_every_call(
        threads_exe: Path, tracefs: Path) -> None:
    proc, run = _attached_to_stopped(threads_exe)
    try:
        _continue_and_finish(proc)
        out, err = run.communicate(timeout=RUN_S)  # it ends with the program
        _one_line(err)
        assert run.returncode == 0, err
        assert out.split() == ["PROBE", "COUNT", "uprobes/work", str(4 * LOOPS)], out
    finally:
        run.kill()
        proc.kill()
        proc.wait()


def test_seccomp_filters_are_read_and_run_on_the_very_call(seccomp_exe: Path,
                                                          tracefs: Path) -> None:
    """A filter that kills mmap only with PROT_EXEC (a W^X policy), read
    from the stopped thread and run on each call's own arguments."""
    from uprobes.sys import ptrace, seccomp
    proc = _filtered(seccomp_exe, "mmap_exec", "kill")
    try:
        ptrace.seize(proc.pid, 0)
        ptrace.interrupt(proc.pid)
        ptrace.wait_task(proc.pid)
        progs = seccomp.filters(proc.pid)
        assert isinstance(progs, list) and len(progs) == 1 and len(progs[0]) == 6, progs
        rwx = 0x1 | 0x4  # PROT_READ | PROT_EXEC
        why = seccomp.refusal(proc.pid, 9, (0, 4096, rwx, 0x22, -1, 0), 0x1000)
        assert why == "its seccomp filter would kill the thread on an injected mmap()"
        assert seccomp.refusal(proc.pid, 9, (0, 4096, 0x3, 0x22, -1, 0), 0x1000) is None
        assert seccomp.refusal(proc.pid, 319, (0, 1), 0x1000) is None  # memfd_create passes
        # a call whose third argument is not known: its answer is not known
        assert seccomp.action_anywhere(progs, 9, (0, 4096)) is None
        assert seccomp.action_anywhere(progs, 9, (0, 4096, 0x3)) == seccomp.RET_ALLOW
        assert seccomp.action_anywhere(progs, 157, (16,)) == seccomp.RET_ALLOW  # only nr read
        ptrace.detach(proc.pid)
        _finish(proc)
    finally:
        proc.kill()
        proc.wait()
