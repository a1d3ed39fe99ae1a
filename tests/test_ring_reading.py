"""The recording code run in this process into a ring that `Ring` reads:
the writers' count of commits lets the reader take every slot without
looking at the slots, and only while it equals `head`; `Recorder.dump`
tells the owner of every thread, gone ones included, with no look at the
records."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from uprobes.engines.trapfree import layout
from uprobes.engines.trapfree.reader import Recorder
from uprobes.engines.trapfree.recording import Recipe, Waits, prologue
from uprobes.engines.trapfree.ring import Ring

WAITS = Waits(stale=1 << 40, give_up=1 << 41, skew=4096)  # (the ring never fills here)
PROBE_ID = 3


@contextmanager
def recording_code(shape: layout.RingShape = layout.LONG
                   ) -> Iterator[tuple[Ring, ctypes._CFuncPtr]]:
    """A ring of `shape` and a function that records `rdi` into it (the
    prologue, then ret)."""
    ring_map = mmap.mmap(-1, layout.RING_BYTES)
    code_map = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                         | mmap.PROT_EXEC)
    ring_addr = ctypes.addressof(ctypes.c_char.from_buffer(ring_map))
    code_addr = ctypes.addressof(ctypes.c_char.from_buffer(code_map))
    assert abs(ring_addr - code_addr) < 1 << 30  # (rel32 reach: mappings sit side by side)
    code = prologue(code_addr, ring_addr, Recipe(("rdi",), None), PROBE_ID, True, WAITS, shape)
    code_map[:len(code) + 1] = code + b"\xc3"
    ring = Ring(ring_map, ring_addr, shape)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint64)(code_addr)
    try:
        yield ring, fn
    finally:
        del fn
        ring.close()
        code_map.close()


def _values(records: list[tuple[int, ...]]) -> list[int]:
    return [rec[layout.REC_VALUES] for rec in records]


SHAPES = pytest.mark.parametrize("shape", [layout.LONG, layout.SHORT], ids=["long", "short"])


@SHAPES
def test_the_commit_count_lets_the_reader_take_slots_unseen(shape: layout.RingShape) -> None:
    with recording_code(shape) as (ring, record):
        for v in range(100):
            record(v)
        words = ring.words
        assert words[layout.COMMITTED // 8] == words[layout.HEAD // 8] == 100
        # A sequence word overwritten after the commit: the count says every
        # slot reserved is committed, so the reader does not look at it.
        words[(layout.DATA_OFFSET + 50 * shape.slot_bytes + layout.SLOT_SEQ) // 8] = 0
        got = ring.take()
        assert _values(got) == list(range(100))
        assert {rec[layout.REC_TID] for rec in got} == {threading.get_native_id()}
        assert {rec[layout.REC_PROBE] for rec in got} == {PROBE_ID}


@SHAPES
def test_a_slot_reserved_and_not_committed_stops_the_take(shape: layout.RingShape) -> None:
    """A writer between its reservation and its commit (here: `head` moved
    by hand): the count falls behind `head`, and the reader goes back to the
    sequence words, taking what comes before the open slot and nothing after
    it until it is committed."""
    with recording_code(shape) as (ring, record):
        words = ring.words
        assert words[layout.SLOT_SIZE // 8] == shape.slot_bytes
        for v in range(10):
            record(v)
        words[layout.HEAD // 8] += 1  # slot 10 reserved, its writer not done
        for v in range(11, 20):
            record(v)
        assert words[layout.COMMITTED // 8] == 19 and words[layout.HEAD // 8] == 20
        assert _values(ring.take()) == list(range(10))
        assert _values(ring.take()) == []  # still open (and not yet STUCK_S old)
        # The writer finishes: its values, then the commit, then the count.
        slot = (layout.DATA_OFFSET + 10 * shape.slot_bytes) // 8
        words[slot + layout.SLOT_PROBE // 8] = PROBE_ID
        words[slot + layout.SLOT_VALUES // 8] = 10
        words[slot + layout.SLOT_SEQ // 8] = 11
        words[layout.COMMITTED // 8] += 1
        assert _values(ring.take()) == list(range(10, 20))
        assert ring.skipped == 0 and ring.corrupt == 0


@SHAPES
def test_after_a_head_put_back_the_reader_looks_at_every_slot(shape: layout.RingShape) -> None:
    """A `head` no writer could have left is put back to `tail`, but the
    count of commits is not: once reservations catch up with it, the count
    equals `head` while those slots are still open, and the reader must
    look at their sequence words rather than copy them unseen."""
    with recording_code(shape) as (ring, record):
        words = ring.words
        for v in range(10):
            record(v)
        assert _values(ring.take()) == list(range(10))
        # The program scribbles on the header: a `head` past any room, and a
        # count two ahead of the reservations the reader will put back.
        words[layout.HEAD // 8] = 10 + shape.slots + 5
        words[layout.COMMITTED // 8] = 12
        assert ring.take() == []
        assert ring.corrupt == 1 and words[layout.HEAD // 8] == 10
        # Two writers reserve slots 10 and 11 and have not committed yet.
        words[layout.HEAD // 8] += 2
        assert words[layout.COMMITTED // 8] == words[layout.HEAD // 8] == 12
        assert ring.take() == []  # open slots: nothing copied
        for k in (10, 11):  # the writers finish their records
            slot = (layout.DATA_OFFSET + k * shape.slot_bytes) // 8
            words[slot + layout.SLOT_PROBE // 8] = PROBE_ID
            words[slot + layout.SLOT_VALUES // 8] = k
            words[slot + layout.SLOT_SEQ // 8] = k + 1
        assert _values(ring.take()) == [10, 11]
        assert ring.skipped == 0


class _Sink:
    """What `Recorder.dump` hands a RawSink, kept."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, dict[int, tuple[int, str] | None]]] = []

    def raw(self, created: int, now: int, read: int, slot_bytes: int, data: memoryview,
            owners: dict[int, tuple[int, str] | None]) -> None:
        self.pieces.append((data.nbytes // slot_bytes, dict(owners)))

    def sites(self, sites: object, rate: object) -> None:
        pass


def test_dump_tells_every_threads_owner_gone_ones_too() -> None:
    """The owners come from the tracer's threads, not from the records: a
    thread that recorded and exited between two reads is told as gone; a
    thread's owner is told once, again when it changes."""
    with recording_code() as (ring, record):
        recorder = Recorder({})
        sink = _Sink()
        me = threading.get_native_id()
        for v in range(5):
            record(v)
        recorder.former(me, (1, "gone", me))  # exited before the read
        recorder.dump([ring], lambda: [(2, (1, "live", 2))], sink)
        assert sink.pieces == [(5, {me: (1, "gone", me), 2: (1, "live", 2)})]
        record(5)
        recorder.dump([ring], lambda: [(2, (1, "live", 2))], sink)
        assert sink.pieces[-1] == (1, {})  # nothing new to tell
        record(6)
        recorder.dump([ring], lambda: [(2, (1, "renamed", 2)), (me, (1, "reused", me))], sink)
        assert sink.pieces[-1] == (1, {2: (1, "renamed", 2), me: (1, "reused", me)})
        assert recorder.raw_records == 7


def test_the_roster_rereads_a_few_comms_a_call_taking_turns() -> None:
    """`uprobes record` tells the owners of every traced thread at each read
    of the rings: the names, read from /proc, are read again (once stale)
    for COMM_READS threads a call, in turns, so each renaming is seen within
    a few calls and a program of thousands of threads costs a few reads."""
    from uprobes.engines.ptrace.tasks import COMM_READS, COMM_TTL_NS, AddressSpace, Thread, roster
    from uprobes.sys.procmem import ProcessMemory

    n = 2 * COMM_READS + 5
    pid = os.getpid()
    done = threading.Event()
    tids: list[int] = []
    ready = threading.Barrier(n + 1)

    def park() -> None:
        tids.append(threading.get_native_id())
        ready.wait(timeout=60)
        done.wait(timeout=120)
    workers = [threading.Thread(target=park) for _ in range(n)]
    for w in workers:
        w.start()
    mm = AddressSpace(pid, ProcessMemory(pid))
    try:
        ready.wait(timeout=60)
        for k, tid in enumerate(tids):
            Path(f"/proc/{pid}/task/{tid}/comm").write_text(f"before{k}")
        threads = {tid: Thread(tid, pid, mm) for tid in tids}
        got, turn = roster(threads, 0)  # every name read for the first time
        assert dict(got) == {tid: (pid, f"before{k}", tid) for k, tid in enumerate(tids)}
        for k, tid in enumerate(tids):
            Path(f"/proc/{pid}/task/{tid}/comm").write_text(f"after{k}")
            threads[tid].comm_at -= COMM_TTL_NS + 1  # (as if read long ago)
        seen: list[int] = []
        for _ in range(-(-n // COMM_READS)):
            got, turn = roster(threads, turn)
            renamed = [tid for tid, (_, comm, _) in got if comm.startswith("after")]
            assert len(renamed) - len(seen) == min(COMM_READS, n - len(seen))
            seen = renamed
        assert len(seen) == n
    finally:
        done.set()
        for w in workers:
            w.join(timeout=120)
        mm.mem.close()
