"""One trap-free ring as its reader sees it: `Ring`, its control words, its
committed slots taken in order (unpacked, or as they are for `record`),
the program's impossible values put back. recording.py builds the code
that writes it, layout.py its binary format, reader.py turns its records
back into hits.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from array import array
from collections.abc import Callable
from functools import lru_cache

from uprobes.engines.trapfree.layout import (
    COMMITTED,
    DATA_OFFSET,
    HEAD,
    HEARTBEAT,
    LONG,
    LOST,
    PY_SEALED,
    RING_TLS,
    SLOT_SEQ,
    SLOT_SIZE,
    SLOTS,
    STALLED,
    TAIL,
    WAITERS,
    RingShape,
)
from uprobes.engines.trapfree.sharedmem import most_hits
from uprobes.sys import futex, tsc

STUCK_S = 1.0                       # a reserved slot not committed this long is lost
TAKE_MAX = 4096                     # records per take: slots are freed this often
RAW_TAKE_MAX = 16384                # ... when they are only copied (`take_raw`)
PIECE_BYTES = 512 * 1024  # slots per copy (the reader's cache keeps what it
                                    # checked for the copy), freed after each
_MASK64 = (1 << 64) - 1
_ONES = int.from_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00" * SLOTS, "little")
_INDEX = int.from_bytes(array("Q", range(SLOTS)).tobytes(), "little")


@lru_cache(maxsize=8)
def _lanes(n: int) -> tuple[int, int]:
    """n little-endian 64-bit lanes as one integer: all ones, and 0, 1, ..., n-1."""
    mask = (1 << (64 * n)) - 1
    return _ONES & mask, _INDEX & mask


def _counting(first: int, n: int) -> bytes:
    """The little-endian u64s first, first+1, ..., first+n-1: the sequence
    words of n committed slots from `first`, made by integer arithmetic on
    all lanes at once (no carry crosses a lane below 2**64)."""
    ones, index = _lanes(n)
    return (first * ones + index).to_bytes(8 * n, "little")


class Ring:
    """One ring, mapped in a family of processes at `runtime_addr` and here.

    The programs can write any of its words: the reader keeps the truth
    (`tail`, the lost count) on its side, puts back `tail` and `head` when
    they cannot be true, and counts each such repair in `corrupt`; the
    records themselves are checked by `Recorder`. `shape`: its slots (the
    SLOT_SIZE word says so to the program; the reader keeps its own)."""

    def __init__(self, view: mmap.mmap, runtime_addr: int, shape: RingShape = LONG) -> None:
        self.view = view
        self.runtime_addr = runtime_addr
        self.shape = shape
        self.record = shape.record
        self.words = memoryview(view).cast("Q")  # 8-byte loads and stores
        self.words[SLOT_SIZE // 8] = shape.slot_bytes
        self.created = tsc.read()  # no record of this ring is older
        self.beat()
        anchor = ctypes.c_char.from_buffer(view)
        self._tail_addr = ctypes.addressof(anchor) + TAIL  # our address of `tail`, to wake
        del anchor  # (the mapping stays put; holding the export would block close())
        self.tail = 0
        self.skipped = 0
        self.corrupt = 0  # control words found impossible (records: Recorder.corrupt)
        self.probe_ids: set[int] = set()  # the probes whose code writes here
        self._lost = 0
        self._lost_word = (0, time.monotonic())  # (`lost` as last read, when)
        self._stuck: tuple[int, float, int] | None = None  # (index, since, head then)
        self._stale_below = 0  # uncommitted slots below this are lost (see `take`)

    @property
    def lost(self) -> int:
        """Hits dropped on a full ring, plus slots never committed."""
        return self._lost + self.skipped

    def _read_lost(self) -> None:
        """Add what the in-program `lost` counter gained since the last read,
        if a count of dropped hits can have gained that much."""
        word, at = self._lost_word
        now = time.monotonic()
        raw = int(self.words[LOST // 8])
        gained = (raw - word) & _MASK64
        if gained <= most_hits(now - at):
            self._lost += gained
        else:
            self.corrupt += 1
        self._lost_word = (raw, now)

    def take(self, final: bool = False, limit: int = TAKE_MAX) -> list[tuple[int, ...]]:
        """Up to `limit` records committed since the last take, unpacked (see
        `_take`)."""
        out: list[tuple[int, ...]] = []
        self._take(final, limit, lambda start, end: out.extend(
            self.record.iter_unpack(self.view[start:end])))
        return out

    def take_raw(self, out: Callable[[memoryview], None], final: bool = False,
                 limit: int = RAW_TAKE_MAX) -> None:
        """`take`'s records as the slots' bytes (`shape.slot_bytes` each), unchecked,
        handed to `out` as views of the ring itself (valid during the call
        only: the slots are free again after it): what `uprobes record`
        writes to disk with no work per record, and no copy of ours."""
        def piece(start: int, end: int) -> None:
            with memoryview(self.view)[start:end] as view:
                out(view)
        self._take(final, limit, piece)

    def _take(self, final: bool, limit: int, copy: Callable[[int, int], None]) -> None:
        """Up to `limit` records committed since the last take, in reservation
        order, handed to `copy(start, end)` (byte offsets into the ring, a run
        of whole slots, PIECE_BYTES at most, that does not wrap); each run's slots are
        free again as soon as it returns (so hits waiting for room go on while
        the next run is being handled).
        While the writers' count of commits equals `head` (and no slot was
        ever given up as lost, whose writer could still commit late, nor a
        `head` or `tail` word put back, which the count did not follow) every
        slot reserved is committed: the runs are taken with no look at their
        sequence words. Otherwise each run is cut at the first slot whose
        sequence word is not yet its own.
        A reserved slot not yet committed stops the take (its writer is
        between two instructions) unless it stays so for STUCK_S, or
        `final` (every writer stopped or gone): then it counts as lost, and
        so do the uncommitted slots that had been reserved when the wait
        began (reserved as long ago): a `head` pushed ahead by the program
        costs one wait, not one per slot.
        A `tail` or `head` word that no writer could have left (the program
        wrote it) is put back, and counted in `corrupt`."""
        words = self.words
        self.beat()
        if words[STALLED // 8]:
            words[STALLED // 8] = 0  # reading again: full rings make hits wait again
        self._read_lost()
        tail = self.tail
        if words[TAIL // 8] != tail:
            words[TAIL // 8] = tail
            self.corrupt += 1
        # `committed` before `head` (x86 keeps loads in order): equal, every
        # reservation made before the first load had been committed by then.
        committed = int(words[COMMITTED // 8])
        head = int(words[HEAD // 8])
        slots, slot_bytes = self.shape.slots, self.shape.slot_bytes
        piece = PIECE_BYTES // slot_bytes
        if (head - tail) & _MASK64 > slots:  # writers reserve only while head - tail < slots
            words[HEAD // 8] = head = tail
            self.corrupt += 1
        # After a repair `committed` no longer counts the reservations from
        # `head` (the reset did not move it): equal to `head` it proves nothing.
        whole = committed == head and not self.skipped and not self.corrupt
        per_slot = slot_bytes // 8
        base = (DATA_OFFSET + SLOT_SEQ) // 8  # the first slot's sequence word
        reserved = head
        head = min(head, tail + limit)
        while tail < head:
            # The committed run from `tail`, up to the ring's end (a copy does
            # not wrap): unless all are known committed, the sequence words,
            # read as one strided column, are checked before the copy (x86
            # does not reorder loads), so each record copied is whole.
            slot = tail & (slots - 1)
            n = min(head - tail, slots - slot, piece)
            seqs: list[int] = []
            if not whole:
                # One read of the column (writers commit meanwhile): what is
                # checked and what is counted are the same snapshot.
                raw = words[base + slot * per_slot:base + (slot + n) * per_slot:per_slot].tobytes()
                if raw != _counting(tail + 1, n):  # not all committed: how many are
                    seqs = array("Q", raw).tolist()
                    n = next((k for k, seq in enumerate(seqs) if seq != tail + 1 + k), n)
            if n:
                start = DATA_OFFSET + slot * slot_bytes
                copy(start, start + n * slot_bytes)
                tail += n
                self._stuck = None
                self._publish(tail)
                continue
            if not final and tail >= self._stale_below:
                now = time.monotonic()
                if self._stuck is None or self._stuck[0] != tail:
                    self._stuck = (tail, now, reserved)
                if now - self._stuck[1] < STUCK_S:
                    break
                self._stale_below = self._stuck[2]
            # Lost: the run of uncommitted slots from here (within the stale ones).
            run = next((k for k, seq in enumerate(seqs) if seq == tail + 1 + k), len(seqs))
            if not final:
                run = max(1, min(run, self._stale_below - tail))
            tail += run
            self.skipped += run
            self._stuck = None
            self._publish(tail)

    def _publish(self, tail: int) -> None:
        """Slots up to `tail` are free again: say so, and wake hits that wait for room."""
        self.tail = tail
        words = self.words
        words[TAIL // 8] = tail
        if words[WAITERS // 8]:  # hits wait for room: there is some now
            words[WAITERS // 8] = 0
            futex.wake(self._tail_addr)

    def beat(self) -> None:
        """The reader is alive: a hit waiting for room goes on waiting while
        this is less than WAIT_S old."""
        self.words[HEARTBEAT // 8] = tsc.read()

    def sealed(self) -> int:
        """Hits recorded without their Python frames because the seccomp word
        had moved (layout.PY_SEALED: the program can write it; a note's count)."""
        return int(self.words[PY_SEALED // 8])

    def tls_confirmed(self) -> None:
        """The tid is at glibc's place in the thread pointer: hits of code placed
        before that was seen read it there from now on (RING_TLS)."""
        self.words[RING_TLS // 8] = 1

    def abandon(self) -> None:
        """No reader from now on: hits that find the ring full drop their
        record at once (and any waiting now do after their nap)."""
        self.words[STALLED // 8] = 1
        futex.wake(self._tail_addr)

    def give_up(self) -> None:
        """No more reads: what is reserved and unread counts as lost, and
        hits that find the ring full drop their record (`abandon`)."""
        head = int(self.words[HEAD // 8])
        self.skipped += min((head - self.tail) & _MASK64, self.shape.slots)
        self.abandon()

    def close(self) -> None:
        if not self.view.closed:
            self.words.release()
            self.view.close()
