"""A thread making one system call over and over, decoded by columns.

Such a thread fills its CPU's ring with the same two records, turn about:
raw_syscalls' entry, then its exit, each of a fixed size (a sample of a
tracepoint is as long as its raw record, which has no dynamic part here).
A run of N such pairs is a table with a fixed stride, so each field is a
column of a memoryview cast to its type, with the stride as its step, and
the rows are zipped out of the columns, with no Python code per record.
records.py hands a run here when it meets an entry and takes the records
one by one again where the run ends; the rows are the ones it would have
made, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, repeat
from typing import Literal

from uprobes.engines.kevents.decode import Syscalls
from uprobes.model.kevent import KernelRow, KernelValue, shape_of
from uprobes.sys.perf import PERF_RECORD_SAMPLE
from uprobes.sys.perf_ring import RECORD_HEADER

MIN_PAIRS = 16
"""Fewer pairs than this are left to the record by record walk."""

# Where a tracepoint sample's fields are, from the record's start (see
# records._HEAD): TID (pid, tid), TIME, CPU, then the raw record.
_PID, _TID, _TIME, _CPU = 8, 12, 16, 24
_RAW = RECORD_HEADER.size + 28
_TYPE = _RAW  # common_type: the tracepoint
_NR = _RAW + Syscalls.ID_AT
_VALUE = _RAW + Syscalls.VALUE_AT  # the entry's first argument, the exit's return value


def decode_run(data: bytes, pos: int, end: int, calls: Syscalls, comm: str,
               out: list[KernelRow]) -> tuple[int, int]:
    """At `pos` in `data` (whole records up to `end`, then at least 8 bytes
    of padding) is a sample of raw_syscalls' entry, of a thread that is not
    uprobes'. If a run of at least MIN_PAIRS entries and exits of that
    thread and one system call starts there, append its rows to `out` (`comm`: the
    thread's name): (pairs, where the run ends). Else (0, where the walk
    need not try again)."""
    header = RECORD_HEADER.unpack_from
    enter_size: int = header(data, pos)[2]
    exit_at = pos + enter_size
    if exit_at + 8 > end:
        return 0, exit_at
    exit_type, _, exit_size = header(data, exit_at)
    stride = enter_size + exit_size
    if exit_type != PERF_RECORD_SAMPLE or stride % 8 or enter_size < _VALUE + 48 \
            or exit_size < _VALUE + 8:
        return 0, exit_at
    enter_head, exit_head = data[pos:pos + 8], data[exit_at:exit_at + 8]
    starts = data.startswith
    stop = pos
    while stop + stride <= end and starts(enter_head, stop) and \
            starts(exit_head, stop + enter_size):
        stop += stride
    pairs: int = (stop - pos) // stride
    if pairs < MIN_PAIRS:
        return 0, max(stop, exit_at)
    whole = memoryview(data)

    def column(at: int, code: _Code) -> memoryview[int]:
        """The field at `at` of every pair (`at` counts from the entry's
        start), by a view that starts on it (a cast needs whole items; the
        padding covers the last pair's)."""
        size = _SIZES[code]
        skew = at % size
        return whole[pos + skew:stop + skew].cast(code)[at // size::stride // size]

    def same(col: memoryview[int], value: int) -> bool:
        values: list[int] = col.tolist()
        return values.count(value) == pairs

    pid, tid, nr = column(_PID, "I")[0], column(_TID, "I")[0], column(_NR, "q")[0]
    if not (
            same(column(_TYPE, "H"), calls.enter_id)
            and same(column(enter_size + _TYPE, "H"), calls.exit_id)
            and all(same(column(at + _PID, "I"), pid) and same(column(at + _TID, "I"), tid)
                    and same(column(at + _NR, "q"), nr) for at in (0, enter_size))):
        return 0, stop
    enter, unpack = calls.enters.get(nr) or calls.enter(nr)
    leave = calls.exits.get(nr) or calls.exit(nr)
    calls.entered[tid] = nr
    args: Iterable[tuple[KernelValue, ...]] = repeat((), pairs) if unpack is None else zip(
        *(column(_VALUE + 8 * i, "Q") for i in range(len(shape_of(enter).names))))
    entries: Iterable[KernelRow] = zip(
        column(_TIME, "Q"), repeat(pid, pairs), repeat(tid, pairs), column(_CPU, "I"),
        repeat(comm, pairs), repeat(enter, pairs), args)
    exits: Iterable[KernelRow] = zip(
        column(enter_size + _TIME, "Q"), repeat(pid, pairs), repeat(tid, pairs),
        column(enter_size + _CPU, "I"), repeat(comm, pairs), repeat(leave, pairs),
        zip(column(enter_size + _VALUE, "q")))
    out.extend(chain.from_iterable(zip(entries, exits)))
    return pairs, stop


_Code = Literal["H", "I", "q", "Q"]  # native order: what the kernel writes
_SIZES: dict[_Code, int] = {"H": 2, "I": 4, "q": 8, "Q": 8}
