"""Latency computed in the program: call durations into histograms in shared memory.

`latency` on records pairs every entry with its return in Python: two
records a call, and the program waits for the reader once it outruns it.
Here nothing is recorded. The jump patch of a timed function's entry runs
`entry_code`: it pushes (stack pointer, TSC) onto its thread's stack of
open calls. The patch of each of its `ret`s runs `return_code` right
before the `ret`: it pops the entry whose stack pointer is its own (the
`ret` pops the return address the entry's stack pointer points at) and
adds the difference of the two stamps to the thread's histogram of that
function, in place. The thread's row (layout.py: claimed by its tid with
a compare-and-swap, then written by that thread alone) holds both, so
threads share no cache line and an increment needs no lock.

The pairing rule is the kernel's for its uretprobes: an entry first drops
the open calls at or below its stack pointer (a live caller is always
higher on the stack: those were left by longjmp, an exception, or a tail
call), a return drops those below its own (left by a longjmp out of a
deeper frame) and counts itself unpaired when the top is not its entry.
So recursion, longjmp and exceptions never pair a return with the wrong
entry, and nothing grows without bound: a stack holds STACK_DEPTH calls
(deeper entries are counted in TIMING_DEEP, not kept).

Durations are TSC ticks (rdtsc: the stamps are the call's edges; the
entry takes it last, the return first, so little of the probes' own code
lies between), bucketed HdrHistogram-style (layout.hist_bucket: 32 linear
sub-buckets per power of two). The reader (`TimingBlock`) sums the rows
of every thread per function, leaving out what the program cannot have
written (a count no run of calls can have reached since the block was
made: the program can write every word of it). `calibrate` times a null
function through the same code in this process, so the probes' own cost
can be taken off and said.

The code keeps all it changes: flags by seto/lahf (popfq is microcoded),
the registers it uses on the stack below the red zone.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand
from iced_x86 import Register as R

from uprobes.engines.trapfree.layout import (
    ENTRY_BYTES,
    ENTRY_KEY,
    ENTRY_SHIFT,
    ENTRY_SP,
    ENTRY_TSC,
    HIST_BUCKETS,
    HIST_BYTES,
    HIST_MAX_TICKS,
    HIST_SUB_BITS,
    KEYED_HIST_PROBES,
    KEYED_HISTS,
    KH_BYTES,
    KH_FUNC,
    KH_HIST,
    KH_KEY,
    KH_STATE,
    NO_KEPT_VERDICTS,
    ROW_BYTES,
    ROW_CLAIMED,
    ROW_DEPTH,
    ROW_HISTS,
    ROW_OWNER,
    ROW_PROBES,
    ROW_STACK,
    SECCOMP_OPEN,
    STACK_DEPTH,
    TIMED_FUNCS,
    TIMING_ABANDONED,
    TIMING_BYTES,
    TIMING_DEEP,
    TIMING_KEYED_OFFSET,
    TIMING_NOROW,
    TIMING_ROWS,
    TIMING_ROWS_OFFSET,
    TIMING_TLS,
    TIMING_UNKEYED,
    TIMING_UNNAMED,
    TIMING_UNPAIRED,
    hist_bounds,
)
from uprobes.engines.trapfree.sharedmem import most_hits

GLIBC_TID_OFFSET = 0x2D0  # offsetof(struct pthread, tid) on x86-64 glibc (recording.py's)
_RED_ZONE = 128
_NR_GETTID = 186
_HIST = struct.Struct(f"<{HIST_BUCKETS}Q")
_ROW_HEAD = struct.Struct("<IIQQ")  # owner, pad, claimed, depth
_KH_HEAD = struct.Struct("<QQQQ")  # a keyed histogram's state, function, key (2 words)


def _mem(base: Any, displ: int = 0, index: Any = R.NONE, scale: int = 1) -> MemoryOperand:
    return MemoryOperand(base, index, scale, displ=displ)


class _Asm:
    """Instructions with forward branches to named labels, encoded at an address."""

    def __init__(self) -> None:
        self.items: list[Instruction | tuple[str, Any]] = []
        self._made = 0
        self.seal = 0
        """The seccomp word (sandboxes.py) that guards the code's prctl
        (`comm_into`): its address in the program, 0 for none."""

    def fresh(self, name: str) -> str:
        """A label name not used before in this code (for parts emitted more than once)."""
        self._made += 1
        return f"{name}.{self._made}"

    def __call__(self, *insns: Instruction) -> None:
        self.items.extend(insns)

    def jump(self, code: Any, label: str) -> None:
        self.items.append(("jump", (code, label)))

    def label(self, name: str) -> None:
        self.items.append(("label", name))

    def encode(self, at: int) -> bytes:
        ips: dict[str, int] = {}
        n = 0
        for item in self.items:
            if isinstance(item, tuple) and item[0] == "label":
                ips[item[1]] = 1 + n
            else:
                n += 1
        final: list[Instruction] = []
        for item in self.items:
            if isinstance(item, tuple):
                if item[0] == "label":
                    continue
                code, label = item[1]
                insn = Instruction.create_branch(code, ips[label])
            else:
                insn = item
            insn.ip = 1 + len(final)
            final.append(insn)
        enc = BlockEncoder(64)
        enc.add_many(final)
        return bytes(enc.encode(at))


_SAVED = (R.RCX, R.RDX, R.RSI, R.RDI)  # and r11 around the gettid system call
ENTER_FRAME = _RED_ZONE + 8 * (2 + len(_SAVED))  # what `_enter` puts below the probe's rsp


def _enter(a: _Asm) -> int:
    """Below the red zone, the flags and what the code uses saved; the
    frame's size (rsp + it = the stack pointer at the probe)."""
    i = Instruction
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, -_RED_ZONE)),
      i.create_reg(Code.PUSH_R64, R.RAX), i.create_reg(Code.SETO_RM8, R.AL),
      i.create(Code.LAHF), i.create_reg(Code.PUSH_R64, R.RAX))
    for reg in _SAVED:
        a(i.create_reg(Code.PUSH_R64, reg))
    return ENTER_FRAME


def _leave(a: _Asm, label: str | None = "done") -> None:
    """What `_enter` saved, restored (after `label`, if one)."""
    i = Instruction
    if label is not None:
        a.label(label)
    for reg in reversed(_SAVED):
        a(i.create_reg(Code.POP_R64, reg))
    a(i.create_reg(Code.POP_R64, R.RAX), i.create_reg_i32(Code.ADD_AL_IMM8, R.AL, 0x7F),
      i.create(Code.SAHF), i.create_reg(Code.POP_R64, R.RAX),
      i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, _RED_ZONE)))


def _tid(a: _Asm, block: int, flag: int = TIMING_TLS) -> None:
    """esi = the thread's tid: from glibc's struct pthread once the tracer
    has seen it there (TIMING_TLS: a command's probes go in at its exec,
    before the dynamic linker sets the thread pointer up), else by a
    system call (clobbers rax and rcx; r11 kept)."""
    i = Instruction
    gettid, done = a.fresh("gettid"), a.fresh("tid")
    a(i.create_mem_i32(Code.CMP_RM8_IMM8, _mem(R.RIP, block + flag), 0))
    a.jump(Code.JE_REL32_64, gettid)
    a(i.create_reg_mem(Code.MOV_R32_RM32, R.ESI,
                       MemoryOperand(R.NONE, displ=GLIBC_TID_OFFSET, seg=R.FS)))
    a.jump(Code.JMP_REL32_64, done)
    a.label(gettid)
    a(i.create_reg(Code.PUSH_R64, R.R11),
      i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, _NR_GETTID), i.create(Code.SYSCALL),
      i.create_reg_reg(Code.MOV_R32_RM32, R.ESI, R.EAX), i.create_reg(Code.POP_R64, R.R11))
    a.label(done)


def _row(a: _Asm, block: int, claim: bool = True, verdict: bool = False) -> None:
    """rdi = the thread's row (tid in esi), claimed if need be (`claim`: an
    entry's; a return never claims one: a thread with no row at its call's
    entry has that call counted in `norow` already, and a row claimed at its
    return would make it a return without an entry; `verdict`: only when
    edx is not 0, a call the filter kept); else to `norow`.
    Clobbers rax and rcx."""
    i = Instruction
    rows = block + TIMING_ROWS_OFFSET
    a(i.create_reg_reg(Code.TEST_RM32_R32, R.ESI, R.ESI))
    a.jump(Code.JE_REL32_64, "norow")  # no tid: never take the free rows' owner 0
    for k in range(ROW_PROBES):
        claim_at, nxt = f"claim{k}", f"next{k}"
        a(i.create_reg_mem(Code.LEA_R32_M, R.ECX, _mem(R.RSI, k)),
          i.create_reg_i32(Code.AND_RM32_IMM32, R.ECX, TIMING_ROWS - 1),
          i.create_reg_reg_i32(Code.IMUL_R64_RM64_IMM32, R.RCX, R.RCX, ROW_BYTES),
          i.create_reg_mem(Code.LEA_R64_M, R.RDI, _mem(R.RIP, rows)),
          i.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RCX),
          i.create_reg_mem(Code.MOV_R32_RM32, R.EAX, _mem(R.RDI, ROW_OWNER)),
          i.create_reg_reg(Code.CMP_R32_RM32, R.EAX, R.ESI))
        a.jump(Code.JE_REL32_64, "row")
        if not claim:  # ours may be further on: a row before it freed since
            continue
        if verdict:  # a rejected call's thread claims no row
            a(i.create_reg_reg(Code.TEST_RM32_R32, R.EDX, R.EDX))
            a.jump(Code.JE_REL32_64, nxt)
        a(i.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
        a.jump(Code.JE_REL32_64, claim_at)
        a.jump(Code.JMP_REL32_64, nxt)
        a.label(claim_at)
        cas = i.create_mem_reg(Code.CMPXCHG_RM32_R32, _mem(R.RDI, ROW_OWNER), R.ESI)
        cas.has_lock_prefix = True
        a(cas)
        a.jump(Code.JE_REL32_64, "claimed")
        a(i.create_reg_reg(Code.CMP_R32_RM32, R.EAX, R.ESI))
        a.jump(Code.JE_REL32_64, "row")
        a.label(nxt)
    a.jump(Code.JMP_REL32_64, "norow")
    a.label("claimed")
    a(i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RDI, ROW_CLAIMED), 1))
    a.label("row")


def _depth(a: _Asm) -> None:
    """rcx = the row's depth, 0 if the program wrote one beyond STACK_DEPTH."""
    i = Instruction
    a(i.create_reg_mem(Code.MOV_R64_RM64, R.RCX, _mem(R.RDI, ROW_DEPTH)),
      i.create_reg_i32(Code.CMP_RM64_IMM32, R.RCX, STACK_DEPTH))
    a.jump(Code.JBE_REL32_64, "depth_ok")
    a(i.create_reg_reg(Code.XOR_R32_RM32, R.ECX, R.ECX))
    a.label("depth_ok")


def _locked_inc(addr: int) -> Instruction:
    """`lock inc qword [rip+addr]`: a header counter that every thread may bump."""
    inc = Instruction.create_mem(Code.INC_RM64, _mem(R.RIP, addr))
    inc.has_lock_prefix = True
    return inc


def _tail(a: _Asm, missed: str, counter: int | None, block: int, entry: bool,
          verdict: bool = False) -> None:
    """The ways out that time nothing: `missed` (the depth in rcx stored, the
    header's `counter` bumped, if one), `norow` (counted by the `entry` code
    only: a thread with no row at a call's entry has none at its return;
    `verdict`: and only for a call the filter kept, edx not 0); then
    `done`, all restored."""
    a.label(missed)
    a(Instruction.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, ROW_DEPTH), R.RCX))
    if counter is not None:
        a(_locked_inc(counter))
    a.jump(Code.JMP_REL32_64, "done")
    a.label("norow")
    if entry:
        if verdict:
            a(Instruction.create_reg_reg(Code.TEST_RM32_R32, R.EDX, R.EDX))
            a.jump(Code.JE_REL32_64, "done")
        a(_locked_inc(block + TIMING_NOROW))
    a.jump(Code.JMP_REL32_64, "done")
    _leave(a)


KeyLoad = Callable[["_Asm", int], None]
"""Code that writes a call's key, 16 bytes, at [rcx + ROW_STACK + ENTRY_KEY]
(given the frame's size), keeping rcx (keyed.timing_key)."""

NR_PRCTL = 157  # x86-64
PR_GET_NAME = 16
COMM_BYTES = 16  # TASK_COMM_LEN: the name and its NUL fit, padded with NULs


UNREAD_MARK = 0xFF
"""The last of the 16 bytes when the name could not be read: no name has
it (the kernel keeps 15 bytes and a NUL), so the key is not any name's."""


def comm_into(a: _Asm, base: Any, displ: int) -> None:
    """The thread's name, asked of the kernel (prctl(PR_GET_NAME)), into
    the 16 bytes at [base+displ], zeroed first; a call a sandbox refuses
    leaves them zero but the last, UNREAD_MARK. eax = the call's result.
    With `a.seal`, the call is made only while the seccomp word is open
    (a traced process that entered seccomp() may have a filter that kills
    on prctl): else no call, eax = -1 (EPERM) and the mark, as refused.
    Clobbers rax, rcx, rdi, rsi, r11 and the flags."""
    i = Instruction
    read, unread, ask = a.fresh("comm_read"), a.fresh("comm_unread"), a.fresh("comm_ask")
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(base, displ)),
      i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RSI, 0), 0),
      i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RSI, 8), 0))
    if a.seal:
        a(i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, a.seal),
          i.create_mem_i32(Code.CMP_RM64_IMM8, _mem(R.RAX), SECCOMP_OPEN))
        a.jump(Code.JE_REL32_64, ask)
        a(i.create_reg_i32(Code.MOV_RM64_IMM32, R.RAX, -1))
        a.jump(Code.JMP_REL32_64, unread)
    a.label(ask)
    a(i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, NR_PRCTL),
      i.create_reg_u32(Code.MOV_R32_IMM32, R.EDI, PR_GET_NAME),
      i.create(Code.SYSCALL),  # (keeps rsi)
      i.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
    a.jump(Code.JE_REL32_64, read)
    a.label(unread)
    a(i.create_mem_u32(Code.MOV_RM8_IMM8, _mem(R.RSI, COMM_BYTES - 1), UNREAD_MARK))
    a.label(read)


EntryGuard = Callable[["_Asm", int], None]
"""Code that goes on for a call to time and to "rejected" for one not to
(given the frame's size): a filter (filtercode.guard)."""


def entry_code(at: int, block: int, key: KeyLoad | None = None,
               guard: EntryGuard | None = None) -> bytes:
    """A timed function's entry, for a trampoline at `at` (the block at
    `block`, within rel32 reach): open a call on the thread's stack (with
    `key`: the key the call's duration is kept under, with the call). With
    `guard`, decided first: a call it rejects opens nothing, claims no row
    and counts nothing; it only drops the calls its thread left at or below
    its stack pointer (its return, finding no entry of its own, lets it go)."""
    i = Instruction
    a = _Asm()
    frame = _enter(a)
    if guard is not None:  # edx = the verdict, kept through the code below
        guard(a, frame)
        a(i.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1))
        a.jump(Code.JMP_REL32_64, "verdict")
        a.label("rejected")
        a(i.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX))
        a.label("verdict")
    _tid(a, block)
    _row(a, block, verdict=guard is not None)
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RSP, frame)))  # the probe's stack pointer
    _depth(a)
    a.label("drop")  # open calls at or below us were left without returning
    a(i.create_reg_reg(Code.TEST_RM64_R64, R.RCX, R.RCX))
    a.jump(Code.JE_REL32_64, "push")
    a(i.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RCX),
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RAX, ENTRY_SHIFT),
      i.create_reg_mem(Code.CMP_R64_RM64, R.RSI,
                       _mem(R.RDI, ROW_STACK - ENTRY_BYTES + ENTRY_SP, R.RAX)))
    a.jump(Code.JB_REL32_64, "push")  # the top is above us: a live caller
    a(i.create_reg(Code.DEC_RM64, R.RCX), _locked_inc(block + TIMING_ABANDONED))
    a.jump(Code.JMP_REL32_64, "drop")
    a.label("push")
    if guard is not None:  # rejected: the depth the drops left, stored; nothing pushed
        a(i.create_reg_reg(Code.TEST_RM32_R32, R.EDX, R.EDX))
        a.jump(Code.JE_REL32_64, "let_go")
    a(i.create_reg_i32(Code.CMP_RM64_IMM32, R.RCX, STACK_DEPTH))
    a.jump(Code.JAE_REL32_64, "deep")
    a(i.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RCX),
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RAX, ENTRY_SHIFT),
      i.create_reg_reg(Code.ADD_R64_RM64, R.RAX, R.RDI),
      i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RAX, ROW_STACK + ENTRY_SP), R.RSI),
      i.create_reg(Code.INC_RM64, R.RCX),
      i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, ROW_DEPTH), R.RCX),
      # again: a signal handler's timed call between the first write and the
      # depth's took this same slot (the depth did not cover it yet)
      i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RAX, ROW_STACK + ENTRY_SP), R.RSI),
      i.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX))
    if key is not None:
        key(a, frame)
    a(i.create(Code.RDTSC),  # the stamp last: the probe's own code is mostly before it
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RDX, 32),
      i.create_reg_reg(Code.OR_R64_RM64, R.RAX, R.RDX),
      i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, ROW_STACK + ENTRY_TSC), R.RAX))
    a.jump(Code.JMP_REL32_64, "done")
    if guard is not None:
        a.label("let_go")
        a(i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, ROW_DEPTH), R.RCX))
        a.jump(Code.JMP_REL32_64, "done")
    _tail(a, "deep", block + TIMING_DEEP, block, entry=True, verdict=guard is not None)
    return a.encode(at)


def return_code(at: int, block: int, func: int, keyed: bool = False,
                filtered: bool = False) -> bytes:
    """Right before a timed function's `ret`: close its call, add the
    duration to the thread's histogram of function `func` (`keyed`: to the
    block's histogram of `func` and the key its entry kept, `_keyed_hist`;
    `filtered`: a return with no entry of its own is a call the filter
    rejected at its entry, let go uncounted)."""
    assert 0 <= func < TIMED_FUNCS
    i = Instruction
    a = _Asm()
    frame = _enter(a)
    a(i.create(Code.RDTSC),  # the stamp first
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RDX, 32),
      i.create_reg_reg(Code.OR_R64_RM64, R.RDX, R.RAX))
    _tid(a, block)
    _row(a, block, claim=False)
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RSP, frame)))
    _depth(a)
    a.label("drop")
    a(i.create_reg_reg(Code.TEST_RM64_R64, R.RCX, R.RCX))
    a.jump(Code.JE_REL32_64, "unpaired")
    a(i.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.RCX),
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RAX, ENTRY_SHIFT),
      i.create_reg_reg(Code.ADD_R64_RM64, R.RAX, R.RDI),
      i.create_reg_mem(Code.CMP_R64_RM64, R.RSI, _mem(R.RAX, ROW_STACK - ENTRY_BYTES + ENTRY_SP)))
    a.jump(Code.JBE_REL32_64, "top")  # the top is at or above us
    a(i.create_reg(Code.DEC_RM64, R.RCX),  # a deeper call left by longjmp
      _locked_inc(block + TIMING_ABANDONED))
    a.jump(Code.JMP_REL32_64, "drop")
    a.label("top")
    a.jump(Code.JE_REL32_64, "paired")
    # The top is a caller's: on a full stack, this is a call too deep to be
    # kept (counted as such at its entry); else one with no entry of ours.
    a(i.create_reg_i32(Code.CMP_RM64_IMM32, R.RCX, STACK_DEPTH))
    a.jump(Code.JAE_REL32_64, "done")
    a.jump(Code.JMP_REL32_64, "unpaired")
    a.label("paired")
    top = ROW_STACK - ENTRY_BYTES
    # The entry's key and stamp are read before the depth lets go of their
    # slot: a signal handler's timed call after that would write its own there.
    a(i.create_reg(Code.DEC_RM64, R.RCX),
      # keyed: the key's first word in rsi, its second pushed (_keyed_hist pops it)
      *([i.create_reg_mem(Code.MOV_R64_RM64, R.RSI, _mem(R.RAX, top + ENTRY_KEY)),
         i.create_mem(Code.PUSH_RM64, _mem(R.RAX, top + ENTRY_KEY + 8))] if keyed else []),
      i.create_reg_mem(Code.SUB_R64_RM64, R.RDX, _mem(R.RAX, top + ENTRY_TSC)),
      i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, ROW_DEPTH), R.RCX))  # (flags kept)
    a.jump(Code.JAE_REL32_64, "positive")
    a(i.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX))  # another CPU's counter was ahead
    a.label("positive")
    a(i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, HIST_MAX_TICKS),
      i.create_reg_reg(Code.CMP_R64_RM64, R.RDX, R.RAX))
    a.jump(Code.JBE_REL32_64, "bounded")
    a(i.create_reg_reg(Code.MOV_R64_RM64, R.RDX, R.RAX))
    a.label("bounded")
    if not keyed:
        a(i.create_reg_mem(Code.LEA_R64_M, R.RDI, _mem(R.RDI, ROW_HISTS + func * HIST_BYTES)))
    a(i.create_reg_i32(Code.CMP_RM64_IMM32, R.RDX, 1 << HIST_SUB_BITS))
    a.jump(Code.JB_REL32_64, "bucket")
    # bucket = (k << SUB_BITS) + (v >> k), k = bsr(v) - SUB_BITS (layout.hist_bucket)
    a(i.create_reg_reg(Code.BSR_R64_RM64, R.RCX, R.RDX),
      i.create_reg_i32(Code.SUB_RM32_IMM8, R.ECX, HIST_SUB_BITS),
      i.create_reg_reg(Code.SHR_RM64_CL, R.RDX, R.CL),
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RCX, HIST_SUB_BITS),
      i.create_reg_reg(Code.ADD_R64_RM64, R.RDX, R.RCX))
    a.label("bucket")
    if keyed:
        _keyed_hist(a, block, func)
    else:
        a(i.create_mem(Code.INC_RM64, _mem(R.RDI, 0, R.RDX, 8)))
    a.jump(Code.JMP_REL32_64, "done")
    _tail(a, "unpaired", None if filtered else block + TIMING_UNPAIRED, block, entry=False)
    return a.encode(at)


_HASH = 0x9E3779B97F4A7C15  # Fibonacci hashing: the top bits of key * this
_FREE, _CLAIMED, _READY = 0, 1, 2


def claim_entry(a: _Asm, state: int, taken: str) -> None:
    """Claim the free hash-table entry at rdi (its state word at `state`)
    by a compare-and-swap from free to claimed; to `taken` if it is not
    free or another thread won it (rax kept; rcx clobbered)."""
    i = Instruction
    a(i.create_mem_i32(Code.CMP_RM64_IMM8, _mem(R.RDI, state), _FREE))
    a.jump(Code.JNE_REL32_64, taken)  # claimed by another, not ready yet: move on
    cas = i.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.RDI, state), R.RCX)
    cas.has_lock_prefix = True
    a(i.create_reg(Code.PUSH_R64, R.RAX),
      i.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX),
      i.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, _CLAIMED), cas,
      i.create_reg(Code.POP_R64, R.RAX))  # pop keeps cmpxchg's ZF
    a.jump(Code.JNE_REL32_64, taken)


def key_hash(a: _Asm, second: MemoryOperand, entries: int) -> None:
    """eax = the slot a 16-byte key (rsi, then the word at `second`) hashes
    to among `entries` (a power of two). Clobbers rcx."""
    i = Instruction
    a(i.create_reg_mem(Code.MOV_R64_RM64, R.RCX, second),
      i.create_reg_reg(Code.XOR_R64_RM64, R.RCX, R.RSI),
      i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, _HASH),
      i.create_reg_reg(Code.IMUL_R64_RM64, R.RAX, R.RCX),
      i.create_reg_i32(Code.SHR_RM64_IMM8, R.RAX, 64 - (entries.bit_length() - 1)))


def key_matches(a: _Asm, fields: tuple[int, int], second: MemoryOperand, other: str) -> None:
    """To `other` unless the entry at rdi holds the key: rsi in its first
    word (at `fields[0]`), the word at `second` in its second. Clobbers rcx."""
    i = Instruction
    a(i.create_reg_mem(Code.CMP_R64_RM64, R.RSI, _mem(R.RDI, fields[0])))
    a.jump(Code.JNE_REL32_64, other)
    a(i.create_reg_mem(Code.MOV_R64_RM64, R.RCX, second),
      i.create_reg_mem(Code.CMP_R64_RM64, R.RCX, _mem(R.RDI, fields[1])))
    a.jump(Code.JNE_REL32_64, other)


def key_store(a: _Asm, fields: tuple[int, int], second: MemoryOperand) -> None:
    """The key (rsi, the word at `second`) into the entry at rdi's `fields`. Clobbers rcx."""
    i = Instruction
    a(i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, fields[0]), R.RSI),
      i.create_reg_mem(Code.MOV_R64_RM64, R.RCX, second),
      i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, fields[1]), R.RCX))


def _keyed_hist(a: _Asm, block: int, func: int) -> None:
    """Bucket rdx of the histogram of (`func`, the key: rsi and the word
    pushed last, which it pops) in the block's table of keyed histograms,
    `lock inc`ed (threads share it); the entry is claimed as keyed.py claims
    one: a compare-and-swap of its state from free, then the pair written,
    then ready. A pair that finds no place in KEYED_HIST_PROBES tries bumps
    TIMING_UNKEYED. Clobbers rax, rcx, rdi."""
    i = Instruction
    table = block + TIMING_KEYED_OFFSET
    second = _mem(R.RSP, 0)
    key_hash(a, second, KEYED_HISTS)
    for k in range(KEYED_HIST_PROBES):
        nxt, free = f"knext{k}", f"kfree{k}"
        a(i.create_reg_mem(Code.LEA_R32_M, R.ECX, _mem(R.RAX, k + func * 17)),
          i.create_reg_i32(Code.AND_RM32_IMM32, R.ECX, KEYED_HISTS - 1),
          i.create_reg_reg_i32(Code.IMUL_R64_RM64_IMM32, R.RCX, R.RCX, KH_BYTES),
          i.create_reg_mem(Code.LEA_R64_M, R.RDI, _mem(R.RIP, table)),
          i.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RCX),
          i.create_mem_i32(Code.CMP_RM64_IMM8, _mem(R.RDI, KH_STATE), _READY))
        a.jump(Code.JNE_REL32_64, free)
        key_matches(a, (KH_KEY, KH_KEY + 8), second, nxt)
        a(i.create_mem_i32(Code.CMP_RM64_IMM32, _mem(R.RDI, KH_FUNC), func))
        a.jump(Code.JE_REL32_64, "kfound")
        a.jump(Code.JMP_REL32_64, nxt)
        a.label(free)
        claim_entry(a, KH_STATE, nxt)
        key_store(a, (KH_KEY, KH_KEY + 8), second)
        a(i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RDI, KH_FUNC), func),
          i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RDI, KH_STATE), _READY))
        a.jump(Code.JMP_REL32_64, "kfound")
        a.label(nxt)
    a(_locked_inc(block + TIMING_UNKEYED))
    a.jump(Code.JMP_REL32_64, "kdone")
    a.label("kfound")
    inc = i.create_mem(Code.INC_RM64, _mem(R.RDI, KH_HIST, R.RDX, 8))
    inc.has_lock_prefix = True
    a(inc)
    a.label("kdone")
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, 8)))  # the key's second word


_SIZING_AT, _SIZING_BLOCK = 0x10000000, 0x10100000


def code_size(key: KeyLoad | None = None,
              guard_for: Callable[[int], EntryGuard] | None = None) -> int:
    """An entry's code and a return's together (what a whole-function patch
    holds); `guard_for`: the entry's guard for a block at a given address."""
    guard = None if guard_for is None else guard_for(_SIZING_BLOCK)
    return len(entry_code(_SIZING_AT, _SIZING_BLOCK, key, guard)) \
        + len(return_code(_SIZING_AT, _SIZING_BLOCK, TIMED_FUNCS - 1, key is not None,
                          guard is not None))


# ---------------------------------------------------------------- reading


@dataclass
class Missed:
    """Calls the block could not time, from its header counters."""

    no_row: int = 0     # every row the thread could claim was another thread's
    too_deep: int = 0   # more than STACK_DEPTH calls open at once on a thread
    unpaired: int = 0   # returns whose entry was not on the stack (began before, or left)
    abandoned: int = 0  # open calls dropped: left by longjmp, an exception, a tail call
    unkeyed: int = 0    # keyed calls whose (function, key) found no place in the table


class TimingBlock:
    """One memfd of timing rows, mapped in a tracee (and its fork children) and here."""

    def __init__(self, view: mmap.mmap, runtime_addr: int, offset: int = 0) -> None:
        self.view = view
        self.runtime_addr = runtime_addr
        self._at = offset  # where the block starts in `view`
        self.made = time.monotonic()
        self.corrupt = 0  # histograms left out: counts no run of calls can have reached

    def rows(self) -> list[int]:
        """Offsets of the rows some thread claimed."""
        out = []
        for r in range(TIMING_ROWS):
            at = self._at + TIMING_ROWS_OFFSET + r * ROW_BYTES
            if struct.unpack_from("<Q", self.view, at + ROW_CLAIMED)[0]:
                out.append(at)
        return out

    def add_into(self, funcs: dict[int, list[int]]) -> None:
        """Add every claimed row's histogram of each function in `funcs`
        (index -> buckets) into it; a histogram whose calls no run can
        have made since the block was mapped is left out (`corrupt`)."""
        for row in self.rows():
            self._add_row(row, funcs)

    def by_owner(self, funcs: list[int]) -> list[tuple[int, dict[int, list[int]]]]:
        """(the owning tid, its histogram of each function in `funcs`) of
        each row a live thread holds."""
        out = []
        for row in self.rows():
            owner = struct.unpack_from("<I", self.view, row + ROW_OWNER)[0]
            if owner:
                hists = {f: empty_buckets() for f in funcs}
                self._add_row(row, hists)
                out.append((owner, hists))
        return out

    def _add_row(self, row: int, funcs: dict[int, list[int]]) -> None:
        bound = most_hits(time.monotonic() - self.made)
        for f, into in funcs.items():
            got = _HIST.unpack_from(self.view, row + ROW_HISTS + f * HIST_BYTES)
            if sum(got) > bound:
                self.corrupt += 1
                continue
            for b, n in enumerate(got):
                if n:
                    into[b] += n

    def missed(self) -> Missed:
        """The header's counters (each bounded like a count: else 0 and `corrupt`)."""
        bound = most_hits(time.monotonic() - self.made)
        vals = []
        for at in (TIMING_NOROW, TIMING_DEEP, TIMING_UNPAIRED, TIMING_ABANDONED, TIMING_UNKEYED):
            v = struct.unpack_from("<Q", self.view, self._at + at)[0]
            if v > bound:
                self.corrupt += 1
                v = 0
            vals.append(v)
        return Missed(*vals)

    def keyed(self) -> dict[tuple[int, int], list[int]]:
        """The keyed histograms (`return_code(keyed=True)`) by (function,
        raw key: its 16 bytes as a little-endian number), entries of one
        pair merged; a histogram whose calls no run can have made since the
        block was mapped is left out (`corrupt`)."""
        bound = most_hits(time.monotonic() - self.made)
        out: dict[tuple[int, int], list[int]] = {}
        for n in range(KEYED_HISTS):
            at = self._at + TIMING_KEYED_OFFSET + n * KH_BYTES
            state, func, low, high = _KH_HEAD.unpack_from(self.view, at)
            key = low | high << 64
            if state != _READY:
                continue
            got = _HIST.unpack_from(self.view, at + KH_HIST)
            total = sum(got)
            if not total:
                continue
            if total > bound or not 0 <= func < TIMED_FUNCS:
                self.corrupt += 1
                continue
            into = out.setdefault((func, key), empty_buckets())
            for b, c in enumerate(got):
                if c:
                    into[b] += c
        return out

    def tls_confirmed(self) -> None:
        """The tid is at glibc's place in the thread pointer: no more system calls."""
        self.view[self._at + TIMING_TLS] = 1

    def no_kept_verdicts(self) -> None:
        """A --comm verdict is not kept by tid (filtercode.NO_KEPT_VERDICTS)."""
        self.view[self._at + TIMING_TLS + NO_KEPT_VERDICTS] = 1

    def tls_withdrawn(self) -> None:
        """The tid is not to be read at the thread pointer (jumppatch.check_fork_tls)."""
        self.view[self._at + TIMING_TLS] = 0

    def unnamed(self) -> int:
        """Calls whose entry's `--comm` test could not read the thread's name."""
        return int(struct.unpack_from("<Q", self.view, self._at + TIMING_UNNAMED)[0])

    def release(self, tid: int, funcs: Sequence[int] = ()) -> dict[int, list[int]]:
        """Free the row of a thread that exited (its tid may come back for
        another); its histograms of `funcs`, taken out of the row (the next
        thread's start from zero)."""
        hists: dict[int, list[int]] = {f: empty_buckets() for f in funcs}
        for k in range(ROW_PROBES):
            at = self._at + TIMING_ROWS_OFFSET + ((tid + k) & (TIMING_ROWS - 1)) * ROW_BYTES
            if struct.unpack_from("<I", self.view, at + ROW_OWNER)[0] == tid:
                self._add_row(at, hists)
                for f in funcs:
                    start = at + ROW_HISTS + f * HIST_BYTES
                    self.view[start:start + HIST_BYTES] = bytes(HIST_BYTES)
                struct.pack_into("<Q", self.view, at + ROW_DEPTH, 0)
                struct.pack_into("<I", self.view, at + ROW_OWNER, 0)
                break
        return hists


def empty_buckets() -> list[int]:
    return [0] * HIST_BUCKETS


def bucket_ticks(buckets: list[int]) -> list[tuple[float, int]]:
    """(the ticks a bucket stands for: its middle, calls) of each non-empty bucket."""
    out = []
    for b, n in enumerate(buckets):
        if n:
            lo, hi = hist_bounds(b)
            out.append(((lo + hi) / 2, n))
    return out


def typical_ticks(buckets: list[int], keep: float = 0.9) -> float:
    """The mean duration of the fastest `keep` of the calls (bucket middles):
    what a call costs when nothing interrupts it. A mean, not a median: with
    a TSC that counts in steps (tsc_step) each reading is off by up to a
    step, evenly either way, so a mean of many is right where a median
    sticks to a step."""
    total = sum(buckets)
    if not total:
        return 0.0
    left, ticks = max(1, int(total * keep)), 0.0
    taken = 0
    for ticks_at, n in bucket_ticks(buckets):
        n = min(n, left - taken)
        ticks += ticks_at * n
        taken += n
        if taken >= left:
            break
    return ticks / taken


# ---------------------------------------------------------------- calibration


def _run_here(code: _Asm, restype: Any) -> int:
    """Run `code` (a function) in this process; its return value."""
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        buf.write(code.encode(base))
        fn = ctypes.CFUNCTYPE(restype)(base)
        try:
            return int(fn())
        finally:
            del fn
    finally:
        buf.close()


def tsc_step(reads: int = 64) -> int:
    """The TSC's step here: the least change between two reads in a row
    (1 on bare metal; a hypervisor may count in steps of many ticks)."""
    i = Instruction
    a = _Asm()
    a(i.create_reg(Code.PUSH_R64, R.RBX), i.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, reads),
      i.create_reg_u64(Code.MOV_R64_IMM64, R.R8, (1 << 63) - 1),
      i.create(Code.RDTSC), i.create_reg_i32(Code.SHL_RM64_IMM8, R.RDX, 32),
      i.create_reg_reg(Code.OR_R64_RM64, R.RAX, R.RDX),
      i.create_reg_reg(Code.MOV_R64_RM64, R.R9, R.RAX))
    a.label("loop")
    a(i.create(Code.RDTSC), i.create_reg_i32(Code.SHL_RM64_IMM8, R.RDX, 32),
      i.create_reg_reg(Code.OR_R64_RM64, R.RAX, R.RDX),
      i.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX),
      i.create_reg_reg(Code.SUB_R64_RM64, R.RCX, R.R9),
      i.create_reg_reg(Code.MOV_R64_RM64, R.R9, R.RAX))
    a.jump(Code.JE_REL32_64, "next")  # no change: not a step
    a(i.create_reg_reg(Code.CMP_R64_RM64, R.RCX, R.R8),
      i.create_reg_reg(Code.CMOVB_R64_RM64, R.R8, R.RCX))
    a.label("next")
    a(i.create_reg(Code.DEC_RM32, R.EBX))
    a.jump(Code.JNE_REL32_64, "loop")
    a(i.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.R8), i.create_reg(Code.POP_R64, R.RBX),
      i.create(Code.RETNQ))
    step = _run_here(a, ctypes.c_uint64)
    return step if 0 < step < 1 << 20 else 1


CALIBRATION_CALLS = 20000


def _tls_tid_here() -> bool:
    """Whether this process's glibc keeps the tid at the thread pointer, as
    the probes in the program read it (else they make a system call)."""
    code = _Asm()
    code(Instruction.create_reg_mem(Code.MOV_R32_RM32, R.EAX,
                                    MemoryOperand(R.NONE, displ=GLIBC_TID_OFFSET, seg=R.FS)),
         Instruction.create(Code.RETNQ))
    return _run_here(code, ctypes.c_uint32) == threading.get_native_id()


def calibrate(calls: int = CALIBRATION_CALLS) -> list[int]:
    """The histogram (buckets of ticks) of `calls` calls of a function that
    does nothing, each timed by `entry_code` and `return_code` as a timed
    function's are, run here: what the probes alone add to a call."""
    page = mmap.PAGESIZE
    size = page * 4 + TIMING_BYTES
    buf = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        block = base + page * 4
        i = Instruction
        # null: the entry's code, the return's code, ret; run: call it `calls` times.
        null_at = base + page * 2
        null = entry_code(null_at, block)
        null += return_code(null_at + len(null), block, 0) + b"\xc3"
        run = _Asm()
        run(i.create_reg(Code.PUSH_R64, R.RBX),
            i.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, calls))
        run.label("loop")
        run(i.create_branch(Code.CALL_REL32_64, null_at))
        run(i.create_reg(Code.DEC_RM32, R.EBX))
        run.jump(Code.JNE_REL32_64, "loop")
        run(i.create_reg(Code.POP_R64, R.RBX), i.create(Code.RETNQ))
        buf[page * 2:page * 2 + len(null)] = null
        loop = run.encode(base)
        buf[:len(loop)] = loop
        reader = TimingBlock(buf, block, page * 4)  # made before the calls: see add_into
        if _tls_tid_here():
            reader.tls_confirmed()
        fn = ctypes.CFUNCTYPE(None)(base)
        fn()
        del fn
        out = empty_buckets()
        reader.add_into({0: out})
        return out
    finally:
        buf.close()


@dataclass(frozen=True)
class Calibration:
    """How ticks become ns here, and what the probes' own code adds to a call."""

    ns_per_tick: float
    subtracted_ns: float  # typical_ticks of the null function's calls, in ns
    calls: int            # of the null function, timed
    step_ns: float        # tsc_step, in ns


_calibrated: Calibration | None = None
_calibrating = threading.Lock()


def calibration() -> Calibration:
    """This process's calibration: measured at the first call (the rate over
    a few ms, `calibrate`, `tsc_step`), the same at every call after. Each
    measure differs a little from the last, so histograms read again with a
    new one would move calls between buckets: a bucket's count could go
    down between two reads of counts that only grow."""
    global _calibrated
    with _calibrating:
        if _calibrated is None:
            from uprobes.sys import tsc
            scale = tsc.TscClock().rate()[0]
            null = calibrate(CALIBRATION_CALLS)
            _calibrated = Calibration(scale, typical_ticks(null) * scale, CALIBRATION_CALLS,
                                      tsc_step() * scale)
        return _calibrated
