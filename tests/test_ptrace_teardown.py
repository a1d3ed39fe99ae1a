"""Detach undoes what the ptrace engine changed in every address space it
traces, also in one it did not set up itself: a fork child inherits its
parent's int3s, and detach takes them out of the child as well (each space's
undo steps, teardown.py; a fork child's space takes its parent's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Compiler, killed_after, wait_until

from uprobes.commands.resolve import parse_specs
from uprobes.engines.ptrace.tracer import PtraceTracer
from uprobes.resolve.resolver import Resolver
from uprobes.sys.procmem import ProcessMemory


@pytest.fixture(scope="module")
def fork_hold(compile_c: Compiler) -> Path:
    return compile_c("fork_hold.c")


def test_detach_takes_the_int3s_out_of_a_fork_child_that_goes_on(fork_hold: Path) -> None:
    proc = subprocess.Popen([str(fork_hold)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    with killed_after(proc):
        assert proc.stdin is not None and proc.stdout is not None
        pid = int(proc.stdout.readline().split()[1])
        probes = Resolver(pid=pid).resolve_all(parse_specs([f"{fork_hold}:work"]))
        with PtraceTracer(probes, pid=pid) as tracer:
            proc.stdin.write("fork\n")
            proc.stdin.flush()

            def child_counted() -> bool:
                tracer.run(None, 0.05)
                return any(t.pid != pid for t in tracer.threads.values()) \
                    and sum(tracer.counts.values()) > 1000
            wait_until(child_counted, "the fork child's calls of work() to be counted")
            child = next(t for t in tracer.threads.values() if t.pid != pid)
            int3s = {addr: site.original[:1] for addr, site in child.mm.sites.items()}
            assert int3s, "the child inherited no int3"
        assert int(proc.stdout.readline().split()[1]) == child.pid
        with ProcessMemory(child.pid) as mem:
            assert {addr: mem.read(addr, 1) for addr in int3s} == int3s
        proc.stdin.write("end\n")
        proc.stdin.flush()
        assert proc.wait() == 0  # the child ran on untraced, every work() call right
