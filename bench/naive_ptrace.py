"""The naive ptrace breakpoint loop, in Python: the baseline bench.ptrace measures against.

Per hit: int3 trap, getregs, rip back by one, setregs, restore the original
byte, single-step, re-insert the int3, continue (8 syscalls with the two
waits).  This is what debuggers classically do, and what the ptrace engine
must not do: while the byte is restored another thread can run past the
probe unseen (the engine executes out of line instead).

    python -m bench.naive_ptrace WORKLOAD N FUNCTION    # prints "hits N"
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from uprobes.sys import ptrace

INT3 = b"\xcc"


def trace(argv: list[str]) -> int:
    """Run `argv` (a bench workload) with a naive breakpoint on its function; the hits."""
    env = dict(os.environ, BENCH_WAIT="1")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdin is not None and proc.stdout is not None
    word, addr_text = proc.stdout.readline().split()
    assert word == "ready"
    addr = int(addr_text, 16)
    pid = proc.pid
    ptrace.seize(pid, 0)
    ptrace.interrupt(pid)
    ptrace.wait_task(pid)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    original = os.pread(fd, 1, addr)
    os.pwrite(fd, INT3, addr)
    ptrace.cont(pid)
    proc.stdin.write("go\n")
    proc.stdin.close()
    regs = ptrace.UserRegs()
    hits = 0
    while True:
        status = ptrace.wait_task(pid)
        if ptrace.exited(status):
            break
        sig = ptrace.stop_signal(status)
        if sig != signal.SIGTRAP or ptrace.stop_event(status):
            ptrace.cont(pid, 0 if ptrace.stop_event(status) else sig)
            continue
        ptrace.getregs(pid, regs)
        regs.rip -= 1
        ptrace.setregs(pid, regs)
        os.pwrite(fd, original, addr)
        ptrace.singlestep(pid)
        ptrace.wait_task(pid)
        os.pwrite(fd, INT3, addr)
        ptrace.cont(pid)
        hits += 1
    os.close(fd)
    out = proc.stdout.read()
    proc.wait()
    sys.stdout.write(out)
    return hits


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"hits {trace(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
