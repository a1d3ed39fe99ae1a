"""The kernel engine's reading of a perf ring: its records found in runs.

A busy probe fills its ring with records alike but for their numbers;
`read_runs` finds such runs by comparing columns of words in C
(`agreeing`) instead of reading headers one by one in Python, and the
fast path to lines (lines.py) unpacks each run with one struct call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from uprobes.sys.perf import PERF_RECORD_SAMPLE
from uprobes.sys.perf_ring import RECORD_HEADER, RingBuffer


def _alike(data: bytes, pos: int, nxt: int, alike: tuple[int, ...]) -> bool:
    """Whether the records at `pos` and `nxt` agree in their header and the
    u16s at `alike` (within them): tried before `agreeing`, so records
    that alternate cost a few compares."""
    if data[pos:pos + 8] != data[nxt:nxt + 8]:
        return False
    for k in alike:
        if data[pos + k:pos + k + 2] != data[nxt + k:nxt + k + 2]:
            return False
    return True


def phase_offsets(data: bytes, pos: int, period: int) -> list[int]:
    """Where each of the `period` records from `pos` starts, and (last) where
    the period ends: a periodic run's records lie at these plus multiples
    of the period's length."""
    offsets = [0]
    for _ in range(period):
        offsets.append(offsets[-1] + RECORD_HEADER.unpack_from(data, pos + offsets[-1])[2])
    return offsets


def _periodic(data: bytes, pos: int, end: int, alike: tuple[int, ...], reach: int,
              words: Sequence[tuple[int, int]], periods: int) -> tuple[int, int, int]:
    """(count, period, stride) of the records from `pos` that each agree with
    the one `period` records before (2 <= period <= `periods`; at least two
    periods; `stride`: a period's bytes), or (1, 1, 0). Each phase (every
    `period`-th record) has one header, so one size: its records lie
    `stride` apart, a column for `agreeing`."""
    offsets = [0]
    for period in range(1, periods + 1):
        at = pos + offsets[-1]
        if at + 8 > end:
            break
        rtype, _misc, rsize = RECORD_HEADER.unpack_from(data, at)
        if rtype != PERF_RECORD_SAMPLE or rsize < reach or rsize % 8 or at + rsize > end:
            break
        offsets.append(offsets[-1] + rsize)
        stride = offsets[-1]
        if period < 2 or pos + 2 * stride > end:
            continue
        if not all(_alike(data, pos + o, pos + o + stride, alike) for o in offsets[:-1]):
            continue
        count = (end - pos) // stride * period
        for k in range(period):
            first = pos + offsets[k]
            most = (end - first - (offsets[k + 1] - offsets[k])) // stride + 1
            n = agreeing(data, first, stride, most, words)
            count = min(count, k + n * period)
        if count >= 2 * period:
            return count, period, stride
    return 1, 1, 0


_CASTS: dict[int, Literal["H", "I", "Q"]] = {2: "H", 4: "I", 8: "Q"}


def agreeing(data: bytes, pos: int, size: int, most: int, words: Sequence[tuple[int, int]],
             window: int = 1) -> int:
    """How many records of `size` bytes from `pos` (at most `most`) agree
    with the first in each word `(offset, width)` (from a record's start;
    width 2, 4 or 8, offset a multiple of it, `pos` and `size` too).

    A column of words, `words[first::size]` of the batch cast to words, is
    one word of each record; copied out, it equals the first record's word
    repeated when every record agrees: one memcmp in C (a column of single
    bytes is no faster than reading headers in Python). The first check
    spans `window` records, growing 4x while all agree, then halving onto
    the first record that does not."""
    with memoryview(data) as view:
        casts = {w: view.cast(_CASTS[w]) for w in {w for _, w in words}}
        columns = [(casts[w], (pos + k) // w, size // w) for k, w in words]
        firsts = [col[at:at + 1].tobytes() for col, at, _ in columns]

        def agree(first: int, n: int) -> bool:
            return all(col[at + first * step:at + (first + n) * step:step].tobytes() == w * n
                       for (col, at, step), w in zip(columns, firsts))

        count, n, grow = 1, min(max(1, window), most - 1), True
        while n:
            if agree(count, n):
                count += n
                n = min(n * 4 if grow else n, most - count)
            else:
                grow = False
                n //= 2
        for col in casts.values():
            col.release()
    return count


def read_runs(ring: RingBuffer, alike: tuple[int, ...] = (), periods: int = 1,
              ) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """Everything the kernel wrote to `ring` since the last read (one
    `RingBuffer.take`), as runs of alike samples.

    Returns the bytes from `data_tail` to `data_head` and its
    PERF_RECORD_SAMPLEs as runs `(start, count, stride, period)`:
    `count` records from `start`, each agreeing with the one `period`
    records before it in its header and in the u16 at each offset in
    `alike` (from a record's start, even). Period 1 is a run of alike
    records of `stride` bytes (header included), one
    `struct.iter_unpack` unpacks it; a period up to `periods` is
    records that alternate (an entry probe and its return: period 2),
    `period` runs interleaved, a period `stride` bytes long (where its
    records start: `phase_offsets`).
    The records of a busy probe come in long runs, found by comparing
    columns of words in C (`agreeing`), not by walking headers one by
    one in Python.
    Other records go to `ring.account` (PERF_RECORD_LOST summed into
    its `lost`).
    """
    data = ring.take()
    if not data:
        return b"", []
    runs: list[tuple[int, int, int, int]] = []
    unpack = RECORD_HEADER.unpack_from
    reach = max((8, *(k + 2 for k in alike)))
    words = ((0, 8), *((k, 2) for k in alike))
    aligned = not len(data) % 8  # records are: the kernel pads each to a u64
    pos, end = 0, len(data)
    window = 1
    rest = 0  # records to go before trying a period again, after a try failed
    while pos < end:
        rtype, _misc, rsize = unpack(data, pos)
        if rsize < 8 or pos + rsize > end:
            raise ring.corrupt(rsize)
        if rtype == PERF_RECORD_SAMPLE:
            count, period = 1, 1
            most = (end - pos) // rsize
            stride = rsize
            if most > 1 and rsize >= reach and aligned:
                if _alike(data, pos, pos + rsize, alike):
                    count = window = agreeing(data, pos, rsize, most, words, window)
                elif periods > 1 and not rest:
                    count, period, stride = _periodic(data, pos, end, alike, reach, words,
                                                      periods)
                    stride = stride or rsize
                    rest = 8 if period == 1 else 0  # a mixed stream: try now and then
                else:
                    rest = max(0, rest - 1)
            runs.append((pos, count, stride, period))
            ring.samples += count
            if period == 1:
                pos += count * rsize
            else:
                pos += count // period * stride + phase_offsets(data, pos, count % period)[-1]
            continue
        ring.account(rtype, data, pos, rsize)
        pos += rsize
    return data, runs


def read_batch(ring: RingBuffer) -> tuple[bytes, list[int]]:
    """`read_runs(ring)` as the offsets of each sample's body (after its
    8-byte header); a body unpacks with the ring's `layout`, its raw record
    follows at `layout.size`."""
    data, runs = read_runs(ring)
    bodies: list[int] = []
    for start, count, size, _ in runs:
        bodies.extend(range(start + 8, start + count * size, size))
    return data, bodies  # (period 1 only: read_runs() was asked for no other)
