"""The Python frames of one thread, read from its process's memory at a hit.

The path is the one CPython itself keeps: `_PyRuntime` (a symbol of the
executable or of libpython) -> its interpreters -> each one's thread
states, the hitting thread's found by `native_thread_id` -> its current
frame (through `cframe` up to 3.12), then each `_PyInterpreterFrame` by
`previous`: its code object gives the qualified name, the file and (from
`prev_instr`, 3.13's `instr_ptr`, through the location table) the line.
Frames are grouped by the C call of the eval loop that runs them: a group
ends at a frame marked `is_entry` (3.11) or at the C stack's own frame
(3.12 on).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from uprobes.errors import UprobesError
from uprobes.model.event import Frame
from uprobes.resolve.pylayout import Layout, PythonLayoutError, version_text
from uprobes.resolve.pyprocess import (
    MAX_STR,
    Interpreter,
    Pages,
    Read,
    find_interpreter,
    read_str,
)
from uprobes.unwind.cpython.linetable import LineTable

PyGroups = tuple[tuple[Frame, ...], ...]
"""Python frames innermost first, in groups: one per eval-loop call."""

MAX_PY_FRAMES = 256
"""Python frames shown per stack; a longer one ends in CUT (its outermost)."""
_MAX_THREADS = 4096
_MAX_INTERPRETERS = 64
# What one capture may cost, whatever the memory it reads says: bytes read
# and line-table entries decoded (a real stack needs a tiny part of either;
# a big module's table is read once, then kept with its code object).
_BUDGET_BYTES = 32 << 20
_BUDGET_ENTRIES = 1 << 19
# A location table entry covers at least one code unit and is at most 1 +
# 4 varints of 5 bytes: a table longer than this per unit is not a real one.
_TABLE_BYTES_PER_UNIT = 21
_MAX_CODE_FRAMES = 4096
"""Frames kept per code object, one per code unit hits ran at: what a
program says its frames run at is untrusted (each hit could name a new
unit), so past this they are made at each hit and not kept."""
_ACTIVE = 1 << 4
"""`_status.active` (3.12, 3.13): the thread state its thread runs now."""

CUT = Frame(0, None, "...", python=True)
"""Where a stack's Python frames were cut: over MAX_PY_FRAMES, over what
one capture may read, or where the chain cannot be followed (a `previous`
that cannot be read, or that leads back into the chain: a loop)."""
BAD = Frame(0, None, "<bad frame>", python=True)
"""A frame whose code object cannot be read at the hit, or claims sizes no
code object has (a program writing over its interpreter's state): its
callers are still shown."""
GONE = Frame(0, None, "<freed code>", python=True)
"""A trap-free hit's frame whose code object was freed (or its process
ended) before it was named: its callers are still shown."""


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 8], "little")


def _i32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 4], "little", signed=True)


def _exe(pid: int) -> tuple[int, int] | None:
    """The program `pid` runs, as (device, inode): another after an exec."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class _Code:
    fingerprint: bytes
    filename: str
    qualname: str
    firstlineno: int
    firsttraceable: int
    units: int
    table: LineTable
    addr: int
    frames: dict[int, Frame]

    def frame(self, index: int, budget: _Budget) -> Frame:
        """The frame running code unit `index` (made once per unit)."""
        frame = self.frames.get(index)
        if frame is None:
            line, used = self.table.line(index, max(budget.entries, 0))
            budget.entries -= used
            if line is None and budget.entries <= 0 and 0 <= index < self.units:
                raise _OverBudget  # undecided: not kept
            frame = Frame(self.addr, self.filename, self.qualname, line=line, python=True)
            if len(self.frames) < _MAX_CODE_FRAMES:
                self.frames[index] = frame
        return frame


class _OverBudget(UprobesError):
    """A capture read or decoded what it may."""


class _Bad(UprobesError):
    """A code object that claims what none has (a line table longer than a
    whole capture may read): the frame is BAD, its callers go on."""


class _Gone(UprobesError):
    """A frame's code object, copied at the hit, cannot be named now (freed
    since, or its process gone): the frame is GONE, its callers go on."""


class _Budget:
    """What is left of one capture's reads (bytes) and decoding (entries),
    its reads counted on the way."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self.bytes, self.entries = _BUDGET_BYTES, _BUDGET_ENTRIES

    def __call__(self, addr: int, n: int) -> bytes:
        if n > self.bytes:
            raise _OverBudget
        self.bytes -= n
        return self._read(addr, n)


class PythonStacks:
    """Reads the Python frames of hitting threads, for a run over many
    processes: each process's interpreter is found once (and again after
    it changes, an exec), code objects are decoded once per process.
    `note` gets one line per process whose frames cannot be read."""

    def __init__(self, note: Callable[[str], object]) -> None:
        self._note = note
        self._interps: dict[int, Interpreter | None] = {}
        self._tstates: dict[tuple[int, int], tuple[int, int]] = {}  # -> (head, tstate)
        self._codes: dict[tuple[int, int], _Code] = {}
        self._noted: set[int] = set()
        self._exes: dict[int, tuple[int, int] | None] = {}  # the program each was looked in
        self.parents: dict[int, int] = {}  # a fork child -> the process it was forked from

    def forked(self, parent: int, child: int) -> None:
        """`child` was forked from `parent`: the same interpreter at the same
        addresses (its hits are named even after it has ended, from its
        parent's code objects where their fingerprints agree)."""
        if parent in self._interps:
            self._interps[child] = self._interps[parent]
            self._exes[child] = self._exes.get(parent)
        self.parents[child] = parent

    def _interpreter(self, pid: int, read: Read) -> Interpreter | None:
        interp = self._interps.get(pid)
        if interp is not None:
            try:  # still the same program (not exec'd since)
                if int.from_bytes(read(interp.version_addr, 4), "little") == interp.hexversion:
                    return interp
            except UprobesError:
                pass
        elif pid in self._interps and self._exes.get(pid) == _exe(pid):
            return None  # none in it, and no exec since
        return self.prepare(pid)

    def interpreter(self, pid: int, read: Read) -> Interpreter | None:
        """`pid`'s interpreter (found once, and again after an exec)."""
        return self._interpreter(pid, read)

    def prepare(self, pid: int) -> Interpreter | None:
        """Find `pid`'s interpreter and its layout now (before its threads
        are stopped at hits: the first time costs seconds on a big build)."""
        try:
            interp = find_interpreter(pid)
        except PythonLayoutError as e:
            interp = None
            self._tell(pid, f"process {pid}: {e}; its stacks are native only")
        except UprobesError:
            interp = None
        self._interps[pid] = interp
        self._exes[pid] = _exe(pid)
        if interp is None and not os.path.exists(f"/proc/{pid}"):
            pass  # (ended before it was looked in: nothing to say of what it ran)
        elif interp is None:
            self._tell(pid, f"process {pid} runs no CPython interpreter that uprobes can "
                            "read: its stacks are native only")
        else:
            self._noted.discard(pid)
        for cache in (self._codes, self._tstates):  # the old program's
            for key in [k for k in cache if k[0] == pid]:
                del cache[key]
        return interp

    def _tell(self, pid: int, line: str) -> None:
        if pid not in self._noted:
            self._noted.add(pid)
            self._note(line)

    def capture(self, pid: int, tid: int, read: Read) -> PyGroups:
        """The Python frames thread `tid` of `pid` runs, in eval-loop groups
        (empty: it runs none, or they cannot be read)."""
        interp = self._interpreter(pid, read)
        if interp is None:
            return ()
        budget = _Budget(read)
        try:
            return self._frames(pid, tid, Pages(budget), interp, budget)
        except UprobesError:
            return ()  # a chain being changed under us, or a thread just gone

    def _tstate(self, pid: int, tid: int, read: Read, interp: Interpreter) -> int | None:
        lay = interp.layout
        tid_at, span = lay.tstate_native_thread_id, lay.tstate_size
        head = _u64(read(interp.runtime_addr + lay.runtime_interpreters_head, 8), 0)
        known = self._tstates.get((pid, tid))
        # Kept while the process has the one interpreter it had then (a new
        # one is put at the head): with more, a thread has a state in each
        # it entered, and which one runs changes.
        if known is not None and known[0] == head:
            try:
                if _u64(read(known[1] + tid_at, 8), 0) == tid:
                    return known[1]
            except UprobesError:
                pass  # freed, its memory unmapped: look again
        self._tstates.pop((pid, tid), None)
        found: list[tuple[int, bytes]] = []
        interps, at = 0, head
        while at and interps < _MAX_INTERPRETERS:
            interps += 1
            blob = read(at, max(lay.interp_next, lay.interp_threads_head) + 8)
            ts = _u64(blob, lay.interp_threads_head)
            for _ in range(_MAX_THREADS):
                if not ts:
                    break
                state = read(ts, span)
                if _u64(state, tid_at) == tid:
                    found.append((ts, state))
                ts = _u64(state, lay.tstate_next)
            at = _u64(blob, lay.interp_next)
        if not found:
            return None
        if interps == 1 and len(found) == 1:
            self._tstates[(pid, tid)] = (head, found[0][0])
            return found[0][0]
        return self._running(found, read, lay)

    @staticmethod
    def _running(found: list[tuple[int, bytes]], read: Read, lay: Layout) -> int:
        """Of a thread's states (one per interpreter it entered), the one it
        runs: the active one (3.12 on, while it holds its interpreter), else
        the first with frames (an idle one has none)."""
        status_at = lay.fields.get("tstate_status")
        if status_at is not None:
            for ts, state in found:
                if _u64(state, status_at) & _ACTIVE:
                    return ts
        for ts, _ in found:
            frame = ts
            for hop in lay.current_frame_hops():
                frame = _u64(read(frame + hop, 8), 0)
                if not frame:
                    break
            else:
                return ts
        return found[0][0]

    def _frames(self, pid: int, tid: int, read: Read, interp: Interpreter,
                budget: _Budget) -> PyGroups:
        lay = interp.layout
        ts = self._tstate(pid, tid, read, interp)
        if ts is None:
            return ()
        frame = ts
        try:
            for hop in lay.current_frame_hops():
                frame = _u64(read(frame + hop, 8), 0)
                if not frame:
                    return ()
        except UprobesError:  # (the state's frame pointer leads nowhere)
            return ((CUT,),)
        blobs: list[bytes] = []
        seen: set[int] = set()
        size, prev_at = lay.frame_size, lay.frame_previous
        try:
            # The C stack's entry frames (3.12 on) are not shown, but are
            # bounded too: no more than one per Python frame.
            while frame and frame not in seen and len(blobs) < 2 * MAX_PY_FRAMES + 1:
                seen.add(frame)
                blobs.append(read(frame, size))
                frame = _u64(blobs[-1], prev_at)
            cut = bool(frame)  # (a frame seen: a loop)
        except UprobesError:  # (over budget, or a `previous` into nothing)
            cut = True
        return self._grouped(pid, lay, blobs, cut, read, budget,
                             lambda addr, _: read(addr, lay.code_code), BAD)

    def recorded(self, pid: int, first: int, blobs: list[bytes], heads: list[bytes | None],
                 read: Read, names: list[tuple[bytes, bytes] | None] | None = None) -> PyGroups:
        """The groups of the Python frames a probe's code copied at a hit
        (trap-free stacks, trapfree/pywalk.py): `first` the thread's
        current frame, `blobs` each frame's header from there by
        `previous` (as many as it could copy), `heads` the part of each
        one's code object a code is told by (`fingerprint`, None: not
        copied). A code object is read (`read`: the live process) only the
        first time it is seen; one whose fingerprint there is not the
        copied one (freed and another made where it was, since the hit),
        or that cannot be read (its process gone), is GONE, and its callers
        are named on. `names`: each frame's qualified name and file as
        copied at the hit (the head of each str from its `length`; None:
        not copied): a code object, cached or read, whose names are not
        these is a replacement made where the hit's was (the fingerprint,
        addresses, cannot tell), not named as it; the hit's is then named
        from the copy (line unknown) when both names were copied whole,
        else GONE."""
        # (the one seen while the probes went in: the process may be gone)
        interp = self._interps.get(pid) or self._interpreter(pid, read)
        if interp is None:
            return ()
        lay = interp.layout
        fp_lo, fp_hi = fingerprint(lay)
        chain: list[bytes] = []
        seen, frame = {first}, first
        for blob in blobs:
            chain.append(blob)
            frame = _u64(blob, lay.frame_previous)
            if frame in seen:  # (a loop: cut)
                break
            seen.add(frame)
        at = {_u64(b, lay.frame_code): h for b, h in zip(blobs, heads, strict=True)
              if h is not None}
        strs = StrHead.of(lay)
        told = {_u64(b, lay.frame_code): n for b, n in zip(blobs, names or [], strict=False)
                if n is not None}

        def same(addr: int, code: _Code) -> bool:
            copy = told.get(addr)
            return copy is None or (_told(code.qualname, copy[0], strs)
                                    and _told(code.filename, copy[1], strs))

        def lost(addr: int) -> Frame:
            copy = told.get(addr)
            texts = None if copy is None else (_text(copy[0], strs), _text(copy[1], strs))
            if texts is None or texts[0] is None or texts[1] is None:
                return GONE
            return Frame(addr, texts[1], texts[0], python=True)

        def head(addr: int, cached: _Code | None) -> bytes:
            copied = at.get(addr)
            if copied is None:
                raise _OverBudget  # (not copied: the stack ends here)
            if cached is not None and cached.fingerprint == copied and same(addr, cached):
                return b"\0" * fp_lo + copied  # a cached one is checked by these
            try:
                live = read(addr, lay.code_code)
            except UprobesError:
                raise _Gone from None
            if live[fp_lo:fp_hi] != copied:
                raise _Gone
            return live
        budget = _Budget(read)
        try:
            return self._grouped(pid, lay, chain, bool(frame), budget, budget, head, GONE,
                                 same, lost)
        except UprobesError:
            return ((CUT,),)

    def _grouped(self, pid: int, lay: Layout, blobs: list[bytes], cut: bool, read: Read,
                 budget: _Budget, head_of: Callable[[int, _Code | None], bytes],
                 unreadable: Frame,
                 same: Callable[[int, _Code], bool] = lambda _a, _c: True,
                 lost: Callable[[int], Frame] | None = None) -> PyGroups:
        """`blobs` (frame headers, innermost first; `cut`: the chain goes on
        past them) as frames in eval-loop groups; `head_of(code address,
        its cached code)` reads a code object's fields up to its code, `read`
        the rest of a code object seen first; a frame whose code object
        cannot be read is `unreadable` (BAD at the hit, GONE after it), one
        whose code object claims absurd sizes BAD; `same(code address,
        code)`: whether the code is the frame's, else the frame is
        `lost(code address)` (or `unreadable`)."""
        groups: list[tuple[Frame, ...]] = []
        group: list[Frame] = []
        shown = 0
        code_at, instr_at, owner_at = lay.frame_code, lay.frame_prev_instr, lay.frame_owner
        generator, code_start = lay.owned_by_generator, lay.code_code
        # 3.11 flags the outermost Python frame of an eval-loop call; from
        # 3.12 a frame of the C stack's own sits below it (no code to name).
        apart = lay.entry_frames_apart
        entry_at = lay.owned_by_cstack if apart else lay.frame_is_entry
        # The code object's fields we name it by, which never change once it
        # is made: read at each hit, they tell a cached code object from a
        # new one made where a freed one was.
        fp_lo, fp_hi = fingerprint(lay)
        codes = self._codes
        try:
            for blob in blobs:
                if shown >= MAX_PY_FRAMES:
                    cut = True
                    break
                if apart and blob[owner_at] == entry_at:
                    groups.append(tuple(group))
                    group = []
                    continue
                code_addr = _u64(blob, code_at)
                code = codes.get((pid, code_addr))
                try:
                    head = head_of(code_addr, code)
                    if code is None or code.fingerprint != head[fp_lo:fp_hi] or \
                            not same(code_addr, code):
                        code = codes[(pid, code_addr)] = self._code(
                            code_addr, head, head[fp_lo:fp_hi], read, lay)
                        if not same(code_addr, code):
                            raise _Gone  # (a replacement: kept, for its own hits)
                except _OverBudget:
                    raise
                except UprobesError as e:  # (_Gone, _Bad, or its strings unreadable)
                    group.append(BAD if isinstance(e, _Bad) else
                                 lost(code_addr) if lost is not None else unreadable)
                    shown += 1
                    if not apart and blob[entry_at]:
                        groups.append(tuple(group))
                        group = []
                    continue
                index = (_u64(blob, instr_at) - (code_addr + code_start)) // 2
                # A frame being set up has not reached its first traceable
                # instruction; CPython leaves it out of tracebacks too. But the
                # innermost one at a py: function's entry (the eval loop's
                # RESUME) is the function being called: shown at its first
                # line. Not a shim (3.13's `__init__` cleanup), whose code
                # has no traceable instruction at all.
                if blob[owner_at] == generator or index >= code.firsttraceable:
                    group.append(code.frame(index, budget))
                    shown += 1
                elif not group and not groups and code.firsttraceable < code.units:
                    group.append(code.frame(code.firsttraceable, budget))
                    shown += 1
                if not apart and blob[entry_at]:
                    groups.append(tuple(group))
                    group = []
        except _OverBudget:
            cut = True
        if cut:
            group.append(CUT)
        if group:
            groups.append(tuple(group))
        return tuple(groups)

    @staticmethod
    def _code(addr: int, blob: bytes, fp: bytes, read: Read, lay: Layout) -> _Code:
        units = _u64(blob, lay.var_size)  # a code object's size: its code units
        table_addr = _u64(blob, lay.code_linetable)
        head = read(table_addr, lay.bytes_data)
        n = min(_u64(head, lay.var_size), units * _TABLE_BYTES_PER_UNIT)
        if n > _BUDGET_BYTES:
            raise _Bad  # (more than a whole capture may read: no real table)
        firstlineno = _i32(blob, lay.code_firstlineno)
        return _Code(fp, read_str(read, _u64(blob, lay.code_filename), lay),
                     read_str(read, _u64(blob, lay.code_qualname), lay),
                     firstlineno, _i32(blob, lay.code_firsttraceable), units,
                     LineTable(read(table_addr + lay.bytes_data, n) if n else b"", firstlineno),
                     addr, {})


@dataclass(frozen=True)
class StrHead:
    """Where the head of a str, copied from its `length`, holds its state
    (`state`) and text: an ASCII one's at `ascii`, another compact one's
    (1, 2 or 4 bytes a character: the state's `kinds` bits) at `wide`."""

    state: int = 0
    ascii: int = 0
    wide: int = 0
    kinds: int = 0
    compact_mask: int = 0
    ascii_mask: int = 0

    @classmethod
    def of(cls, lay: Layout) -> StrHead:
        return cls(lay.str_state - lay.str_length, lay.str_ascii_data - lay.str_length,
                   lay.str_compact_data - lay.str_length, lay.str_kind_mask,
                   lay.str_compact_mask, lay.str_ascii_mask)

    def span(self, copy: bytes) -> tuple[int, int, int] | None:
        """The str's length, where its text starts in `copy` and its bytes
        a character; None: the copy holds no state, or the str is not one
        read_str reads (not compact, or of no known kind)."""
        if len(copy) < self.state + 4:
            return None
        state = int.from_bytes(copy[self.state:self.state + 4], "little")
        if not state & self.compact_mask or not self.kinds:
            return None
        if state & self.ascii_mask:
            return _u64(copy, 0), self.ascii, 1
        width = (state & self.kinds) >> ((self.kinds & -self.kinds).bit_length() - 1)
        return (_u64(copy, 0), self.wide, width) if width in _CODECS else None

    def text(self, copy: bytes) -> tuple[int, str, bool] | None:
        """The str's length, its text as far as `copy` holds it (decoded as
        read_str does) and whether that is all of it (its NUL after it)."""
        span = self.span(copy)
        if span is None:
            return None
        length, lo, width = span
        data = copy[lo:]
        held = min(length, len(data) // width)
        whole = held == length and data[length * width:(length + 1) * width] == \
            b"\0" * width
        return length, data[:held * width].decode(_CODECS[width], "replace"), whole


_CODECS = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}


def _told(text: str, copy: bytes, strs: StrHead) -> bool:
    """Whether `text` (a name read with read_str) can be the str whose head
    `copy` is (from its `length`): its length, and its text as far as
    copied, whatever its kind (a str read_str does not read: True)."""
    got = strs.text(copy)
    if got is None:
        return True  # (nothing to tell by, or read_str says "?")
    length, prefix, _ = got
    return min(length, MAX_STR) == len(text) and text.startswith(prefix)


def _text(copy: bytes, strs: StrHead) -> str | None:
    """The text of the str whose head `copy` is (from its `length`), when
    all of it was copied (None: not so)."""
    got = strs.text(copy)
    return got[1] if got is not None and got[2] else None


def fingerprint(lay: Layout) -> tuple[int, int]:
    """The span of a code object's fields (from its start) it is told by:
    its first line, file, qualified name and line table, which never
    change once it is made."""
    named = (lay.code_firstlineno, lay.code_filename, lay.code_qualname, lay.code_linetable)
    return min(named), max(named) + 8


def interleave(native: tuple[Frame, ...], groups: PyGroups) -> tuple[Frame, ...]:
    """`native` (innermost first) with each `_PyEval_EvalFrameDefault` frame
    replaced by the Python frames it runs, group by group; groups left over
    (a native walk cut short) go at the outer end."""
    out: list[Frame] = []
    rest = list(groups)
    for frame in native:
        if rest and frame.symbol is not None and \
                frame.symbol.startswith("_PyEval_EvalFrameDefault"):
            out.extend(rest.pop(0))
            continue
        out.append(frame)
    for group in rest:
        out.extend(group)
    return tuple(out)


__all__ = ["BAD", "CUT", "PyGroups", "PythonStacks", "StrHead", "fingerprint", "interleave",
           "version_text"]
