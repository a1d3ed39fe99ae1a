"""A `py:` function's guard in the form the program's own code can test.

A `py:` probe sits in the interpreter's eval loop, where every Python call
passes, and its guard (`ResolvedProbe.guard`, a condition on fetched
strings) keeps the calls of one function. Tested at a stop, every other
function's call pays for the stop. `PyGuard` says the same thing as the
text guard, as reads and compares: the frame's code object, its
`co_qualname` and `co_filename` as CPython strings (compact ASCII: the
length in the object, the bytes after its header), each compared with
constant text. The trap-free engine compiles it into the jump's code
(engines/trapfree/pyguard.py), so a call of another function costs a few
loads and a compare.

The reads are safe where the guard is placed: the handler itself loads
`frame->f_code`, a live frame's code object is live, and its
`co_qualname` and `co_filename` are always str objects; every byte
compared lies within the string's length, which is read first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Match(Enum):
    EXACT = "=="
    PREFIX = "prefix"
    SUFFIX = "suffix"


@dataclass(frozen=True)
class TextTest:
    """A string is `text`, starts with it, or ends with it."""

    text: str
    match: Match


@dataclass(frozen=True)
class Alternative:
    """One reading of MODULE.QUALNAME: this qualname, in a file that passes
    any of `files` (none: any file)."""

    qualname: TextTest
    files: tuple[TextTest, ...]


@dataclass(frozen=True)
class PyGuard:
    """Registers are the kernel's names (`bx`, `r15`); offsets are bytes."""

    frame: str
    frame_code: int
    code_qualname: int
    code_filename: int
    str_state: int
    str_state_mask: int
    """compact | ascii: the bits of `state` a string read this way has set."""
    str_length: int
    str_data: int
    alternatives: tuple[Alternative, ...]
    oparg: str | None = None
    """An entry's: the register holding `next_instr`, whose oparg byte (at
    +1) must be 0 (a call starts, not a generator resumes)."""
    resumed: bool = False
    """With `oparg`: the oparg must not be 0 instead (a generator or
    coroutine resumed after a yield or an await: `%resume`)."""
    prev_instr: int | None = None
    """Where the eval loop is left or resumed with an exception (pyexits.py):
    the offset of the frame's `prev_instr`, whose opcode (the byte it
    points to) `prev_ops` tests."""
    prev_ops: tuple[int, ...] = ()
    prev_kept: bool = False
    """True: the opcode must be one of `prev_ops`; False: none of them."""
    code_start: int | None = None
    """With `prev_instr`: the offset in its code object that a frame's
    `prev_instr` points to before it ran (just before the code's first
    instruction; 3.13's `instr_ptr`: at it)."""
