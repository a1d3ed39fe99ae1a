"""Trap-free recording probes: a hit writes its values into a shared ring, no stop.

`count` needs only a counter per probe (trampoline.py). `trace` needs each
hit's values, and an int3 costs a ptrace stop per hit (microseconds). A
probe whose fetchargs are registers, `$stack`, `$stackN`, `+OFF(%sp)`,
immediates or `$comm` needs no tracer at the hit either: the jump patch's
trampoline copies what the probe fetches into a ring that the program maps
MAP_SHARED and uprobes reads (jumppatch.py places it; this module says
what a probe records, builds the code that records it, reads the ring and
turns records back into hits).

The trampoline (`prologue`), after stepping below the red zone:

    pushfq; push rax, rcx, rdx, rsi, r11   ; all it changes
    tid   -> esi: mov esi, fs:[0x2d0]       ; glibc's struct pthread tid, checked
                                            ; per process before use; else gettid
    rdtscp                                  ; time and TSC_AUX (the CPU), no syscall
    reserve a slot: head - tail < SLOTS ? lock cmpxchg head, head+1 : wait
                    (a lost compare-and-swap retries, unless GIVE_UP_S passed)
    slot: tsc, tid|aux<<32, probe id, the values; then seq = index + 1 (commit)
    pop everything back; lea rsp, [rsp+128]
    wait: unless `stalled`, set `waiters` and sleep in FUTEX_WAIT on `tail`
          (at most NAP_NS), then retry, while the reader's heartbeat (a
          TSC stamp it writes at every read) is less than WAIT_S old and
          not ahead of now, and the hit less than GIVE_UP_S old; a stale
          heartbeat sets `stalled`; then drop: lock inc lost

A full ring makes the hit wait for the reader, so, like the int3 path, a
trace loses nothing: the program runs at the reader's pace while it
outruns it, however long a thread loses the race for freed slots (up to
GIVE_UP_S for one hit). If the reader stops reading (uprobes stopped, or
killed with -9), its heartbeat goes stale: a hit waits until it is WAIT_S
old and sets `stalled`; from then on hits are dropped at once (counted in
`lost`) until the reader clears it.

The program can write every word of its ring, by a bug or on purpose. So
every limit of a wait is an immediate in the code (the timeout, WAIT_S,
GIVE_UP_S) and every way back to a retry passes the check of the time
since the hit, whose stamp is in a register: no state of the ring keeps a
hit in our code longer than GIVE_UP_S. The reader keeps its own `tail`
and lost count, puts back a `head` or `tail` no writer could leave, and
takes a record for a hit only if a probe's code can have written it
(`Recorder._valid`); what it leaves out is counted apart (`corrupt`) and
reported in one line.

Threads (and forked children, which inherit the mapping) reserve slots with
a compare-and-swap on `head`, write them in any order and commit each by
writing its sequence word last (x86 keeps stores in order). The reader
takes slots in index order while their sequence word is theirs, then
publishes `tail`, which frees them. No system call at all when the tid
comes from the thread pointer and the ring has room.

Reading memory that might fault (a pointer argument, a string) stays with
the int3 path: a fault in the trampoline would be the program's crash. The
stack at the probe is always mapped up to STACK_MAX bytes above the stack
pointer (the caller's frame and its return address lie there).

Values are raw registers and stack words. A probe whose only consumer is
the tracer's own, unfiltered, becomes its hit tuple by one generated
function (`direct_hit`: ArgFetcher's conversions written out); the rest
get a register set and a window of stack rebuilt (`regs_of`) and go
through their dispatch and the same `ArgFetcher` as the int3 path.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand
from iced_x86 import Register as R

from uprobes.engines.tracee.fetch import REGISTER_FIELDS, converter, split_derefs
from uprobes.engines.trapfree.layout import (
    CPU_BITS,
    CPU_MASK,
    DATA_OFFSET,
    HEAD,
    HEARTBEAT,
    LOST,
    MAX_WORDS,
    REC_AUX,
    REC_PROBE,
    REC_PROBE_HIGH,
    REC_TID,
    REC_TSC,
    REC_VALUES,
    RECORD,
    SLOT_BYTES,
    SLOT_PROBE,
    SLOT_SEQ,
    SLOT_SHIFT,
    SLOT_TID,
    SLOT_TSC,
    SLOT_VALUES,
    SLOTS,
    STALLED,
    TAIL,
    WAITERS,
)
from uprobes.engines.trapfree.sharedmem import CPUS, most_hits
from uprobes.lang.ast import (
    Comm,
    FetchArg,
    FetchType,
    Immediate,
    ImmString,
    Register,
    RetVal,
    StackEntry,
    StackPointer,
    UsdtTarget,
)
from uprobes.model.event import Hit
from uprobes.model.probe import ResolvedProbe
from uprobes.render.protocol import LineRenderer
from uprobes.render.rows import RowShape
from uprobes.resolve.abi import lower_fetcharg
from uprobes.sys import futex, tsc
from uprobes.sys.procmem import MemoryFault
from uprobes.sys.ptrace import UserRegs

STACK_MAX = 512                     # bytes above the stack pointer a probe may record
GLIBC_TID_OFFSET = 0x2D0            # offsetof(struct pthread, tid) on x86-64 glibc
STUCK_S = 1.0                       # a reserved slot not committed this long is lost
TAKE_MAX = 4096                     # records per take: slots are freed this often
DRAIN_S = 0.05                      # the longest a drain keeps reading (unless final)
_RED_ZONE = 128
_SAVED = ("r11", "rsi", "rdx", "rcx", "rax", "eflags")  # from rsp up, after the pushes
_FRAME = 8 * len(_SAVED) + _RED_ZONE  # rsp + _FRAME = the stack pointer at the probe
_NR_GETTID = 186
_NR_FUTEX = 202
WAIT_S = 3.0  # how long a hit waits for room in a full ring before the ring is "stalled"
GIVE_UP_S = 10.0  # the longest one hit waits for room, even with a live reader
SKEW_S = 0.001  # how far apart two CPUs' time-stamp counters may be
NAP_NS = 20_000_000  # one futex wait's timeout (a wake-up lost in a race costs no more)
_MASK64 = (1 << 64) - 1
_NODES_MAX = 1024  # NUMA nodes (TSC_AUX keeps the node above the cpu's 12 bits)
CONSTANT_FIELDS = {"rip": None, "orig_rax": (1 << 64) - 1, "cs": 0x33, "ss": 0x2B}
"""Registers known without recording them: the probe's address, "not in a
system call", and the x86-64 user code and stack segments (__USER_CS, __USER_DS)."""


# ---------------------------------------------------------------- what a probe records


@dataclass(frozen=True)
class Recipe:
    """What one probe's trampoline copies: `regs` (UserRegs fields) in
    order, then the stack words from rsp+lo to rsp+hi (`stack`). `ret`: it
    records right before a probed `ret`, the state a return probe sees just
    after it (rip the return address, rsp 8 higher): then `regs` starts
    with "rip"."""

    regs: tuple[str, ...]
    stack: tuple[int, int] | None
    ret: bool = False

    @property
    def words(self) -> int:
        lo_hi = self.stack
        return len(self.regs) + (0 if lo_hi is None else (lo_hi[1] - lo_hi[0]) // 8)


def recipe_for(points: list[ResolvedProbe], ret: bool = False) -> Recipe | str:
    """What one probed instruction must record for every probe line on it
    (`points`, one per consumer) to be fetched from a ring, or why it cannot.
    `ret`: the instruction is a `ret` and the lines are return probes."""
    regs: list[str] = ["rip"] if ret else []
    lo, hi = STACK_MAX, 0
    for probe in points:
        if probe.is_return != ret:
            return "a return probe" if probe.is_return else "an entry probe on a ret"
        usdt = probe.usdt_args if isinstance(probe.spec.target, UsdtTarget) else None
        for a in probe.args:
            arg = lower_fetcharg(a, usdt)
            need = _needs(arg)
            if isinstance(need, str):
                return f"{arg.name}: {need}"
            reg, span = need
            if reg is not None and reg not in CONSTANT_FIELDS and reg not in regs:
                regs.append(reg)
            if span is not None:
                lo, hi = min(lo, span[0]), max(hi, span[1])
    stack = None
    if hi > lo:
        lo, hi = lo & ~7, (hi + 7) & ~7
        stack = (lo, hi)
        if "rsp" not in regs:  # the window's addresses
            regs.append("rsp")
    recipe = Recipe(tuple(regs), stack, ret)
    if recipe.words > MAX_WORDS:
        return f"it fetches {recipe.words} words; a record holds {MAX_WORDS}"
    return recipe


def _needs(arg: FetchArg) -> tuple[str | None, tuple[int, int] | None] | str:
    """(the register, the stack span) one argument reads, or why it cannot be recorded."""
    expr, t = arg.expr, arg.type
    if isinstance(expr, (Comm, ImmString)):
        return None, None
    if t.is_string:
        return "a string is read from memory (a trap-free probe records registers and the " \
               "stack only)"
    if isinstance(expr, Immediate):
        return None, None
    if isinstance(expr, Register):
        return REGISTER_FIELDS[expr.name], None
    if isinstance(expr, StackPointer):
        return "rsp", None
    if isinstance(expr, RetVal):
        return "rax", None
    if isinstance(expr, StackEntry):
        off = 8 * expr.index
        return _stack_span(off, 8)
    base, offsets = split_derefs(expr)
    sp = isinstance(base, StackPointer) or (isinstance(base, Register) and base.name == "sp")
    if sp and len(offsets) == 1:
        return _stack_span(offsets[0], t.size * (t.array or 1))
    return "it reads memory that may fault (a trap-free probe records registers and the " \
           "stack only)"


def _stack_span(off: int, n: int) -> tuple[None, tuple[int, int]] | str:
    if off < 0 or off + n > STACK_MAX:
        return f"stack bytes {off}..{off + n} are beyond the {STACK_MAX} recorded"
    return None, (off, off + n)


# ---------------------------------------------------------------- the code


def _mem(base: Any, displ: int = 0) -> MemoryOperand:  # an iced_x86.Register (typed as a module)
    return MemoryOperand(base, displ=displ)


@dataclass(frozen=True)
class Waits:
    """How long a hit may wait for room, in TSC ticks: immediates in its
    code, since the program can overwrite anything in its ring."""

    stale: int    # the reader's heartbeat this old: the reader is gone
    give_up: int  # the longest one hit waits, whatever the ring's words say
    skew: int     # how far another CPU's counter may run ahead of this one's


def waits(ticks: Callable[[float], int]) -> Waits:
    """`Waits` for a TSC of `ticks(seconds)` ticks per `seconds`."""
    # `skew` is a disp32 of the code, at least 128 so its encoding's size is fixed.
    return Waits(ticks(WAIT_S), ticks(GIVE_UP_S), min(max(ticks(SKEW_S), 128), (1 << 31) - 1))


def _since_hit(w: Waits) -> list[Instruction]:
    """rax = now; flags: (now - the hit's stamp in r11) compared (signed) to
    `give_up`. Clobbers rcx and rdx."""
    i = Instruction
    return [
        i.create(Code.RDTSC),
        i.create_reg_i32(Code.SHL_RM64_IMM8, R.RDX, 32),
        i.create_reg_reg(Code.OR_R64_RM64, R.RAX, R.RDX),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RDX, R.RAX),
        i.create_reg_reg(Code.SUB_R64_RM64, R.RDX, R.R11),
        i.create_reg_u64(Code.MOV_R64_IMM64, R.RCX, w.give_up),
        i.create_reg_reg(Code.CMP_R64_RM64, R.RDX, R.RCX),
    ]


def prologue(at: int, ring_addr: int, recipe: Recipe, probe_id: int, tls_tid: bool,
             waits: Waits) -> bytes:
    """The recording code for a trampoline at `at` whose ring is at `ring_addr`
    (within rel32 reach); it falls through to the displaced instructions."""
    head, tail, lost, data = (ring_addr + HEAD, ring_addr + TAIL, ring_addr + LOST,
                              ring_addr + DATA_OFFSET)
    stalled, waiters = ring_addr + STALLED, ring_addr + WAITERS
    heartbeat = ring_addr + HEARTBEAT
    i = Instruction
    code: list[Instruction | None] = [  # None: a branch, filled in once its label is known
        i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, -_RED_ZONE)),
        i.create(Code.PUSHFQ),
        i.create_reg(Code.PUSH_R64, R.RAX), i.create_reg(Code.PUSH_R64, R.RCX),
        i.create_reg(Code.PUSH_R64, R.RDX), i.create_reg(Code.PUSH_R64, R.RSI),
        i.create_reg(Code.PUSH_R64, R.R11),
    ]
    if tls_tid:
        code.append(i.create_reg_mem(Code.MOV_R32_RM32, R.ESI,
                                     MemoryOperand(R.NONE, displ=GLIBC_TID_OFFSET, seg=R.FS)))
    else:
        code += [i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, _NR_GETTID),
                 i.create(Code.SYSCALL), i.create_reg_reg(Code.MOV_R32_RM32, R.ESI, R.EAX)]
    code += [
        i.create(Code.RDTSCP),
        i.create_reg_i32(Code.SHL_RM64_IMM8, R.RDX, 32),
        i.create_reg_reg(Code.OR_R64_RM64, R.RAX, R.RDX),
        i.create_reg_reg(Code.MOV_R64_RM64, R.R11, R.RAX),
        i.create_reg_i32(Code.SHL_RM64_IMM8, R.RCX, 32),
        i.create_reg_reg(Code.OR_R64_RM64, R.RSI, R.RCX),
        i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RIP, head)),
    ]
    reload = len(code) - 1
    code += [
        i.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _mem(R.RIP, tail)),  # kept for the wait
        i.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX),
        i.create_reg_reg(Code.SUB_R64_RM64, R.RCX, R.RDX),
        i.create_reg_i32(Code.CMP_RM64_IMM32, R.RCX, SLOTS),
        None,  # jae full
        i.create_reg_mem(Code.LEA_R64_M, R.RDX, _mem(R.RAX, 1)),
    ]
    jae_full = len(code) - 2
    cas = i.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.RIP, head), R.RDX)
    cas.has_lock_prefix = True
    code += [cas, None]  # jne contended
    jne_contended = len(code) - 1
    code += [
        i.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX),
        i.create_reg_i32(Code.AND_RM64_IMM32, R.RCX, SLOTS - 1),
        i.create_reg_i32(Code.SHL_RM64_IMM8, R.RCX, SLOT_SHIFT),
        i.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RIP, data)),
        i.create_reg_reg(Code.ADD_R64_RM64, R.RCX, R.RAX),
        i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, SLOT_TSC), R.R11),
        i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, SLOT_TID), R.RSI),
        i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RCX, SLOT_PROBE), probe_id),
    ]
    after_ret = 8 if recipe.ret else 0  # the return address popped
    for n, (reg, offset) in enumerate(_word_sources(recipe)):
        dest = _mem(R.RCX, SLOT_VALUES + 8 * n)
        if reg is not None:
            code.append(i.create_mem_reg(Code.MOV_RM64_R64, dest, _REGS[reg]))
            continue
        if offset is None:  # the stack pointer at the probe (after the ret)
            code.append(i.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RSP, _FRAME + after_ret)))
        else:  # a word on our stack: a saved register or the program's stack
            code.append(i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSP, offset)))
        code.append(i.create_mem_reg(Code.MOV_RM64_R64, dest, R.RAX))
    # The commit; then jmp done.
    code += [i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, SLOT_SEQ), R.RDX), None]
    jmp_done = len(code) - 1
    # Every way back to `reload` passes a check of the time since the hit
    # (r11, its own stamp, in a register: nothing the program can write),
    # so no state of the ring's words keeps a hit here past `give_up`.
    contended = len(code)  # another writer took the slot (or the program wrote `head`)
    code += [*_since_hit(waits), None]  # jge drop
    jge_drop_contended = len(code) - 1
    code.append(None)  # jmp reload
    jmp_reload = len(code) - 1
    full = len(code)
    flag = i.create_mem_i32(Code.OR_RM64_IMM8, _mem(R.RIP, waiters), 1)
    flag.has_lock_prefix = True  # a full barrier: set before `tail` is looked at again
    code += [
        i.create_mem_i32(Code.CMP_RM64_IMM8, _mem(R.RIP, stalled), 0),
        None,  # jne drop
        flag,
        # futex(&tail, FUTEX_WAIT, tail as seen (edx), &timeout): the reader
        # wakes us when it moves `tail`; the syscall clobbers rcx and r11.
        # The timeout is built on our stack, not read from the ring.
        i.create_reg(Code.PUSH_R64, R.R11), i.create_reg(Code.PUSH_R64, R.RSI),
        i.create_reg(Code.PUSH_R64, R.RDI), i.create_reg(Code.PUSH_R64, R.R10),
        i.create_i32(Code.PUSHQ_IMM32, NAP_NS),  # tv_nsec
        i.create_i32(Code.PUSHQ_IMM32, 0),       # tv_sec
        i.create_reg_mem(Code.LEA_R64_M, R.RDI, _mem(R.RIP, tail)),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, 0),  # FUTEX_WAIT, shared
        i.create_reg_reg(Code.MOV_R64_RM64, R.R10, R.RSP),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, _NR_FUTEX),
        i.create(Code.SYSCALL),
        i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, 16)),
        i.create_reg(Code.POP_R64, R.R10), i.create_reg(Code.POP_R64, R.RDI),
        i.create_reg(Code.POP_R64, R.RSI), i.create_reg(Code.POP_R64, R.R11),
        *_since_hit(waits),
        None,  # jge drop: waited its longest (the reader may be alive: not `stalled`)
        # The reader alive: its heartbeat (a TSC stamp) at most `skew` ahead
        # (CPUs' counters differ by a few cycles) and less than `stale` old,
        # one unsigned compare; a stamp far ahead was not written by a reader.
        i.create_reg_mem(Code.SUB_R64_RM64, R.RAX, _mem(R.RIP, heartbeat)),
        i.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RAX, waits.skew)),
        i.create_reg_u64(Code.MOV_R64_IMM64, R.RCX, waits.stale + waits.skew),
        i.create_reg_reg(Code.CMP_R64_RM64, R.RAX, R.RCX),
        None,  # jb reload
        i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RIP, stalled), 1),
    ]
    jne_drop, jge_drop_waited, jb_reload = full + 1, len(code) - 7, len(code) - 2
    drop = len(code)
    inc = i.create_mem(Code.INC_RM64, _mem(R.RIP, lost))
    inc.has_lock_prefix = True
    code.append(inc)
    done = len(code)
    code += [i.create_reg(Code.POP_R64, r) for r in (R.R11, R.RSI, R.RDX, R.RCX, R.RAX)]
    code += [i.create(Code.POPFQ), i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, _RED_ZONE))]
    labels = {n: 1 + n for n in range(len(code))}  # ips as labels: the block encoder's
    code[jae_full] = i.create_branch(Code.JAE_REL32_64, labels[full])
    code[jne_contended] = i.create_branch(Code.JNE_REL32_64, labels[contended])
    code[jmp_done] = i.create_branch(Code.JMP_REL32_64, labels[done])
    code[jge_drop_contended] = i.create_branch(Code.JGE_REL32_64, labels[drop])
    code[jmp_reload] = i.create_branch(Code.JMP_REL32_64, labels[reload])
    code[jne_drop] = i.create_branch(Code.JNE_REL32_64, labels[drop])
    code[jge_drop_waited] = i.create_branch(Code.JGE_REL32_64, labels[drop])
    code[jb_reload] = i.create_branch(Code.JB_REL32_64, labels[reload])
    final: list[Instruction] = []
    for n, insn in enumerate(code):
        assert insn is not None
        insn.ip = labels[n]
        final.append(insn)
    enc = BlockEncoder(64)
    enc.add_many(final)
    return bytes(enc.encode(at))


_REGS: dict[str, Any] = {"rax": R.RAX, "rbx": R.RBX, "rcx": R.RCX, "rdx": R.RDX, "rsi": R.RSI,
                         "rdi": R.RDI, "rbp": R.RBP,
                         **{f"r{n}": getattr(R, f"R{n}") for n in range(8, 16)}}


def _word_sources(recipe: Recipe) -> list[tuple[str | None, int | None]]:
    """Where each recorded word comes from: (register, None) as it stands,
    (None, offset from our rsp) for saved registers and the program's
    stack, (None, None) for the stack pointer at the probe."""
    out: list[tuple[str | None, int | None]] = []
    after_ret = 8 if recipe.ret else 0
    for field_name in recipe.regs:
        if field_name == "rsp":
            out.append((None, None))
        elif field_name == "rip":  # recorded only before a ret: the return address
            out.append((None, _FRAME))
        elif field_name in _SAVED:
            out.append((None, 8 * _SAVED.index(field_name)))
        else:
            out.append((field_name, None))
    if recipe.stack is not None:
        lo, hi = recipe.stack
        out += [(None, _FRAME + after_ret + off) for off in range(lo, hi, 8)]
    return out


def prologue_size(recipe: Recipe, tls_tid: bool) -> int:
    """`prologue`'s length (its encoding does not depend on the addresses or the waits)."""
    return len(prologue(0x10000000, 0x10100000, recipe, 0, tls_tid, _SIZING_WAITS))


_SIZING_WAITS = Waits(1 << 40, 1 << 40, 1 << 20)


# ---------------------------------------------------------------- the ring


class Ring:
    """One ring, mapped in a family of processes at `runtime_addr` and here.

    The programs can write any of its words: the reader keeps the truth
    (`tail`, the lost count) on its side, puts back `tail` and `head` when
    they cannot be true, and counts each such repair in `corrupt`; the
    records themselves are checked by `Recorder`."""

    def __init__(self, view: mmap.mmap, runtime_addr: int) -> None:
        self.view = view
        self.runtime_addr = runtime_addr
        self.words = memoryview(view).cast("Q")  # 8-byte loads and stores
        self.created = tsc.read()  # no record of this ring is older
        self.beat()
        anchor = ctypes.c_char.from_buffer(view)
        self._tail_addr = ctypes.addressof(anchor) + TAIL  # our address of `tail`, to wake
        del anchor  # (the mapping stays put; holding the export would block close())
        self.tail = 0
        self.skipped = 0
        self.corrupt = 0  # control words found impossible (records: Recorder.corrupt)
        self.probe_ids: set[int] = set()  # the probes whose code writes here
        self._lost = 0
        self._lost_word = (0, time.monotonic())  # (`lost` as last read, when)
        self._stuck: tuple[int, float, int] | None = None  # (index, since, head then)
        self._stale_below = 0  # uncommitted slots below this are lost (see `take`)

    @property
    def lost(self) -> int:
        """Hits dropped on a full ring, plus slots never committed."""
        return self._lost + self.skipped

    def _read_lost(self) -> None:
        """Add what the in-program `lost` counter gained since the last read,
        if a count of dropped hits can have gained that much."""
        word, at = self._lost_word
        now = time.monotonic()
        raw = int(self.words[LOST // 8])
        gained = (raw - word) & _MASK64
        if gained <= most_hits(now - at):
            self._lost += gained
        else:
            self.corrupt += 1
        self._lost_word = (raw, now)

    def take(self, final: bool = False, limit: int = TAKE_MAX) -> list[tuple[int, ...]]:
        """Up to `limit` records committed since the last take, in reservation
        order; their slots are free again when it returns (so hits waiting for
        room go on while the batch is being handled).
        A reserved slot not yet committed stops the take (its writer is
        between two instructions) unless it stays so for STUCK_S, or
        `final` (every writer stopped or gone): then it counts as lost, and
        so do the uncommitted slots that had been reserved when the wait
        began (reserved as long ago): a `head` pushed ahead by the program
        costs one wait, not one per slot.
        A `tail` or `head` word that no writer could have left (the program
        wrote it) is put back, and counted in `corrupt`."""
        words = self.words
        self.beat()
        if words[STALLED // 8]:
            words[STALLED // 8] = 0  # reading again: full rings make hits wait again
        self._read_lost()
        tail = self.tail
        if words[TAIL // 8] != tail:
            words[TAIL // 8] = tail
            self.corrupt += 1
        head = int(words[HEAD // 8])
        if (head - tail) & _MASK64 > SLOTS:  # writers reserve only while head - tail < SLOTS
            words[HEAD // 8] = head = tail
            self.corrupt += 1
        out: list[tuple[int, ...]] = []
        per_slot = SLOT_BYTES // 8
        base = (DATA_OFFSET + SLOT_SEQ) // 8  # the first slot's sequence word
        reserved = head
        head = min(head, tail + limit)
        while tail < head:
            # The committed run from `tail`, up to the ring's end (a copy does
            # not wrap): the sequence words, read as one strided column, are
            # checked before the copy (x86 does not reorder loads), so each
            # record copied is whole.
            slot = tail & (SLOTS - 1)
            n = min(head - tail, SLOTS - slot)
            seqs = words[base + slot * per_slot:base + (slot + n) * per_slot:per_slot].tolist()
            if seqs != list(range(tail + 1, tail + n + 1)):
                n = next(k for k, seq in enumerate(seqs) if seq != tail + 1 + k)
            if n:
                start = DATA_OFFSET + slot * SLOT_BYTES
                out += RECORD.iter_unpack(self.view[start:start + n * SLOT_BYTES])
                tail += n
                self._stuck = None
                continue
            if not final and tail >= self._stale_below:
                now = time.monotonic()
                if self._stuck is None or self._stuck[0] != tail:
                    self._stuck = (tail, now, reserved)
                if now - self._stuck[1] < STUCK_S:
                    break
                self._stale_below = self._stuck[2]
            # Lost: the run of uncommitted slots from here (within the stale ones).
            run = next((k for k, seq in enumerate(seqs) if seq == tail + 1 + k), len(seqs))
            if not final:
                run = max(1, min(run, self._stale_below - tail))
            tail += run
            self.skipped += run
            self._stuck = None
        if tail != self.tail:
            self.tail = tail
            words[TAIL // 8] = tail
            if words[WAITERS // 8]:  # hits wait for room: there is some now
                words[WAITERS // 8] = 0
                futex.wake(self._tail_addr)
        return out

    def beat(self) -> None:
        """The reader is alive: a hit waiting for room goes on waiting while
        this is less than WAIT_S old."""
        self.words[HEARTBEAT // 8] = tsc.read()

    def abandon(self) -> None:
        """No reader from now on: hits that find the ring full drop their
        record at once (and any waiting now do after their nap)."""
        self.words[STALLED // 8] = 1
        futex.wake(self._tail_addr)

    def close(self) -> None:
        if not self.view.closed:
            self.words.release()
            self.view.close()


# ---------------------------------------------------------------- records as hits


Make = Callable[[tuple[int, ...], int, tuple[int, str]], Hit]
Direct = tuple[str, Make]
"""The name a probe's count goes under, and (its record, its time stamp,
(pid, comm) of its thread) -> its `Hit`: built straight from the record,
with no RecordedHit and no dispatch."""


@dataclass(frozen=True)
class RecordedSite:
    """What a probe id in a ring stands for. `direct`: set when the probe's
    only consumer is the tracer's own and nothing filters its hits."""

    probe: object        # registry.Probe
    recipe: Recipe
    ip: int              # the probe's run-time address
    file_base: int
    direct: Direct | None = None
    func: int | None = None  # a return probe's function (its ip is the return address)


def direct_hit(probe: ResolvedProbe, recipe: Recipe, ip: int, func: int | None) -> Make | None:
    """(A record as unpacked: values from index 6, its time stamp, (pid,
    comm) of its thread) -> the probe's `Hit`, for probes whose arguments
    are registers, `$stack`, `$stackN`, `+OFF(%sp)`, immediates or `$comm`,
    valued as `ArgFetcher` values them (its `converter` arithmetic, written
    out); None for the rest. `func`: a return probe's function (its hit's
    ip is then the recorded return address). The function is generated,
    one expression per field: one call a record, however many arguments."""
    usdt = probe.usdt_args if isinstance(probe.spec.target, UsdtTarget) else None
    n_regs = len(recipe.regs)
    lo = recipe.stack[0] if recipe.stack else 0
    exprs: list[str] = []
    for a in probe.args:
        arg = lower_fetcharg(a, usdt)
        expr, t = arg.expr, arg.type
        if isinstance(expr, Comm) and t.array is None:
            exprs.append("owner[1]")
            continue
        if t.is_string or t.array:
            return None
        if isinstance(expr, (Register, StackPointer)):
            field_name = "rsp" if isinstance(expr, StackPointer) else REGISTER_FIELDS[expr.name]
            if field_name in CONSTANT_FIELDS and field_name not in recipe.regs:
                exprs.append(repr(converter(t)(CONSTANT_FIELDS[field_name] or ip)))
                continue
            raw = f"rec[{REC_VALUES + recipe.regs.index(field_name)}]"
        elif isinstance(expr, RetVal):
            raw = f"rec[{REC_VALUES + recipe.regs.index('rax')}]"
        elif isinstance(expr, StackEntry):
            raw = f"rec[{REC_VALUES + n_regs + (8 * expr.index - lo) // 8}]"
        elif isinstance(expr, Immediate):
            exprs.append(repr(converter(t)(expr.value & ((1 << 64) - 1))))
            continue
        else:
            base, offsets = split_derefs(expr)
            if len(offsets) != 1 or not (isinstance(base, StackPointer) or (
                    isinstance(base, Register) and base.name == "sp")):
                return None
            # `+OFF(%sp)`: `size` bytes of the recorded stack words, little-endian.
            at = offsets[0] - lo
            k, shift = REC_VALUES + n_regs + at // 8, 8 * (at % 8)
            word = f"rec[{k}]" if shift + 8 * t.size <= 64 else f"(rec[{k}] | rec[{k + 1}] << 64)"
            raw = f"(({word} >> {shift}) & {(1 << 8 * t.size) - 1:#x})"
        exprs.append(_converted(raw, t))
    args = f"({', '.join(exprs)}{',' if exprs else ''})"
    where = repr(ip) if func is None else f"rec[{REC_VALUES}]"  # a return: rip, recorded first
    source = (f"lambda rec, ts, owner: (ts, owner[0], rec[{REC_TID}], rec[{REC_AUX}] & {CPU_MASK}, "
              f"{probe.name!r}, "
              f"owner[1], {where}, {func!r}, {args})")
    return eval(compile(source, f"<{probe.name} record>", "eval"))  # type: ignore[no-any-return]


def _converted(raw: str, t: FetchType) -> str:
    """`converter(t)(raw)` as an expression (what fetch.converter computes)."""
    bits = t.size * 8
    mask = (1 << bits) - 1
    if t.bitfield is not None:
        lshift = t.bitfield.container - t.bitfield.width - t.bitfield.offset
        rshift = t.bitfield.container - t.bitfield.width
        return f"((({raw} << {lshift}) & {mask:#x}) >> {rshift})"
    if t.signed:
        sign = 1 << (bits - 1)
        return f"((({raw} & {mask:#x}) ^ {sign:#x}) - {sign:#x})"
    return raw if bits == 64 else f"({raw} & {mask:#x})"


class StackWindow:
    """The recorded stack words as readable memory (what `ArgFetcher` reads);
    nothing else is readable: a recipe covers every read of its probe."""

    __slots__ = ("start", "data")

    def __init__(self, start: int, data: bytes) -> None:
        self.start, self.data = start, data

    def read_upto(self, runtime_addr: int, n: int) -> bytes:
        off = runtime_addr - self.start
        if 0 <= off and off + n <= len(self.data):
            return self.data[off:off + n]
        raise MemoryFault(f"{runtime_addr:#x} was not recorded", runtime_addr)

    read = read_upto


@dataclass
class RecordedHit:
    """A hit read from a ring, as a `TaskLike` for the probe's dispatch:
    what the event handler of the int3 path reads of a `PtraceHit`."""

    probe: object
    regs: UserRegs
    mem: StackWindow
    pid: int
    tid: int
    comm: str
    cpu: int
    ip: int
    file_base: int
    ts_ns: int
    kind: str = "p"
    func: int | None = None
    changed: bool = field(default=False)


def regs_of(site: RecordedSite, values: tuple[int, ...]) -> tuple[UserRegs, StackWindow]:
    """The register set and stack window a record's values stand for."""
    regs = UserRegs()
    for name, value in CONSTANT_FIELDS.items():
        setattr(regs, name, site.ip if value is None else value)
    recipe = site.recipe
    n = len(recipe.regs)
    for name, value in zip(recipe.regs, values):
        setattr(regs, name, value)
    if recipe.stack is None:
        return regs, StackWindow(0, b"")
    lo, hi = recipe.stack
    words = (hi - lo) // 8
    return regs, StackWindow(regs.rsp + lo, struct.pack(f"<{words}Q", *values[n:n + words]))


class Recorder:
    """The tracer's reading side: probe ids, the clock, who each tid was."""

    FORMER_MAX = 4096  # exited threads remembered for their last records

    def __init__(self, counts: dict[str, int]) -> None:
        from uprobes.sys.tsc import TscClock

        self.counts = counts  # what direct sites' hits add to
        self.sites: list[RecordedSite] = []
        self.clock = TscClock()
        self._skew = self.clock.ticks(SKEW_S)
        self._former: dict[int, tuple[int, str]] = {}
        self.corrupt = 0  # records no probe's code can have written (see `_valid`)

    def site(self, site: RecordedSite) -> int:
        """A new probe id for `site`."""
        self.sites.append(site)
        return len(self.sites) - 1

    def former(self, tid: int, pid: int, comm: str) -> None:
        """Thread `tid` (of process `pid`, named `comm`) is gone; records it
        left may still be in a ring."""
        if len(self._former) >= self.FORMER_MAX:
            del self._former[next(iter(self._former))]
        self._former[tid] = (pid, comm)

    def drain(self, rings: list[Ring], who: Callable[[int], tuple[int, str] | None],
              deliver: Callable[[list[Hit]], None], final: bool = False) -> bool:
        """Deliver every committed record of `rings`, oldest first across
        rings: hit tuples of direct sites to `deliver` in batches, the others
        as a RecordedHit to their probe's dispatch. `who(tid)`: (pid, comm)
        of a live traced thread. True if it stopped after DRAIN_S with more
        to read."""
        until = time.monotonic() + DRAIN_S
        while self._drain_once(rings, who, deliver, final) >= TAKE_MAX:
            if not final and time.monotonic() >= until:
                return True  # the tracer has stops to handle too; it comes back at once
        return False

    def _drain_once(self, rings: list[Ring], who: Callable[[int], tuple[int, str] | None],
                    deliver: Callable[[list[Hit]], None], final: bool) -> int:
        before = sum(r.tail for r in rings)
        batches = [(r, r.take(final)) for r in rings]
        taken = sum(r.tail for r in rings) - before  # slots read or found lost
        if not taken:
            return 0
        now = tsc.read()
        seen: dict[int, tuple[int, str] | None] = {}
        records: list[tuple[int, ...]] = []
        for ring, got in batches:
            if got:
                records += self._valid(ring, got, who, seen, now)
        if not records:
            return taken
        owners = cast(dict[int, tuple[int, str]], seen)  # None only for records left out
        if sum(1 for _, b in batches if b) > 1:
            records.sort(key=lambda rec: rec[REC_TSC])
        clock = self.clock
        clock.refresh()
        scale, tsc0, ns0 = clock.rate()
        sites = self.sites
        counts = self.counts
        for probe_id, n in Counter(rec[REC_PROBE] for rec in records).items():
            direct = sites[probe_id].direct
            if direct is not None:
                counts[direct[0]] += n
        batch: list[Hit] = []
        append = batch.append
        for rec in records:
            site = sites[rec[REC_PROBE]]
            ts = ns0 + int((rec[REC_TSC] - tsc0) * scale)
            direct = site.direct
            if direct is not None:
                append(direct[1](rec, ts, owners[rec[REC_TID]]))
                continue
            if batch:
                deliver(batch)
                batch = []
                append = batch.append
            owner = owners[rec[REC_TID]]
            regs, window = regs_of(site, rec[REC_VALUES:])
            func = site.func
            if func is None:
                site.probe.dispatch(RecordedHit(  # type: ignore[attr-defined]
                    site.probe, regs, window, owner[0], rec[REC_TID], owner[1],
                    rec[REC_AUX] & CPU_MASK,
                    site.ip, site.file_base, ts))
            else:
                site.probe.ret_dispatch(RecordedHit(  # type: ignore[attr-defined]
                    site.probe, regs, window, owner[0], rec[REC_TID], owner[1],
                    rec[REC_AUX] & CPU_MASK,
                    regs.rip, site.file_base, ts, "r", func))
        if batch:
            deliver(batch)
        return taken

    def _valid(self, ring: Ring, batch: list[tuple[int, ...]],
               who: Callable[[int], tuple[int, str] | None],
               owners: dict[int, tuple[int, str] | None], now: int) -> list[tuple[int, ...]]:
        """The records of `batch` that the probes' code can have written
        (the program can write its ring too): a probe id of this ring, a
        thread we trace (or traced), a CPU that exists, a time stamp between
        the ring's making and `now` (TSC ticks). The rest are counted in
        `corrupt`. `owners` gets (pid, comm) of each tid seen."""
        get = operator.itemgetter
        former = self._former
        for tid in set(map(get(REC_TID), batch)) - owners.keys():
            owners[tid] = who(tid) or former.get(tid)
        skew = self._skew
        if set(map(get(REC_PROBE), batch)) <= ring.probe_ids \
                and not any(map(get(REC_PROBE_HIGH), batch)) \
                and max(map(get(REC_AUX), batch)) < CPUS \
                and ring.created - skew <= min(map(get(REC_TSC), batch)) \
                and max(map(get(REC_TSC), batch)) <= now + skew \
                and all(owners[tid] is not None for tid in set(map(get(REC_TID), batch))):
            return batch  # the common case, checked column by column
        lo, hi, ids = ring.created - skew, now + skew, ring.probe_ids
        good = [rec for rec in batch
                if rec[REC_PROBE] in ids and not rec[REC_PROBE_HIGH]
                and (rec[REC_AUX] & CPU_MASK) < CPUS and rec[REC_AUX] >> CPU_BITS < _NODES_MAX
                and lo <= rec[REC_TSC] <= hi and owners[rec[REC_TID]] is not None]
        self.corrupt += len(batch) - len(good)
        return good


class ShapedLines:
    """Hits of recorded probes to lines by the renderer's row templates (the
    kernel engine's fast path, engines/kernel/lines.py, used on our hits):
    a stretch of hits sharing probe, task, CPU, comm and addresses is one
    `RowShape`, its rows `(ts_ns, *args)` filled into the shape's template.
    The same lines as `renderer.lines(hits)`, at a fraction of the cost."""

    def __init__(self, renderer: LineRenderer) -> None:
        self.renderer = renderer
        self._writers: dict[tuple[object, ...], object] = {}

    def write(self, hits: list[Hit]) -> None:
        renderer = self.renderer
        lines: list[str] = []
        n = len(hits)
        i = 0
        while i < n:
            first = hits[i]
            key = first[1:8]
            j = i + 1
            while j < n and hits[j][1:8] == key:
                j += 1
            writer = self._writers.get(key, _UNSET)
            if writer is _UNSET:
                _, pid, tid, cpu, probe, comm, ip, func, _ = first
                writer = self._writers[key] = renderer.row_lines(
                    RowShape(probe=probe, comm=comm, pid=pid, tid=tid, cpu=cpu, ip=ip,
                             func=func))
            piece = hits[i:j]
            if writer is None:
                lines += renderer.lines(piece)
            elif isinstance(writer, str):
                fill = writer.__mod__
                lines += [fill((h[0], *h[8])) for h in piece]
            else:
                lines += writer([(h[0], *h[8]) for h in piece])  # type: ignore[operator]
            i = j
        renderer.write_lines(lines)


_UNSET = object()
