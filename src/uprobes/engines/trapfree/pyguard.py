"""A `py:` function told apart in the program: its guard as the jump's code.

A `py:` probe's jump sits on an eval-loop handler every Python call runs.
The code it jumps to tests the guard (model/pyguard.py) and counts the
calls that pass:

    (entry) rdx = NEXT;  cmp byte [rdx+1], 0;  jne done   ; a call, not a resume
    (exit_unwind, resume_with_error) rdx = [FRAME+prev_instr];
        cmp byte [rdx], OP; je/jne done                     ; the frame's last opcode
    rsi = FRAME;  rsi = [rsi+f_code]
    rdi = [rsi+co_qualname]
    for each reading of MODULE.QUALNAME:
        the string at rdi is compact ASCII, its length fits, its bytes
        (from the start, or from the end) equal the text, else next reading;
        rcx = [rsi+co_filename], and the same for each file test
    pass: lock inc the counter
    (the next function's tests, when several are probed at the handler)
    done: ...

For probes that do more than count (trace, latency, stacks), the code that
passes restores every register and flag and executes an `int3` instead
(`trap_prologue`): the tracer takes it as a hit of the probe, so only the
probed functions' calls stop. Most calls fail at the qualname's length or
first bytes: a few loads and compares. A string's bytes are read only
below its length, which is read first, and only from a string that says
it is compact ASCII, so no read leaves the object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from iced_x86 import Code, Instruction
from iced_x86 import Register as R

from uprobes.engines.trapfree.keyed import Source, load
from uprobes.engines.trapfree.timing import _Asm, _enter, _leave, _locked_inc, _mem
from uprobes.model.pyguard import Match, PyGuard, TextTest


def _reg(kernel_name: str) -> Source:
    """A register named as the kernel does (`bx`, `r15`) as a Source."""
    return Source(kernel_name if kernel_name.startswith("r") else "r" + kernel_name)


def counting_prologue(at: int, counted: Sequence[tuple[PyGuard, int]]) -> bytes:
    """The code at `at` that tests each guard of `counted` (all of one site:
    the same registers and offsets) and adds one to its counter (the
    address beside it) for each call it keeps."""
    a = _Asm()
    frame = _enter(a)
    _code_object(a, counted[0][0], frame)
    for guard, counter in counted:
        passed, missed = a.fresh("pass"), a.fresh("miss")
        _kept(a, guard, passed, missed)
        a.label(passed)
        a(_locked_inc(counter))
        a.label(missed)
    _leave(a)
    return a.encode(at)


def trap_prologue(at: int, guards: Sequence[PyGuard]) -> bytes:
    """The code at `at` that stops the thread (an `int3`, TRAP_FROM_END
    bytes before its end, with every register and flag as at the probe) when any of `guards`
    keeps the call, and else goes on: only the probed functions' calls
    stop, and the tracer resumes the thread right after the int3."""
    a = _Asm()
    frame = _enter(a)
    _code_object(a, guards[0], frame)
    for guard in guards:
        missed = a.fresh("miss")
        _kept(a, guard, "stop", missed)
        a.label(missed)
    _leave(a)
    a.jump(Code.JMP_REL32_64, "out")
    a.label("stop")
    _leave(a, label=None)
    a(Instruction.create(Code.INT3))
    a.label("out")
    a(Instruction.create(Code.NOPD))  # (a label needs an instruction)
    return a.encode(at)


TRAP_FROM_END = 2
"""The int3 of `trap_prologue`'s code is this many bytes before its end."""


def _code_object(a: _Asm, guard: PyGuard, frame: int) -> None:
    """rsi = the frame's code object, rdi = its qualname; a resumed
    generator or coroutine (RESUME's argument not 0) goes to "done" (a
    call does, for a guard that keeps resumptions)."""
    i = Instruction
    if guard.oparg is not None:
        load(a, _reg(guard.oparg), R.RDX, frame, 0)
        a(i.create_mem_i32(Code.CMP_RM8_IMM8, _mem(R.RDX, 1), 0))
        a.jump(Code.JE_REL32_64 if guard.resumed else Code.JNE_REL32_64, "done")
    if guard.prev_instr is not None:
        # (the opcode of the frame's last instruction: rdx = frame->prev_instr)
        load(a, _reg(guard.frame), R.RDX, frame, 0)
        a(i.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _mem(R.RDX, guard.prev_instr)))
        if guard.code_start is not None:  # prev_instr == code + code_start: never ran
            load(a, _reg(guard.frame), R.RSI, frame, 0)
            a(i.create_reg_mem(Code.MOV_R64_RM64, R.RSI, _mem(R.RSI, guard.frame_code)),
              i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RSI, guard.code_start)),
              i.create_reg_reg(Code.CMP_R64_RM64, R.RDX, R.RSI))
            a.jump(Code.JE_REL32_64, "done")
        kept = a.fresh("op")
        for op in guard.prev_ops:
            a(i.create_mem_i32(Code.CMP_RM8_IMM8, _mem(R.RDX, 0), op))
            a.jump(Code.JE_REL32_64, kept if guard.prev_kept else "done")
        if guard.prev_kept:
            a.jump(Code.JMP_REL32_64, "done")
        a.label(kept)
    load(a, _reg(guard.frame), R.RSI, frame, 0)
    a(i.create_reg_mem(Code.MOV_R64_RM64, R.RSI, _mem(R.RSI, guard.frame_code)),
      i.create_reg_mem(Code.MOV_R64_RM64, R.RDI, _mem(R.RSI, guard.code_qualname)))


def _kept(a: _Asm, guard: PyGuard, passed: str, missed: str) -> None:
    """To `passed` if `guard` keeps the call (rsi, rdi as `_code_object`
    leaves them), else to `missed`."""
    i = Instruction
    for alt in guard.alternatives:
        other = a.fresh("reading")
        _text(a, guard, R.RDI, alt.qualname, other)
        if alt.files:
            a(i.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _mem(R.RSI, guard.code_filename)))
            for test in alt.files:
                nxt = a.fresh("file")
                _text(a, guard, R.RCX, test, nxt)
                a.jump(Code.JMP_REL32_64, passed)
                a.label(nxt)
            a.jump(Code.JMP_REL32_64, other)
        else:
            a.jump(Code.JMP_REL32_64, passed)
        a.label(other)
    a.jump(Code.JMP_REL32_64, missed)


def _text(a: _Asm, g: PyGuard, string: Any, test: TextTest, fail: str) -> None:
    """Go on when the str object at register `string` passes `test`, else
    jump to `fail` (clobbers rax and rdx)."""
    i = Instruction
    data = test.text.encode("ascii")
    n = len(data)
    a(i.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _mem(string, g.str_state)),
      i.create_reg_u32(Code.AND_EAX_IMM32, R.EAX, g.str_state_mask),
      i.create_reg_u32(Code.CMP_EAX_IMM32, R.EAX, g.str_state_mask))
    a.jump(Code.JNE_REL32_64, fail)
    a(i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(string, g.str_length)),
      i.create_reg_i32(Code.CMP_RM64_IMM32, R.RAX, n))
    a.jump(Code.JNE_REL32_64 if test.match is Match.EXACT else Code.JB_REL32_64, fail)
    base, start = string, g.str_data
    if test.match is Match.SUFFIX:
        a(i.create_reg_mem(Code.LEA_R64_M, R.RDX, _mem(string, g.str_data - n, R.RAX)))
        base, start = R.RDX, 0
    off = 0
    while off < n:
        left = n - off
        at = _mem(base, start + off)
        if left >= 8:
            a(i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX,
                               int.from_bytes(data[off:off + 8], "little")),
              i.create_mem_reg(Code.CMP_RM64_R64, at, R.RAX))
            off += 8
        elif left >= 4:
            a(i.create_mem_u32(Code.CMP_RM32_IMM32, at,
                               int.from_bytes(data[off:off + 4], "little")))
            off += 4
        elif left >= 2:
            a(i.create_mem_u32(Code.CMP_RM16_IMM16, at,
                               int.from_bytes(data[off:off + 2], "little")))
            off += 2
        else:
            a(i.create_mem_u32(Code.CMP_RM8_IMM8, at, data[off]))
            off += 1
        a.jump(Code.JNE_REL32_64, fail)


def prologue_size(guards: Sequence[PyGuard], trap: bool = False) -> int:
    if trap:
        return len(trap_prologue(0x10000000, guards))
    return len(counting_prologue(0x10000000, [(g, 0x10100000) for g in guards]))
