"""The ptrace engine end to end: real fixtures, real processes, exact counts.

Every test compares with the program run untraced (output, exit status) or
with the count the program prints, and, where tracefs exists, with the
kernel engine's own lines.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, need, without_clocks

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.engines.launch import launch
from uprobes.engines.ptrace.tracer import PtraceTracer
from uprobes.model.event import Event
from uprobes.resolve.resolver import Resolver

UPROBES = [sys.executable, "-m", "uprobes"]


@pytest.fixture(scope="module")
def threads_exe(compile_c: Compiler) -> Path:
    return compile_c("threads.c", "-pthread")


def trace_json(argv: list[str]) -> tuple[int, list[dict[str, Any]]]:
    out = io.StringIO()
    status = main(["trace", "-e", "ptrace", "--json", *argv], out=out)
    return status, [json.loads(line) for line in out.getvalue().splitlines()]


def count_json(argv: list[str]) -> tuple[int, dict[str, int]]:
    out = io.StringIO()
    status = main(["count", "-e", "ptrace", "--json", *argv], out=out)
    return status, json.loads(out.getvalue().splitlines()[-1])


def traced_by(pid: int) -> int:
    """TracerPid of `pid` (0 when untraced or gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return int(re.search(r"TracerPid:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def calls(stdout: str, name: str) -> int:
    m = re.search(rf"calls .*{name}=(\d+)", stdout)
    assert m, stdout
    return int(m.group(1))


@pytest.mark.parametrize("how", [[], ["--uretprobe"]], ids=["ret-sites", "trampoline"])
def test_entry_and_return_probes_count_exactly(target: Path, how: list[str]) -> None:
    status, docs = trace_json([*how, f"{target}:add", f"{target}:fib", f"r {target}:fib",
                               f"r {target}:point_sum", "--", str(target), "7"])
    assert status == 0
    per_probe = Counter(d["probe"] for d in docs[:-1])
    assert per_probe == {"uprobes/add": 7, "uprobes/fib": 15, "uprobes/fib__return": 15,
                         "uprobes/point_sum__return": 7}
    assert without_clocks(docs[-1]) == {"summary": {"events": 44, "lost": 0}}
    returns = [d for d in docs if d.get("kind") == "r"]
    assert all(d["func"] and d["ip"] != d["func"] for d in returns)


def test_output_and_exit_status_unchanged(target: Path, tmp_path: Path) -> None:
    plain = subprocess.run([str(target), "5"], capture_output=True, text=True, check=True)
    traced = subprocess.run([*UPROBES, "trace", "-e", "ptrace", "-o", str(tmp_path / "t"),
                             f"{target}:add", f"r {target}:greet", "libc:strlen",
                             "--", str(target), "5"], capture_output=True, text=True, timeout=60)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout
    assert traced.stderr.strip().endswith("uprobes: 11 events, 0 lost")
    shell = ["/bin/sh", "-c", f"{target} 2 >/dev/null; exit 7"]
    assert main(["trace", "-e", "ptrace", f"{target}:add", "--", *shell], out=io.StringIO()) == 7
    assert main(["count", "-e", "ptrace", f"{target}:add", "--", "/bin/sh", "-c",
                 "kill -TERM $$"], out=io.StringIO()) == 128 + signal.SIGTERM


def test_same_lines_as_the_kernel_engine(target: Path, tracefs: Path) -> None:
    specs = [f"{target}:add a=%di:s64", f"{target}:greet name=+0(%di):string t=%si:s32",
             f"r {target}:fib v=$retval:s64"]

    def lines(engine: str) -> list[str]:
        out = io.StringIO()
        assert main(["trace", "-e", engine, *specs, "--", str(target), "3"], out=out) == 0
        # comm-tid [cpu] secs: rest -- tid, cpu and time differ run to run
        return [re.sub(r"^ *(\S+)-\d+ +\[\d+\] +\d+\.\d+: ", r"\1: ", ln)
                for ln in out.getvalue().splitlines()]

    kernel, ours = lines("kernel"), lines("ptrace")
    # run-time addresses differ by the load base (ASLR): compare the offsets from `add`
    def rebase(ls: list[str]) -> list[str]:
        base = int(re.search(r"add: \((0x[0-9a-f]+)\)", ls[0]).group(1), 16)  # type: ignore[union-attr]
        return [re.sub(r"0x[0-9a-f]+", lambda m: hex(int(m.group(0), 16) - base), ln)
                for ln in ls]
    assert rebase(ours) == rebase(kernel)
    assert len(ours) == 3 + 3 + 15


def test_four_threads_and_a_fork_count_exactly(threads_exe: Path) -> None:
    env = dict(os.environ, TARGET_FORK="1")
    proc_env = os.environ.copy()
    try:
        os.environ.update(env)
        status, counts = count_json([f"{threads_exe}:work", "--", str(threads_exe), "20000"])
    finally:
        os.environ.clear()
        os.environ.update(proc_env)
    assert status == 0
    assert counts == {"uprobes/work": 5 * 20000}


@pytest.mark.heavy
def test_four_threads_100k_each(threads_exe: Path) -> None:
    status, counts = count_json([f"{threads_exe}:work", "--", str(threads_exe), "100000"])
    assert status == 0 and counts == {"uprobes/work": 400000}


def test_exec_is_followed(target: Path) -> None:
    status, docs = trace_json([f"{target}:add", "--", "/bin/sh", "-c",
                               f"{target} 4 >/dev/null; exec {target} 6 >/dev/null"])
    assert status == 0
    by_pid = Counter(d["pid"] for d in docs[:-1])
    assert sorted(by_pid.values()) == [4, 6]
    assert {d["comm"] for d in docs[:-1]} == {target.name[:15]}


def test_dlopen_is_followed(compile_c: Compiler) -> None:
    lib = compile_c("ptrace_plugin.c", "-shared", "-fPIC", name="libptrace_plugin.so")
    exe = compile_c("ptrace_dlopen.c", "-ldl")
    status, counts = count_json([f"{lib}:plugin_work", f"r {lib}:plugin_work",
                                 "--", str(exe), str(lib), "250"])
    assert status == 0
    assert counts == {"uprobes/plugin_work": 250, "uprobes/plugin_work__return": 250}


def test_attach_to_a_running_process(threads_exe: Path) -> None:
    proc = subprocess.Popen([str(threads_exe), "3000"], env=dict(os.environ, TARGET_WAIT="1"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == f"ready {proc.pid}\n"
        events: list[Event] = []
        probes = Resolver(pid=proc.pid).resolve_all(parse_specs([f"{threads_exe}:work"]))
        with PtraceTracer(probes, pid=proc.pid) as tracer:
            assert traced_by(proc.pid) == os.getpid()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            tracer.run(events.append, duration=60)
            assert tracer.target_exited
        assert calls(proc.stdout.read(), "work") == 12000
    finally:
        proc.kill()
        proc.wait()
    assert len(events) == 12000
    assert len({e.tid for e in events}) == 4 and {e.pid for e in events} == {proc.pid}


def test_detach_mid_run_leaves_the_program_unharmed(threads_exe: Path) -> None:
    proc = subprocess.Popen([str(threads_exe), "200000"], env=dict(os.environ, TARGET_WAIT="1"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == f"ready {proc.pid}\n"
        # the return probe by trampoline: detach must put return addresses back
        probes = Resolver(pid=proc.pid, uretprobe=True).resolve_all(
            parse_specs([f"{threads_exe}:work", f"r {threads_exe}:work"]))
        with PtraceTracer(probes, pid=proc.pid) as tracer:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            tracer.run(None, duration=0.5)  # detach while 4 threads hit both probes
            deadline = time.monotonic() + 60  # (on, if a loaded machine let none run yet)
            while not sum(tracer.counts.values()):
                assert time.monotonic() < deadline, "no hit in 60 s"
                tracer.run(None, duration=0.05)
        assert traced_by(proc.pid) == 0
        assert calls(proc.stdout.read(), "work") == 800000
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_mid_run_and_the_command_finishes(threads_exe: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "-i", "0.1",
                             f"{threads_exe}:work", f"r {threads_exe}:work", "--",
                             str(threads_exe), "100000"],
                            env=dict(os.environ, TARGET_WAIT="1"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        # uprobes' first interval tables may come before the program's line (-i 0.1)
        before = ""
        while not (line := proc.stdout.readline()).startswith("ready "):
            assert line, f"the program never said ready: {before!r}"
            before += line
        child = int(line.split()[1])
        proc.stdin.write("go\n")
        proc.stdin.flush()
        seen = ""
        while not re.search(r"^uprobes/work +[1-9]", seen, re.M):  # mid-run: hits counted
            line = proc.stdout.readline()
            assert line, f"uprobes ended before a table showed hits: {seen!r}"
            seen += line
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while traced_by(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert traced_by(child) == 0
        proc.stdin.close()
        out = seen + proc.stdout.read()
        assert calls(out, "work") == 400000
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_signal_storm_during_hits(compile_c: Compiler) -> None:
    """Queued signals (each one delivered, each handler calls the probed
    function), and a SIGSTOP/SIGCONT, while the loop hits both probes."""
    exe = compile_c("ptrace_signals.c")
    proc = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "--json", f"{exe}:work",
                             f"r {exe}:work", "--", str(exe), "30000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.startswith("ready ")
        child = int(line.split()[1])
        sent = 0
        for i in range(400):
            os.kill(child, signal.SIGRTMIN)
            sent += 1
            if i == 200:
                os.kill(child, signal.SIGSTOP)
                time.sleep(0.02)
                os.kill(child, signal.SIGCONT)
        proc.stdin.write(f"{sent}\n")
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
    assert f"calls work={30000 + sent} signals={sent}" in out
    counts = json.loads(out.splitlines()[-1])
    assert counts == {"uprobes/work": 30000 + sent, "uprobes/work__return": 30000 + sent}


def test_usdt_semaphore_is_set_while_traced(compile_c: Compiler) -> None:
    exe = compile_c("usdt_target.c")
    proc = subprocess.run([*UPROBES, "count", "-e", "ptrace", "--json",
                           f"usdt:{exe}:demo:tick", "--", str(exe), "4"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("semaphore=1") == 4  # the fixture prints it when set
    assert json.loads(proc.stdout.splitlines()[-1]) == {"demo/tick": 4}


def test_a_process_traced_by_another_is_refused_in_one_line(target: Path) -> None:
    from uprobes.sys import ptrace
    sleeper = subprocess.Popen(["/bin/sleep", "30"])
    try:
        ptrace.seize(sleeper.pid)  # we are its tracer now; uprobes must say so
        proc = subprocess.run([*UPROBES, "count", "-e", "ptrace", "-p", str(sleeper.pid),
                               "libc:malloc"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            f"uprobes: error: cannot attach to process {sleeper.pid}: it is already traced "
            f"by process {os.getpid()} ({Path('/proc/self/comm').read_text().strip()}); "
            "one tracer per process")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_exception_in_a_handler_detaches_cleanly(threads_exe: Path) -> None:
    """A consumer that raises mid-run: every int3 and return address is put
    back, and the program finishes with its right output."""
    from uprobes.model.registry import Consumer

    class Boom(Exception):
        pass

    seen = []

    def handler(hit: Any) -> None:
        seen.append(hit.tid)
        assert hit.read(hit.regs.rsp, 8)  # the stopped thread's memory
        if len(seen) == 5000:
            raise Boom()

    proc = subprocess.Popen([str(threads_exe), "50000"], env=dict(os.environ, TARGET_WAIT="1"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == f"ready {proc.pid}\n"
        probes = Resolver(pid=proc.pid, uretprobe=True).resolve_all(
            parse_specs([f"r {threads_exe}:work"]))
        with pytest.raises(Boom):
            with PtraceTracer(probes, pid=proc.pid) as tracer:
                for p in tracer.registry:
                    tracer.registry.add(p.point, Consumer(ret_handler=handler))
                proc.stdin.write("go\n")
                proc.stdin.flush()
                tracer.run(None, duration=60)
        assert traced_by(proc.pid) == 0
        out = proc.stdout.read()
        assert "calls" in out, f"no output; the program's status: {proc.wait(60)}"
        assert calls(out, "work") == 200000
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_handler_changes_the_return_value(target: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    """Synchronous handlers may write registers: `add` returns 1000 more."""
    from uprobes.model.registry import Consumer
    probes = Resolver().resolve_all(parse_specs([f"r {target}:add"]))

    def bump(hit: Any) -> None:
        hit.set(rax=hit.regs.rax + 1000)

    child = launch([str(target), "3"])
    with PtraceTracer(probes, child=child.pid) as tracer:
        for p in tracer.registry:
            tracer.registry.add(p.point, Consumer(ret_handler=bump))
        child.release()
        tracer.run(None)
    assert tracer.child_status == 0 and tracer.counts == {"uprobes/add__return": 3}
    # untraced: total=359 for 3 loops; three add() calls each return 1000 more
    assert "total=3359" in capfd.readouterr().out


def test_detach_puts_usdt_semaphores_back(running_process: object) -> None:
    """A USDT probe with a semaphore raises it while placed (as the kernel's
    uprobes do) and detach lowers it again, in a process that goes on."""
    from uprobes.sys.procmem import ProcessMemory

    pid = running_process.pid  # type: ignore[attr-defined]
    spec = "usdt:/usr/bin/python3.11:python:function__entry"
    probes = Resolver(pid=pid).resolve_all(parse_specs([spec]))
    with PtraceTracer(probes, pid=pid) as tracer:
        semaphores = [a for t in tracer.threads.values() for a in t.mm.semaphores]
        assert semaphores
        with ProcessMemory(pid) as mem:
            assert all(int.from_bytes(mem.read(a, 2), "little") == 1 for a in semaphores)
    with ProcessMemory(pid) as mem:
        assert [int.from_bytes(mem.read(a, 2), "little") for a in semaphores] == \
            [0] * len(semaphores)


@pytest.mark.parametrize("command", [
    ["count", "-e", "ptrace", "--no-trapfree", "--duration", "1"],  # int3: SIGTRAP killed it
    ["trace", "-e", "ptrace", "--duration", "0.3"],  # trap-free ring: uprobes never ended
])
def test_a_process_sharing_the_targets_memory_is_refused_before_any_probe(
        compile_c: Compiler, command: list[str]) -> None:
    # A clone(CLONE_VM|SIGCHLD) sibling made before `-p` attaches runs the
    # same code untraced: our int3s would kill it and our ring would have a
    # writer we do not know. uprobes refuses in one line, before placing any.
    exe = compile_c("clone_vm.c")
    prog = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert prog.stdin is not None and prog.stdout is not None
    try:
        sibling = int(prog.stdout.readline().split()[1])
        start = time.monotonic()
        proc = subprocess.run([*UPROBES, *command, "-p", str(prog.pid), f"{exe}:work"],
                              capture_output=True, text=True, timeout=60)
        assert time.monotonic() - start < 60
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[-1].startswith(
            f"uprobes: error: process {sibling} shares process {prog.pid}'s memory")
        prog.stdin.write("\n")
        prog.stdin.close()
        assert prog.stdout.read() == "sibling status=0 called=1\n"  # as untraced
        assert prog.wait(60) == 0
    finally:
        prog.kill()
        prog.wait()


@pytest.mark.root
def test_a_ring_writer_we_do_not_know_does_not_keep_the_run_from_ending(
        compile_c: Compiler) -> None:
    need(os.geteuid() == 0, "mapping another process's ring takes root")
    # Another process maps the trap-free ring (root: /proc/PID/map_files)
    # and commits records faster than we read: the final drain reads for a
    # bounded time, counts the rest lost and the run ends as --duration says.
    from uprobes.engines.trapfree import layout
    exe = writer_exe = compile_c("ring_writer.c")
    prog = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    assert prog.stdout is not None
    writer = None
    try:
        assert prog.stdout.readline().startswith("ready")
        run = subprocess.Popen([*UPROBES, "trace", "-e", "ptrace", "-p", str(prog.pid),
                                "--duration", "5", f"{exe}:work"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        writer = subprocess.Popen(
            [str(writer_exe), str(prog.pid), *(str(o) for o in (
                layout.HEAD, layout.TAIL, layout.COMMITTED, layout.SLOT_SIZE,
                layout.DATA_OFFSET))], stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        assert writer.stdout.readline() == "writing\n"
        start = time.monotonic()
        try:
            _, err = run.communicate(timeout=60)
        finally:
            run.kill()
        assert time.monotonic() - start < 60
        assert run.returncode == 0, err
        assert "still filling" in err
        assert prog.poll() is None  # untouched: it runs on
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        prog.kill()
        prog.wait()
