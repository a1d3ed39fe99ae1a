"""The return table (engines/ptrace/rettable.py) as the in-tracee handler
reads it, and the return instances that keep it (retprobes.py): entries made
and freed in step with the stack, no room means no hijack, a fork child's
copies. The stack is a real word of this process's memory, through
/proc/self/mem as the tracer writes a tracee's."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from uprobes.engines.ptrace import retprobes, rettable
from uprobes.model.registry import Probe
from uprobes.sys.procmem import ProcessMemory

TRAMPOLINE = 0x7000_0000
REAL = 0x40_1234


def _table(notes: list[str]) -> rettable.ReturnTable:
    return rettable.ReturnTable(mmap.mmap(-1, rettable.SIZE), 0x1000, notes.append)


def _live(table: rettable.ReturnTable) -> list[tuple[int, int, int]]:
    """What the handler scans: the used count in the header, then the entries."""
    used = struct.unpack_from("<Q", table.view, 0)[0]
    entries = [table.entry(i) for i in range(used)]
    return [e for e in entries if e[0]]


def _stack(words: int) -> tuple[ctypes.Array[ctypes.c_uint64], list[int]]:
    """A stack of `words` return addresses (REAL + i), and their addresses."""
    buf = (ctypes.c_uint64 * words)(*[REAL + i for i in range(words)])
    return buf, [ctypes.addressof(buf) + 8 * i for i in range(words)]


def _hijack(returns: list[retprobes.ReturnInstance], mem: ProcessMemory, sp: int,
            table: rettable.ReturnTable | None, tid: int) -> bool:
    probe = Probe(None, None)  # only carried along
    return retprobes.hijack(returns, mem, sp, TRAMPOLINE, probe, 0x40_0000, 0, table, tid)


def test_entries_follow_the_stack() -> None:
    """Recursion: one entry per frame, made with the swap, freed after the return."""
    notes: list[str] = []
    table = _table(notes)
    buf, sps = _stack(3)
    returns: list[retprobes.ReturnInstance] = []
    with ProcessMemory(os.getpid()) as mem:
        for sp in reversed(sps):  # outermost frame highest
            assert _hijack(returns, mem, sp, table, 77)
        assert list(buf) == [TRAMPOLINE] * 3
        assert sorted(_live(table)) == sorted((77, sp, REAL + i) for i, sp in enumerate(sps))
        done = retprobes.complete(returns, sps[0] + 8, table)  # the innermost returns
        assert [ri.orig_ret for ri in done] == [REAL]
        assert len(_live(table)) == 3  # kept until rip has left the trampoline
        retprobes.release(done, table)
        assert sorted(_live(table)) == sorted((77, sp, REAL + i)
                                              for i, sp in enumerate(sps) if i)
        retprobes.restore(returns, mem, table)  # a clean detach
    # the returned frame's word was popped by its ret; the others put back
    assert list(buf)[1:] == [REAL + 1, REAL + 2] and _live(table) == [] and notes == []


def test_stale_entries_are_freed_when_a_frame_takes_their_place() -> None:
    """After a longjmp the next hijack at or above a stale frame drops it."""
    table = _table([])
    buf, sps = _stack(3)
    returns: list[retprobes.ReturnInstance] = []
    with ProcessMemory(os.getpid()) as mem:
        for sp in (sps[2], sps[0]):
            assert _hijack(returns, mem, sp, table, 5)
        buf[1] = REAL + 1
        assert _hijack(returns, mem, sps[1], table, 5)  # above the stale sps[0]
    assert sorted(_live(table)) == [(5, sps[1], REAL + 1), (5, sps[2], REAL + 2)]


def test_a_full_table_means_no_hijack() -> None:
    notes: list[str] = []
    table = _table(notes)
    for i in range(rettable.ENTRIES):
        assert table.add(9, 0x1000 + 8 * i, REAL) == i
    buf, sps = _stack(1)
    returns: list[retprobes.ReturnInstance] = []
    with ProcessMemory(os.getpid()) as mem:
        assert not _hijack(returns, mem, sps[0], table, 9)
        assert not _hijack(returns, mem, sps[0], table, 9)
        assert list(buf) == [REAL] and returns == []  # the stack untouched
        assert len(notes) == 1, notes
        table.free(17)
        assert _hijack(returns, mem, sps[0], table, 9)  # room again: reused
    assert table.entry(17) == (9, sps[0], REAL)


def test_a_fork_child_gets_entries_under_its_tid() -> None:
    table = _table([])
    buf, sps = _stack(2)
    parent: list[retprobes.ReturnInstance] = []
    with ProcessMemory(os.getpid()) as mem:
        for sp in reversed(sps):
            assert _hijack(parent, mem, sp, table, 100)
        child = retprobes.inherit(parent, table, 200, mem)
        assert len(child) == 2
        assert sorted(e for e in _live(table) if e[0] == 200) == \
            sorted((200, sp, REAL + i) for i, sp in enumerate(sps))
        for i in range(rettable.ENTRIES - 4):
            table.add(1, 0x1000 + 8 * i, REAL)
        # No room for another child's two: its return addresses are put back.
        assert retprobes.inherit(parent, table, 300, mem) == []
        assert list(buf) == [REAL, REAL + 1]
        assert not any(e[0] == 300 for e in _live(table))
