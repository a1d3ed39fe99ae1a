"""The reaper's side of orphan.py: a watcher process started with a run
(engines/reaper.py) reads what the tracer placed in each process (int3s,
raised USDT semaphores; `OrphanGuard` sends the lines) and, if uprobes dies
without its clean detach, undoes it in every process still the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uprobes.engines import reaper
from uprobes.engines.ptrace.orphan import start_time
from uprobes.errors import UprobesError
from uprobes.sys.procmem import ProcessMemory


@dataclass
class _Process:
    start: int
    area: int
    int3s: dict[int, int] = field(default_factory=dict)   # address -> original byte
    semaphores: dict[int, int] = field(default_factory=dict)  # address -> our adds


def _record(procs: dict[int, _Process], line: str) -> None:
    words = line.split()
    if not words:
        return
    kind, args = words[0], words[1:]
    if kind == "C":
        procs.clear()
    elif kind == "P":
        procs[int(args[0])] = _Process(int(args[1]), int(args[2], 16))
    elif kind == "F":
        procs.pop(int(args[0]), None)
    elif kind in ("B", "S") and int(args[0]) in procs:
        proc = procs[int(args[0])]
        if kind == "B":
            proc.int3s[int(args[1], 16)] = int(args[2], 16)
        else:
            addr = int(args[1], 16)
            proc.semaphores[addr] = proc.semaphores.get(addr, 0) + 1


def restore(pid: int, proc: _Process) -> int:
    """Undo what `proc` records in process `pid` if it is still that process
    (same start time, our orphan area still mapped); the int3s put back."""
    if start_time(pid) != proc.start:
        return 0
    if proc.area:
        try:
            with open(f"/proc/{pid}/maps", errors="surrogateescape") as f:
                if not any(line.startswith(f"{proc.area:x}-") for line in f):
                    return 0  # it exec'd: what we placed went with its old image
        except OSError:
            return 0
    done = 0
    try:
        mem = ProcessMemory(pid)
    except UprobesError:
        return 0
    with mem:
        for addr, byte in proc.int3s.items():
            try:
                if mem.read(addr, 1) == b"\xcc":
                    mem.write(addr, bytes([byte]))
                    done += 1
            except UprobesError:
                pass  # unmapped meanwhile
        for addr, n in proc.semaphores.items():
            try:
                value = int.from_bytes(mem.read(addr, 2), "little")
                mem.write(addr, max(0, value - n).to_bytes(2, "little"))
            except UprobesError:
                pass
    return done


def _reap() -> int:
    procs: dict[int, _Process] = {}
    reaper.read_until_eof(lambda line: _record(procs, line))
    for pid, proc in procs.items():
        restore(pid, proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(_reap())
