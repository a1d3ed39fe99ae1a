"""Line numbers from a CPython 3.11 code object's location table
(`co_linetable`, the format of CPython's Objects/locations.md).

Each entry starts with a byte whose top bit is set: bits 3-6 are its kind,
bits 0-2 the number of code units it covers minus one. The line changes by
a signed varint (kinds 13 and 14), by 0-2 (kinds 10-12) or not at all
(0-9); kind 15 covers code with no line. Varints are 6-bit groups, least
significant first, bit 6 set on every group but the last.

A table is decoded as far as a lookup needs and no further, its entries
kept (`LineTable`): each entry is decoded once whatever the lookups, and a
lookup in the decoded part is a bisection.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from itertools import accumulate, islice

_HEAD = re.compile(b"[\x80-\xff]")
"""An entry's first byte: the only bytes with the top bit set."""
_NOT_HEAD = bytes(range(128))
_CHANGES = re.compile(b"[\xe8-\xf7]")
"""Kinds 13 and 14: the line changes by a varint."""
_NO_LINE = re.compile(b"[\xf8-\xff]")
"""Kind 15: code with no line."""
_UNITS = bytes((b & 7) + 1 for b in range(256))
_DELTA = bytes(((b >> 3) & 15) - 10 if 10 <= (b >> 3) & 15 < 13 else 0 for b in range(256))
_CHUNK = 1 << 14
_VARINT_COST = 4
"""What an entry with a varint costs more, in entries: decoded byte by byte."""


def _svarint(table: bytes, i: int) -> int:
    byte = table[i]
    value, shift = byte & 63, 0
    while byte & 64:
        i += 1
        byte = table[i]
        shift += 6
        value |= (byte & 63) << shift
    return -(value >> 1) if value & 1 else value >> 1


class LineTable:
    """One code object's table, decoded on demand: `ends[k]` is the code
    unit after entry k, `lines[k]` its line (None: no line)."""

    __slots__ = ("_at", "_firstlineno", "_line", "_table", "ends", "lines")

    def __init__(self, table: bytes, firstlineno: int) -> None:
        self._table, self._firstlineno = table, firstlineno
        self._at, self._line = 0, firstlineno  # where decoding resumes, the line there
        self.ends: list[int] = []
        self.lines: list[int | None] = []

    def line(self, index: int, steps: int = -1) -> tuple[int | None, int]:
        """(the line of the code unit at `index`, the work that took: entries
        decoded, one with a varint counted as more).
        None: it has no line, or the table does not reach it (or does not
        within `steps` more entries, if not negative); before the first
        unit, `firstlineno`, as CPython's PyCode_Addr2Line says."""
        if index < 0:
            return self._firstlineno, 0
        ends = self.ends
        if not ends or index >= ends[-1]:
            decoded = self._decode(index, steps)
            if not ends or index >= ends[-1]:
                return None, decoded
        else:
            decoded = 0
        return self.lines[bisect_right(ends, index)], decoded

    def _decode(self, index: int, steps: int) -> int:
        """Decode entries until one covers `index` (or `steps` of them, give
        or take a chunk): a chunk's entries in a few passes over its bytes
        (bytes.translate, re) rather than a step per byte."""
        table, i, line = self._table, self._at, self._line
        n, ends, lines = len(table), self.ends, self.lines
        done = 0
        while i < n and (not ends or ends[-1] <= index) and (steps < 0 or done < steps):
            after = _HEAD.search(table, i + 1 + _CHUNK)
            j = after.start() if after else n
            span = table[i:j]
            heads = span.translate(None, _NOT_HEAD)
            deltas = list(heads.translate(_DELTA))
            k, counted = 0, 0  # the entry whose first byte is at `counted`
            for m in _CHANGES.finditer(span):
                done += _VARINT_COST
                k += len(span[counted:m.start()].translate(None, _NOT_HEAD))
                counted = m.start()
                try:
                    deltas[k] = _svarint(span, counted + 1)
                except IndexError:  # cut short (a table read while being written)
                    heads, deltas, j, n = heads[:k], deltas[:k], i + counted, 0
                    break
            ends.extend(islice(accumulate(heads.translate(_UNITS),
                                          initial=ends[-1] if ends else 0), 1, None))
            decoded = list(accumulate(deltas, initial=line))
            line = decoded[-1]
            first = len(lines)
            lines.extend(decoded[1:])
            for m in _NO_LINE.finditer(heads):
                lines[first + m.start()] = None
            done += len(heads)
            i = j
        self._at, self._line = i, line
        return done


def line_at(table: bytes, firstlineno: int, index: int) -> int | None:
    """The line of the code unit at `index` in `table` (LineTable.line)."""
    return LineTable(table, firstlineno).line(index)[0]
