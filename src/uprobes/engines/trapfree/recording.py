"""Trap-free recording probes: a hit writes its values into a shared ring, no stop.

`count` needs only a counter per probe (trampoline.py). `trace` needs each
hit's values, and an int3 costs a ptrace stop per hit (microseconds). A
probe whose fetchargs are registers, `$stack`, `$stackN`, `+OFF(%sp)`,
immediates or `$comm` needs no tracer at the hit either: the jump patch's
trampoline copies what the probe fetches into a ring that the program maps
MAP_SHARED and uprobes reads (jumppatch.py places it; this module says
what a probe records and builds the code that records it; reader.py reads
the ring and turns records back into hits).

The trampoline (`prologue`), after stepping below the red zone:

    pushfq; push rax, rcx, rdx, rsi, r11   ; all it changes
    tid   -> esi: mov esi, fs:[0x2d0]       ; glibc's struct pthread tid, checked
                                            ; per process before use (RING_TLS, when
                                            ; placed before it could be); else gettid
    rdtscp                                  ; time and TSC_AUX (the CPU), no syscall
    reserve a slot: head - tail < slots ? lock cmpxchg head, head+1 : wait
                    (a lost compare-and-swap retries, unless GIVE_UP_S passed)
    slot: tsc, tid|aux<<32, probe id, the values; then seq = index + 1 (commit)
    lock inc committed                      ; the reader's fast path (see ring.py)
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
(`valid_records`, reader.py); what it leaves out is counted apart (`corrupt`) and
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

A probe that gives stacks (`stacks`, `trace --stack`, native frames only)
records every general register and copies `copy` bytes of the stack from
the stack pointer up into its slot's copy area (layout.STACKS), with no
system call (a seccomp filter installed later could kill the program for
one), never past the end of the thread's stack as the tracer's table gives
it (stackbounds.py), so the copy never faults. The count goes in the
record's last word (0: none copied); the reader walks that copy as the
int3 path walks its read.

Values are raw registers and stack words. A probe whose only consumer is
the tracer's own, unfiltered, becomes its hit tuple by one generated
function (`direct_hit`: ArgFetcher's conversions written out); the rest
get a register set and a window of stack rebuilt (`regs_of`) and go
through their dispatch and the same `ArgFetcher` as the int3 path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, RepPrefixKind
from iced_x86 import Register as R

from uprobes.engines.tracee.fetch import REGISTER_FIELDS, split_derefs
from uprobes.engines.trapfree import stackbounds
from uprobes.engines.trapfree.layout import (
    COMMITTED,
    DATA_OFFSET,
    HEAD,
    HEARTBEAT,
    LONG,
    LOST,
    MAX_WORDS,
    PY_SEALED,
    PY_STACKS,
    RING_TLS,
    SHORT,
    SLOT_PROBE,
    SLOT_SEQ,
    SLOT_TID,
    SLOT_TSC,
    SLOT_VALUES,
    STACKS,
    STALLED,
    TAIL,
    WAITERS,
    RingShape,
)
from uprobes.engines.trapfree.pywalk import PyWalk, Seal, walk_block
from uprobes.lang.ast import (
    Comm,
    FetchArg,
    Immediate,
    ImmString,
    Register,
    RetVal,
    StackEntry,
    StackPointer,
    UsdtTarget,
)
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.abi import lower_fetcharg

STACK_MAX = 512                     # bytes above the stack pointer a probe may record
GLIBC_TID_OFFSET = 0x2D0            # offsetof(struct pthread, tid) on x86-64 glibc
_RED_ZONE = 128
_SAVED = ("r11", "rsi", "rdx", "rcx", "rax", "eflags")  # from rsp up, after the pushes
_FRAME = 8 * len(_SAVED) + _RED_ZONE  # rsp + _FRAME = the stack pointer at the probe
_NR_GETTID = 186
_NR_FUTEX = 202
STACK_REGS = ("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp",
              *(f"r{n}" for n in range(8, 16)))
"""What a stack-copying probe records: the registers an unwinder may read, in
DWARF order (the ip is the probe's address)."""
WAIT_S = 3.0  # how long a hit waits for room in a full ring before the ring is "stalled"
GIVE_UP_S = 10.0  # the longest one hit waits for room, even with a live reader
SKEW_S = 0.001  # how far apart two CPUs' time-stamp counters may be
NAP_NS = 20_000_000  # one futex wait's timeout (a wake-up lost in a race costs no more)
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
    copy: int = 0  # bytes of stack copied from the stack pointer up (STACKS slots)
    py: PyWalk | None = None  # and then the Python frames (pywalk.py)

    @property
    def words(self) -> int:
        lo_hi = self.stack
        return len(self.regs) + (0 if lo_hi is None else (lo_hi[1] - lo_hi[0]) // 8) \
            + (1 if self.copy else 0)  # (the count copied, last)


def recipe_for(points: list[ResolvedProbe], ret: bool = False, copy: int = 0) -> Recipe | str:
    """What one probed instruction must record for every probe line on it
    (`points`, one per consumer) to be fetched from a ring, or why it cannot.
    `ret`: the instruction is a `ret` and the lines are return probes.
    `copy`: bytes of the stack to copy at each hit (the stack's frames)."""
    if copy and ret:
        return "a return probe's stack is copied at its int3"
    if copy > STACKS.copy:
        return f"its stack copy of {copy} bytes is more than a record holds ({STACKS.copy})"
    regs: list[str] = ["rip"] if ret else []
    lo, hi = STACK_MAX, 0
    for probe in points:
        if probe.is_return != ret:
            return "a return probe" if probe.is_return else "an entry probe on a ret"
        usdt = probe.usdt_args if isinstance(probe.spec.target, UsdtTarget) else None
        for a in probe.args:
            arg = lower_fetcharg(a, usdt)
            need = needs(arg)
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
    if copy:
        regs += [r for r in STACK_REGS if r not in regs]
    recipe = Recipe(tuple(regs), stack, ret, copy)
    most = STACKS.words if copy else MAX_WORDS
    if recipe.words > most:
        return f"it fetches {recipe.words} words; a record holds {most}"
    return recipe


def needs(arg: FetchArg) -> tuple[str | None, tuple[int, int] | None] | str:
    """(the register, the stack span) one argument reads, or why it cannot be recorded."""
    expr, t = arg.expr, arg.type
    if isinstance(expr, (Comm, ImmString)):
        return None, None
    if t.is_string:
        return "a string is read from memory (a trap-free probe records registers and the " \
               "stack only)"
    if isinstance(expr, Immediate):
        return None, None
    if isinstance(expr, Register) and expr.name not in REGISTER_FIELDS:
        return f"it reads {expr.name} (a trap-free probe records the general registers)"
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


def shape_for(recipes: Iterable[Recipe], python: bool = False) -> RingShape:
    """The slots of a run's rings: short if every record fits; `python`: its
    stack copies are followed by Python frames (PY_STACKS). One shape for
    the run, so an address space has one ring and its records one order
    (the reader merges rings by time stamp only within a read)."""
    recipes = list(recipes)
    if any(r.copy for r in recipes):
        return PY_STACKS if python else STACKS
    return SHORT if all(r.words <= SHORT.words for r in recipes) else LONG


def prologue(at: int, ring_addr: int, recipe: Recipe, probe_id: int, tls_tid: bool,
             waits: Waits, shape: RingShape = LONG, bounds: int = 0, seal: int = 0) -> bytes:
    """The recording code for a trampoline at `at` whose ring (of `shape`) is
    at `ring_addr` (within rel32 reach); it falls through to the displaced
    instructions. `bounds`: the address space's stack table (stackbounds.py),
    for a recipe that copies the stack. `seal`: the seccomp word
    (sandboxes.py) that guards the Python walk's system calls, if any (the
    hits it keeps from them counted at the ring's PY_SEALED)."""
    assert recipe.words <= shape.words and recipe.copy <= shape.copy
    slots = shape.slots
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
    from_tls = i.create_reg_mem(Code.MOV_R32_RM32, R.ESI,
                                MemoryOperand(R.NONE, displ=GLIBC_TID_OFFSET, seg=R.FS))
    je_gettid = jmp_have = -1
    if tls_tid:
        code.append(from_tls)
    else:
        # Placed before the thread pointer was seen to hold the tid (a
        # command's probes go in at its exec, before the dynamic linker sets
        # it up): read it there once the tracer says so (RING_TLS), else ask
        # the kernel (a system call: hundreds of ns in a VM).
        code += [i.create_mem_i32(Code.CMP_RM8_IMM8, _mem(R.RIP, ring_addr + RING_TLS), 0),
                 None, from_tls, None]  # je gettid; jmp have
        je_gettid, jmp_have = len(code) - 3, len(code) - 1
        code += [i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, _NR_GETTID),
                 i.create(Code.SYSCALL), i.create_reg_reg(Code.MOV_R32_RM32, R.ESI, R.EAX)]
    have_tid = len(code)
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
        i.create_reg_i32(Code.CMP_RM64_IMM32, R.RCX, slots),
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
        i.create_reg_i32(Code.AND_RM64_IMM32, R.RCX, slots - 1),
        i.create_reg_i32(Code.SHL_RM64_IMM8, R.RCX, shape.shift),
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
    if recipe.copy:
        code += _stack_copy(recipe, shape, bounds, len(code))
    if recipe.py is not None:
        code += walk_block(recipe.py, shape.copy_offset,
                           Seal(seal, ring_addr + PY_SEALED) if seal else None)
    # The commit, counted (a locked add: stores before it are seen before it);
    # then jmp done.
    counted = i.create_mem(Code.INC_RM64, _mem(R.RIP, ring_addr + COMMITTED))
    counted.has_lock_prefix = True
    code += [i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, SLOT_SEQ), R.RDX), counted, None]
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
    if not tls_tid:
        code[je_gettid] = i.create_branch(Code.JE_REL32_64, labels[jmp_have + 1])
        code[jmp_have] = i.create_branch(Code.JMP_REL32_64, labels[have_tid])
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


def _stack_copy(recipe: Recipe, shape: RingShape, bounds: int, base: int) -> list[Instruction]:
    """Copy up to `recipe.copy` bytes from the probe's stack pointer up into
    the slot at rcx, never past the end of the range that holds the stack
    pointer in the table at `bounds` (stackbounds.py), the count in the
    record's last word (0: in no range, nothing copied). No system call: a
    seccomp filter the program installs later cannot make it kill the
    program. `base`: the index of its first instruction in the prologue's
    list (its branches' labels). Every register it changes is put back
    (rdx: the commit's sequence word), the flags by the prologue."""
    i = Instruction
    saved = (R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11)
    count_at = SLOT_VALUES + 8 * (recipe.words - 1)
    code: list[Instruction | tuple[Any, str]] = [  # (a branch's Code, its label)
        *(i.create_reg(Code.PUSH_R64, r) for r in saved),
        i.create_reg_mem(Code.LEA_R64_M, R.R8, _mem(R.RSP, 8 * len(saved) + _FRAME)),
        i.create_reg_u64(Code.MOV_R64_IMM64, R.R9, bounds),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.R10D, stackbounds.SLOTS),
        i.create_reg_reg(Code.XOR_R32_RM32, R.EAX, R.EAX),
    ]
    labels = {"scan": len(code)}
    code += [
        i.create_reg_mem(Code.MOV_R64_RM64, R.R11, _mem(R.R9)),  # seq: odd while written
        i.create_reg_i32(Code.TEST_RM32_IMM32, R.R11D, 1),
        (Code.JNE_REL32_64, "next"),
        i.create_reg_mem(Code.MOV_R64_RM64, R.RSI, _mem(R.R9, 8)),   # start
        i.create_reg_mem(Code.MOV_R64_RM64, R.RDX, _mem(R.R9, 16)),  # end
        i.create_reg_mem(Code.CMP_R64_RM64, R.R11, _mem(R.R9)),  # rewritten meanwhile?
        (Code.JNE_REL32_64, "next"),
        i.create_reg_reg(Code.CMP_R64_RM64, R.R8, R.RSI),
        (Code.JB_REL32_64, "next"),
        i.create_reg_reg(Code.CMP_R64_RM64, R.R8, R.RDX),
        (Code.JAE_REL32_64, "next"),
        i.create_reg_reg(Code.SUB_R64_RM64, R.RDX, R.R8),  # bytes to the range's end
        i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, recipe.copy),
        i.create_reg_reg(Code.CMP_R64_RM64, R.RDX, R.RAX),
        i.create_reg_reg(Code.CMOVB_R64_RM64, R.RAX, R.RDX),
        i.create_reg_mem(Code.LEA_R64_M, R.RDI, _mem(R.RCX, shape.copy_offset)),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.R8),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX),
        i.create(Code.CLD),
        i.create_movsb(64, R.NONE, RepPrefixKind.REPE),  # rep movsb
        (Code.JMP_REL32_64, "done"),
    ]
    labels["next"] = len(code)
    code += [
        i.create_reg_i32(Code.ADD_RM64_IMM8, R.R9, stackbounds.ENTRY),
        i.create_reg_i32(Code.SUB_RM32_IMM8, R.R10D, 1),
        (Code.JNE_REL32_64, "scan"),
    ]
    labels["done"] = len(code)
    code += [
        *(i.create_reg(Code.POP_R64, r) for r in reversed(saved)),
        i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, count_at), R.RAX),
    ]
    # The prologue's labels are its list's indices + 1 (see `prologue`).
    return [i.create_branch(c[0], 1 + base + labels[c[1]]) if isinstance(c, tuple) else c
            for c in code]


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
    shape = PY_STACKS if recipe.py else STACKS if recipe.copy else LONG
    return len(prologue(0x10000000, 0x10100000, recipe, 0, tls_tid, _SIZING_WAITS, shape,
                        seal=0x10200000))


_SIZING_WAITS = Waits(1 << 40, 1 << 40, 1 << 20)
