"""String fetchargs as the kernel records them: one shared string space.

A uprobe record holds its strings after the fixed fields, and the kernel
fills that space in two passes over the arguments (trace_uprobe.c,
trace_probe_tmpl.h): first it measures every string (strnlen_user with
MAX_STRING_SIZE: 0 for a fault or a string without a NUL in 4096 bytes),
then it copies each string with what is left of the sum as its limit
(strncpy_from_user), the whole record capped at one page. When every string
is fine, each gets exactly its length; when one is too long it takes the
room of the strings after it (they become `(fault)`), and one whose inner
dereference faulted keeps pointing at the space the next string fills.
`share_string_space` replays those passes so the values match the kernel's.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

from uprobes.model.event import ArgValue

MAX_STRING_SIZE = 4096
"""PATH_MAX: the most one string fetch copies, its NUL included."""
MAX_RECORD_SIZE = 4096
"""MAX_UCB_BUFFER_SIZE (PAGE_SIZE): fixed fields plus strings of one record."""
_FIRST_READ = 256
_USER, _COMM, _FAULT, _INNER_FAULT = range(4)


class Text:
    """One string element as fetched: its bytes before any sharing-out.

    `data` is what was readable at the address (up to MAX_STRING_SIZE bytes;
    for `$comm`, the name), `nul` the index of its NUL or -1."""

    __slots__ = ("kind", "data", "nul")

    FAULT: Text
    """A string copy that always faults (an immediate string: kernel memory)."""
    INNER_FAULT: Text
    """The address of the string could not be fetched (a dereference faulted)."""

    def __init__(self, kind: int, data: bytes = b"", nul: int = -1) -> None:
        self.kind = kind
        self.data = data
        self.nul = nul

    @classmethod
    def read(cls, mem: Any, runtime_addr: int) -> Text:
        data = mem.read_upto(runtime_addr, _FIRST_READ)
        nul = data.find(b"\0")
        if nul < 0 and len(data) == _FIRST_READ:
            data = mem.read_upto(runtime_addr, MAX_STRING_SIZE)
            nul = data.find(b"\0")
        return cls(_USER, data, nul)

    @classmethod
    def comm(cls, name: str) -> Text:
        data = name.encode("utf-8", "surrogateescape")
        return cls(_COMM, data, len(data))

    @property
    def measured(self) -> int:
        """First pass: the bytes it asks for, NUL included (0: none)."""
        return self.nul + 1 if self.kind in (_USER, _COMM) else 0

    def store(self, maxlen: int) -> tuple[int, bytes | None]:
        """Second pass, fetch_store_string() with `maxlen`: (ret, bytes
        written with their NUL, or None when the location is set empty)."""
        if maxlen <= 0:
            return -errno.ENOMEM, None
        if self.kind == _COMM:  # strscpy(): truncation is an error
            if self.nul < maxlen:
                return self.nul + 1, self.data + b"\0"
            return -errno.E2BIG, None
        if self.kind == _USER:  # strncpy_from_user()
            if 0 <= self.nul < maxlen:
                return self.nul + 1, self.data[:self.nul + 1]
            if len(self.data) >= maxlen:  # no NUL within maxlen: cut, NUL last
                return maxlen, self.data[:maxlen - 1] + b"\0"
        return -errno.EFAULT, None


Text.FAULT = Text(_FAULT)
Text.INNER_FAULT = Text(_INNER_FAULT)

TextFetch = Callable[[Any, Any, Any], list[Text]]


def _decode(data: bytes, nul: int = -1) -> str:
    """As the kernel engine decodes a string: up to its first NUL."""
    if nul < 0:
        nul = data.find(b"\0")
    return (data[:nul] if nul >= 0 else data).decode("utf-8", "backslashreplace")


def _decode_all(elems: list[Text]) -> list[str | None]:
    """An array's strings, each decoded whole (typed as an `ArgValue` list)."""
    return [_decode(t.data, t.nul) for t in elems]


TextArg = tuple["str | None", bool, list[Text]]
"""(name, is an array, elements); a hidden field is named None: it takes its
share of the space and is left out of the values."""


def share_string_space(texts: Sequence[TextArg], fixed_size: int) -> dict[str, ArgValue]:
    """The string arguments' values, in order. `fixed_size` is the record's
    fixed part (every argument's field, strings as u32 locations)."""
    total = 0
    for _, _, elems in texts:
        for t in elems:
            if t.nul < 0 or t.kind > _COMM:
                return _replay(texts, _room(texts, fixed_size))
            total += t.nul + 1
    if total > MAX_RECORD_SIZE - fixed_size:
        return _replay(texts, _room(texts, fixed_size))
    # The common case: every string is whole and they all fit.
    return {name: _decode_all(elems) if is_array else _decode(elems[0].data, elems[0].nul)
            for name, is_array, elems in texts if name is not None}


def _room(texts: Sequence[TextArg], fixed_size: int) -> int:
    """First pass (__get_data_size): what the strings ask for, capped by
    the record's page; an argument whose inner dereference faulted asks 0."""
    measured = sum(0 if any(t.kind == _INNER_FAULT for t in elems)
                   else sum(t.measured for t in elems) for _, _, elems in texts)
    return min(measured, MAX_RECORD_SIZE - fixed_size)


def _value(is_array: bool, values: list[str | None]) -> ArgValue:
    return values if is_array else values[0]


def _replay(texts: Sequence[TextArg], room: int) -> dict[str, ArgValue]:
    """store_trace_args() on a model of the string space: locations are
    (length, offset) pairs, and may point at what a later argument writes."""
    space = bytearray(2 * MAX_RECORD_SIZE)
    pos, maxlen = 0, room
    locs: list[list[tuple[int, int]]] = []
    for _, is_array, elems in texts:
        loc = (maxlen, pos)
        arg_locs: list[tuple[int, int]] = []
        total, failed = 0, False
        for i, t in enumerate(elems):
            if t.kind == _INNER_FAULT:
                # process_fetch_insn_bottom() returns at once: this location
                # stays as set, the later elements' are never written.
                arg_locs += [loc] + [(0, 0)] * (len(elems) - i - 1)
                failed = True
                break
            ret, data = t.store(loc[0])
            if data is not None:
                start = max(loc[1], 0)
                space[start:start + len(data)] = data
                arg_locs.append((ret, loc[1]))
            else:
                arg_locs.append((0, loc[1]))
            if is_array:  # the array loop counts a failed element as 0 bytes
                ret = max(ret, 0)
                loc = (loc[0] - ret, loc[1] + ret)  # update_data_loc()
            total += ret
        if not failed and total > 0:
            pos += total
            maxlen = max(maxlen - total, 0)
        locs.append(arg_locs)
    return {name: _value(is_array, [None if n <= 0 else _decode(bytes(space[max(o, 0):o + n]))
                                    for n, o in arg_locs])
            for (name, is_array, _), arg_locs in zip(texts, locs) if name is not None}
