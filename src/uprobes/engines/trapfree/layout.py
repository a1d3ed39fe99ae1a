"""Every binary format the trap-free code in a program and our readers share.

Two sides use each of these: the machine code we generate into a tracee
(trampoline.py, recording.py's `prologue`) writes them, and our Python
readers (jumppatch.CounterBlock, ring.Ring, reader.Recorder) read them.
Both take every offset and size from here, and tests/test_trapfree_layout.py
checks the generated code's displacements against them.

The recording ring (one per fork family, MAP_SHARED):

    0            header: one control word per cache line where writers meet
      HEAD         next slot index to reserve (writers: lock cmpxchg)
      TAIL         first slot index not yet read (the reader publishes it)
      LOST         hits dropped on a full or stalled ring (writers: lock inc)
      STALLED      1 while the reader's heartbeat is stale (writers set it)
      WAITERS      1 while some hit sleeps on TAIL (the reader wakes them)
      COMMITTED    slots committed so far (writers: lock inc after the commit): while
                   it equals HEAD every slot reserved is committed, and the reader
                   copies them all without looking at their sequence words
      HEARTBEAT    TSC stamp of the reader's last read
      RING_TLS     1 once the tracer saw each thread's tid at glibc's place in its
                   thread pointer: hits read it there, not by a gettid system call
      SLOT_SIZE    the ring's slot size (its `RingShape`), written once by the tracer
      PY_SEALED    hits recorded without their Python frames: the seccomp word had
                   moved (pywalk.Seal, sandboxes.py; writers: lock inc)
    DATA_OFFSET  SLOTS slots of SLOT_BYTES, slot i at DATA_OFFSET + (i % SLOTS) * SLOT_BYTES:
      SLOT_SEQ     i + 1 once the slot is written (stored last: the commit)
      SLOT_TSC     rdtscp at the hit
      SLOT_TID     the thread id (4 bytes), then TSC_AUX (4 bytes: node << CPU_BITS | cpu)
      SLOT_PROBE   the probe id (8 bytes, the upper 4 zero)
      SLOT_VALUES  the recorded words (registers, then stack words), MAX_WORDS at most

A ring has long slots (SLOT_BYTES, SLOTS of them: `LONG`) or short ones
(half the size, twice as many, 4 words each: `SHORT`), for probes that
record little: a record's bytes are what the reader copies to disk, and
what the program's cache writes back. A run that copies stacks (`STACKS`)
has big slots: STACK_WORDS words, then from SLOT_COPY to the slot's end
the bytes copied from the stack pointer up (the reader takes them as one
bytes value; how many were copied is the last of the words).

A counter block (trap-free counting) holds COUNTER_BLOCK_BYTES of 8-byte
counters, one every COUNTER_STRIDE bytes; the first line is its header
(COUNTER_TLS, as TIMING_TLS: a filter on the tid reads it as timing does).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# ---------------------------------------------------------------- the ring's header

HEAD = 0
TAIL = 64
LOST = 128
STALLED = 192
WAITERS = 256
COMMITTED = 320
HEARTBEAT = 384
RING_TLS = 448  # 1 once the tracer saw the tid at the thread pointer (as TIMING_TLS)
SLOT_SIZE = 512
PY_SEALED = 576  # hits whose Python walk made no system call: the seccomp word moved
DATA_OFFSET = 4096  # the header's page

SECCOMP_OPEN = 1
"""The seccomp word (sandboxes.py) while code in the program may make its
system calls; any other value (0 once a traced process entered a call that
may install a filter, or the zero page left at detach) closes them."""

# ---------------------------------------------------------------- a slot

SLOTS = 32768  # a power of two: an index to its slot is a mask
SLOT_BYTES = 128
SLOT_SHIFT = SLOT_BYTES.bit_length() - 1  # a slot's index to its offset
SLOT_SEQ = 0
SLOT_TSC = 8
SLOT_TID = 16
SLOT_AUX = 20
SLOT_PROBE = 24
SLOT_VALUES = 32
MAX_WORDS = (SLOT_BYTES - SLOT_VALUES) // 8
RING_BYTES = DATA_OFFSET + SLOTS * SLOT_BYTES

RECORD = struct.Struct(f"<QQIIII{MAX_WORDS}Q")
"""One slot as the reader unpacks it; the REC_* names index the tuple."""
REC_SEQ, REC_TSC, REC_TID, REC_AUX, REC_PROBE, REC_PROBE_HIGH, REC_VALUES = range(7)


@dataclass(frozen=True)
class RingShape:
    """A ring's slots: `slot_bytes` each (a power of two), `slots` of them,
    in `ring_bytes` (RING_BYTES unless the slots are too big for enough
    of them there)."""

    slot_bytes: int
    copy: int = 0  # bytes at the slot's end that hold a copy of memory (SLOT_COPY on)
    ring_bytes: int = RING_BYTES

    @property
    def slots(self) -> int:
        return (self.ring_bytes - DATA_OFFSET) // self.slot_bytes

    @property
    def shift(self) -> int:
        """A slot's index to its offset."""
        return self.slot_bytes.bit_length() - 1

    @property
    def words(self) -> int:
        """The values a record holds."""
        return (self.slot_bytes - SLOT_VALUES - self.copy) // 8

    @property
    def copy_offset(self) -> int:
        """Where in a slot its copy of memory starts."""
        return self.slot_bytes - self.copy

    @property
    def record(self) -> struct.Struct:
        """A slot as the reader unpacks it (RECORD's fields, `words` values,
        then the copy as one bytes value if the slots hold one)."""
        copy = f"{self.copy}s" if self.copy else ""
        return RECORD if self.slot_bytes == SLOT_BYTES else struct.Struct(
            f"<QQIIII{self.words}Q{copy}")


LONG = RingShape(SLOT_BYTES)
SHORT = RingShape(SLOT_BYTES // 2)
STACK_WORDS = 28  # the registers (16) and a probe's own values, then the count copied
STACKS = RingShape(16384, 16384 - SLOT_VALUES - 8 * STACK_WORDS)
PY_STACKS = RingShape(65536, 65536 - SLOT_VALUES - 8 * STACK_WORDS,
                      DATA_OFFSET + STACKS.slots * 65536)
"""A run that copies Python frames too (pywalk.py): after a stack copy of
8 KiB (the default), room for 185 frames (3.12, 3.13; 187 on 3.11: each a
header, a fingerprint and the head of a name); as many slots as
STACKS has (a ring of 16 MiB: with 64 slots to 4 MiB, the program waited
for the reader 3 times as often, at 4,000 hits/s against 12,800)."""
SHAPES = {shape.slot_bytes: shape for shape in (LONG, SHORT)}  # what `record` writes

CPU_BITS = 12  # TSC_AUX as Linux sets it: the NUMA node above the cpu's 12 bits
CPU_MASK = (1 << CPU_BITS) - 1

# ---------------------------------------------------------------- counting

COUNTER_BLOCK_BYTES = 64 * 1024
COUNTER_STRIDE = 64  # one cache line per counter: threads on different probes share none
COUNTER_TLS = 0      # in the header line, counter index 0 (never a counter)
NO_KEPT_VERDICTS = 1  # the byte after each block's tid flag: 1 once the tracer saw the
# family span two pid namespaces (a --comm verdict is kept by tid: not unique there)
COUNTER_UNNAMED = 8  # hits a compiled `--comm` could not decide: no name (lock inc)

# ---------------------------------------------------------------- timing (latency in the program)
# A timing block (timing.py): a header page of counters that writers bump
# with `lock inc`, then TIMING_ROWS thread rows. A thread claims a row by
# a compare-and-swap of its tid into ROW_OWNER (at tid % TIMING_ROWS, or
# one of the ROW_PROBES rows after it), and alone writes the rest of it:
# its stack of open calls and its own histogram per timed function, so
# threads share no cache line and need no atomic increment.

TIMING_NOROW = 0       # calls not timed: every row the thread could claim was taken
TIMING_DEEP = 64       # entries not kept: the thread's stack of open calls was full
TIMING_UNPAIRED = 128  # returns whose entry is not on the thread's stack
TIMING_TLS = 192       # 1 once the tracer saw the tid at the thread pointer (glibc's
                       # struct pthread): read there, else by a gettid system call
TIMING_ABANDONED = 256  # open calls dropped: left by longjmp, an exception or a tail call
TIMING_UNKEYED = 320   # calls keyed by a fetched value (`latency --by ARG`) whose (function,
                       # key) found no place in the table of keyed histograms
TIMING_UNNAMED = 384   # calls a compiled `--comm` could not decide at entry: no name
TIMING_ROWS_OFFSET = 4096
TIMING_ROWS = 128      # a power of two
ROW_PROBES = 8          # rows a thread may claim from its tid on (a dead thread's row is freed
                       # when uprobes sees the exit, which may come late)
ROW_OWNER = 0          # the owning thread's tid (4 bytes), 0: free
ROW_CLAIMED = 8        # 1 once any thread claimed the row (the reader reads only these)
ROW_DEPTH = 16         # how many open calls the stack holds
ROW_STACK = 64         # the open calls, oldest first: (stack pointer, TSC, key, unused) each
ENTRY_BYTES = 32       # a power of two: a depth to its entry is a shift
ENTRY_SHIFT = ENTRY_BYTES.bit_length() - 1
ENTRY_SP, ENTRY_TSC, ENTRY_KEY = 0, 8, 16  # the key (--by): 16 bytes, a value fetched at
                                           # entry and 0, or the thread's name (comm)
STACK_DEPTH = 60
ROW_HISTS = ROW_STACK + STACK_DEPTH * ENTRY_BYTES  # the row's histograms, one per timed function
TIMED_FUNCS = 64       # timed functions per block
HIST_SUB_BITS = 5      # 32 linear sub-buckets per power of two: a bucket is within 1/32
HIST_BUCKETS = (40 - HIST_SUB_BITS + 1) << HIST_SUB_BITS  # values up to HIST_MAX_TICKS
HIST_BYTES = HIST_BUCKETS * 8
HIST_MAX_TICKS = (1 << 40) - 1  # a longer call counts in the last bucket
ROW_BYTES = ROW_HISTS + TIMED_FUNCS * HIST_BYTES
# The keyed histograms (`latency --by ARG`): one bounded open-addressing table
# for the block, shared by its threads (so its buckets take `lock inc`). An
# entry is claimed as a keyed count's (free 0, claimed 1, ready 2) for one
# (function, key) and holds that pair's histogram.
TIMING_KEYED_OFFSET = TIMING_ROWS_OFFSET + TIMING_ROWS * ROW_BYTES
KEYED_HISTS = 1024     # a power of two
KEYED_HIST_PROBES = 8  # places tried from the pair's hash
KH_STATE = 0
KH_FUNC = 8
KH_KEY = 16            # 16 bytes, as ENTRY_KEY
KH_HIST = 64
KH_BYTES = KH_HIST + HIST_BYTES
TIMING_BYTES = TIMING_KEYED_OFFSET + KEYED_HISTS * KH_BYTES


def hist_bucket(ticks: int) -> int:
    """The bucket of a duration in TSC ticks, as the generated code computes it."""
    v = min(ticks, HIST_MAX_TICKS)
    if v < 1 << HIST_SUB_BITS:
        return v
    k = v.bit_length() - 1 - HIST_SUB_BITS
    return (k << HIST_SUB_BITS) + (v >> k)


def hist_bounds(bucket: int) -> tuple[int, int]:
    """The [lo, hi] ticks bucket `bucket` holds."""
    if bucket < 1 << HIST_SUB_BITS:
        return bucket, bucket
    k = (bucket >> HIST_SUB_BITS) - 1
    m = bucket - (k << HIST_SUB_BITS)
    return m << k, ((m + 1) << k) - 1

# ---------------------------------------------------------------- keyed counts (count --by)
# A keyed block (keyed.py): a header page (KEYED_TLS as TIMING_TLS, so the
# same code reads the tid), then KEYED_TABLES tables, one per keyed probe:
# an overflow counter on its own line, then KEY_ENTRIES entries of one cache
# line each. An entry is free (state 0), claimed (1) or ready (2). A key is
# 16 bytes (KEY_KEY, KEY_KEY2): a value and 0, or a thread's name.

KEYED_TLS = TIMING_TLS
KEYED_UNNAMED = 256  # as COUNTER_UNNAMED, for the keyed counts
KEYED_TABLES_OFFSET = 4096
KEYED_TABLES = 16
TABLE_OVERFLOW = 0     # hits whose key found no place (writers: lock inc)
TABLE_ENTRIES = 64
KEY_ENTRIES = 4096     # a power of two
KEY_PROBES = 8         # places tried from the key's hash
KEY_ENTRY_BYTES = 64
KEY_STATE = 0
KEY_KEY = 8
KEY_COUNT = 16
KEY_SUM = 24
KEY_MIN = 32
KEY_MAX = 40
KEY_KEY2 = 48          # the key's second word: the rest of a comm (`--by comm`), else 0
TABLE_BYTES = TABLE_ENTRIES + KEY_ENTRIES * KEY_ENTRY_BYTES
KEYED_BYTES = KEYED_TABLES_OFFSET + KEYED_TABLES * TABLE_BYTES
