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
from uprobes.resolve.pyprocess import Interpreter, Pages, Read, find_interpreter, read_str
from uprobes.unwind.cpython.linetable import line_at

PyGroups = tuple[tuple[Frame, ...], ...]
"""Python frames innermost first, in groups: one per eval-loop call."""

MAX_PY_FRAMES = 256
_MAX_THREADS = 4096
_MAX_INTERPRETERS = 64


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
    table: bytes
    addr: int
    frames: dict[int, Frame]

    def frame(self, index: int) -> Frame:
        """The frame running code unit `index` (made once per unit)."""
        frame = self.frames.get(index)
        if frame is None:
            frame = self.frames[index] = Frame(
                self.addr, self.filename, self.qualname,
                line=line_at(self.table, self.firstlineno, index), python=True)
        return frame


class PythonStacks:
    """Reads the Python frames of hitting threads, for a run over many
    processes: each process's interpreter is found once (and again after
    it changes, an exec), code objects are decoded once per process.
    `note` gets one line per process whose frames cannot be read."""

    def __init__(self, note: Callable[[str], object]) -> None:
        self._note = note
        self._interps: dict[int, Interpreter | None] = {}
        self._tstates: dict[tuple[int, int], int] = {}
        self._codes: dict[tuple[int, int], _Code] = {}
        self._noted: set[int] = set()
        self._exes: dict[int, tuple[int, int] | None] = {}  # the program each was looked in

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
        if interp is None:
            self._tell(pid, f"process {pid} runs no CPython interpreter that uprobes can "
                            "read: its stacks are native only")
        else:
            self._noted.discard(pid)
        for key in [k for k in self._codes if k[0] == pid]:
            del self._codes[key]
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
        try:
            return self._frames(pid, tid, Pages(read), interp)
        except UprobesError:
            return ()  # a chain being changed under us, or a thread just gone

    def _tstate(self, pid: int, tid: int, read: Read, interp: Interpreter) -> int | None:
        lay = interp.layout
        tid_at, span = lay.tstate_native_thread_id, lay.tstate_size
        known = self._tstates.get((pid, tid))
        if known is not None and _u64(read(known + tid_at, 8), 0) == tid:
            return known
        head = _u64(read(interp.runtime_addr + lay.runtime_interpreters_head, 8), 0)
        for _ in range(_MAX_INTERPRETERS):
            if not head:
                break
            blob = read(head, max(lay.interp_next, lay.interp_threads_head) + 8)
            ts = _u64(blob, lay.interp_threads_head)
            for _ in range(_MAX_THREADS):
                if not ts:
                    break
                state = read(ts, span)
                if _u64(state, tid_at) == tid:
                    self._tstates[(pid, tid)] = ts
                    return ts
                ts = _u64(state, lay.tstate_next)
            head = _u64(blob, lay.interp_next)
        return None

    def _frames(self, pid: int, tid: int, read: Read, interp: Interpreter) -> PyGroups:
        lay = interp.layout
        ts = self._tstate(pid, tid, read, interp)
        if ts is None:
            return ()
        frame = ts
        for hop in lay.current_frame_hops():
            frame = _u64(read(frame + hop, 8), 0)
            if not frame:
                return ()
        groups: list[tuple[Frame, ...]] = []
        group: list[Frame] = []
        seen: set[int] = set()
        size, code_at, prev_at = lay.frame_size, lay.frame_code, lay.frame_previous
        instr_at, owner_at = lay.frame_prev_instr, lay.frame_owner
        generator, code_start = lay.owned_by_generator, lay.code_code
        # 3.11 flags the outermost Python frame of an eval-loop call; from
        # 3.12 a frame of the C stack's own sits below it (no code to name).
        apart = lay.entry_frames_apart
        entry_at = lay.owned_by_cstack if apart else lay.frame_is_entry
        # The code object's fields we name it by, which never change once it
        # is made: read at each hit, they tell a cached code object from a
        # new one made where a freed one was.
        named = (lay.code_firstlineno, lay.code_filename, lay.code_qualname, lay.code_linetable)
        fp_lo, fp_hi = min(named), max(named) + 8
        codes = self._codes
        while frame and frame not in seen and len(seen) < MAX_PY_FRAMES:
            seen.add(frame)
            blob = read(frame, size)
            if apart and blob[owner_at] == entry_at:
                groups.append(tuple(group))
                group = []
                frame = _u64(blob, prev_at)
                continue
            code_addr = _u64(blob, code_at)
            head = read(code_addr, code_start)
            code = codes.get((pid, code_addr))
            if code is None or code.fingerprint != head[fp_lo:fp_hi]:
                code = codes[(pid, code_addr)] = self._code(code_addr, head, head[fp_lo:fp_hi],
                                                            read, lay)
            index = (_u64(blob, instr_at) - (code_addr + code_start)) // 2
            # A frame being set up has not reached its first traceable
            # instruction; CPython leaves it out of tracebacks too. But the
            # innermost one at a py: function's entry (the eval loop's RESUME)
            # is the function being called: shown at its first line.
            if blob[owner_at] == generator or index >= code.firsttraceable:
                group.append(code.frame(index))
            elif not group and not groups:
                group.append(code.frame(code.firsttraceable))
            if not apart and blob[entry_at]:
                groups.append(tuple(group))
                group = []
            frame = _u64(blob, prev_at)
        if group:
            groups.append(tuple(group))
        return tuple(groups)

    @staticmethod
    def _code(addr: int, blob: bytes, fp: bytes, read: Read, lay: Layout) -> _Code:
        table_addr = _u64(blob, lay.code_linetable)
        head = read(table_addr, lay.bytes_data)
        n = min(_u64(head, lay.var_size), 1 << 20)
        return _Code(fp, read_str(read, _u64(blob, lay.code_filename), lay),
                     read_str(read, _u64(blob, lay.code_qualname), lay),
                     _i32(blob, lay.code_firstlineno), _i32(blob, lay.code_firsttraceable),
                     read(table_addr + lay.bytes_data, n) if n else b"", addr, {})


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


__all__ = ["PyGroups", "PythonStacks", "interleave", "version_text"]
