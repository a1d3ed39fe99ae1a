"""Counts by key computed in the program: `count --by KEY [--value ARG]`.

A keyed probe's jump patch runs `prologue`: it takes the key (the thread's
tid, or a fetched register or stack word, extended as its type says) and
looks it up in its probe's table in shared memory: a bounded open-addressing
hash table (layout.py: KEY_ENTRIES entries of one cache line each, KEY_PROBES
places tried). The entry's count goes up by a `lock inc`; with a value, its
sum by `lock add` and its min and max by compare-and-swap loops. A key
that finds no place (the table full there) bumps the table's overflow
counter instead, which the run reports: never silent.

An entry is claimed by a compare-and-swap of its state from free to
claimed; the claimer writes the key and the min/max starting points, then
marks it ready. A thread that finds an entry claimed but not ready moves on
to the next place, so a key may get two entries; the reader merges
entries by key.

The program can write every word of its tables: the reader takes only
ready entries whose count hits can have reached since the table was
mapped (`corrupt` counts the rest, reported in one line), and bounds the
overflow counter the same way.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iced_x86 import Code, Instruction
from iced_x86 import Register as R

from uprobes.analysis.keyed import Aggregate
from uprobes.engines.trapfree.layout import (
    ENTRY_KEY,
    KEY_COUNT,
    KEY_ENTRIES,
    KEY_ENTRY_BYTES,
    KEY_KEY,
    KEY_KEY2,
    KEY_MAX,
    KEY_MIN,
    KEY_PROBES,
    KEY_STATE,
    KEY_SUM,
    KEYED_TABLES,
    KEYED_TABLES_OFFSET,
    KEYED_TLS,
    NO_KEPT_VERDICTS,
    ROW_STACK,
    TABLE_BYTES,
    TABLE_ENTRIES,
    TABLE_OVERFLOW,
    TIMING_TLS,
)
from uprobes.engines.trapfree.recording import needs
from uprobes.engines.trapfree.sharedmem import most_hits
from uprobes.engines.trapfree.timing import (
    COMM_BYTES,
    ENTER_FRAME,
    UNREAD_MARK,
    KeyLoad,
    _Asm,
    _enter,
    _leave,
    _locked_inc,
    _mem,
    _tid,
    claim_entry,
    comm_into,
    key_hash,
    key_matches,
    key_store,
)
from uprobes.lang.ast import FetchArg, UsdtTarget
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.abi import lower_fetcharg

_READY = 2  # an entry's state once its key is written (timing.claim_entry claims it)
_SAVED_AT = {"rdi": 0, "rsi": 8, "rdx": 16, "rcx": 24, "rax": 40}  # after timing._enter
_REGS: dict[str, Any] = {"rbx": R.RBX, "rbp": R.RBP, **{f"r{n}": getattr(R, f"R{n}")
                                                       for n in range(8, 16)}}
_ENTRY = struct.Struct("<QQQqqqQ")  # state, key, count, sum, min, max (raw), key's 2nd word
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Source:
    """Where a key or value comes from at the probe: a register (a `UserRegs`
    field), or `stack` bytes above the stack pointer; `size` bytes of it,
    sign-extended when `signed`. `reg` "tid": the thread's id."""

    reg: str | None
    stack: int | None = None
    size: int = 8
    signed: bool = False


TID = Source("tid", size=4)
COMM = Source("comm", size=16)
"""The thread's name at the hit, asked of the kernel (timing.comm_into): a
16-byte key. A name changes at any time (filtercode.py says how), so the
hit's own is the one to key by, not the one uprobes last saw."""


def load(a: _Asm, src: Source, dst: Any, frame: int, block: int,
         flag: int = KEYED_TLS) -> None:
    """dst (rsi or rdx) = the source's value, extended to 64 bits (`flag`:
    where in the block at `block` the tid's TLS flag is)."""
    i = Instruction
    if src.reg == "tid":
        assert dst == R.RSI
        _tid(a, block, flag)  # esi, zero-extended
        return
    if src.stack is not None:
        a(i.create_reg_mem(Code.MOV_R64_RM64, dst, _mem(R.RSP, frame + src.stack)))
    elif src.reg == "rsp":
        a(i.create_reg_mem(Code.LEA_R64_M, dst, _mem(R.RSP, frame)))
    elif src.reg in _SAVED_AT:
        # (a frame larger than _enter's: the code keeps more below it)
        saved = _SAVED_AT[src.reg] + frame - ENTER_FRAME
        a(i.create_reg_mem(Code.MOV_R64_RM64, dst, _mem(R.RSP, saved)))
    else:
        assert src.reg is not None
        a(i.create_reg_reg(Code.MOV_R64_RM64, dst, _REGS[src.reg]))
    low = {R.RSI: (R.ESI, R.SI, R.SIL), R.RDX: (R.EDX, R.DX, R.DL)}[dst]
    if src.size == 4:
        a(i.create_reg_reg(Code.MOVSXD_R64_RM32, dst, low[0]) if src.signed
          else i.create_reg_reg(Code.MOV_R32_RM32, low[0], low[0]))
    elif src.size == 2:
        a(i.create_reg_reg(Code.MOVSX_R64_RM16 if src.signed else Code.MOVZX_R64_RM16,
                           dst, low[1]))
    elif src.size == 1:
        a(i.create_reg_reg(Code.MOVSX_R64_RM8 if src.signed else Code.MOVZX_R64_RM8,
                           dst, low[2]))


UNKNOWN_COMM = "[unknown]"
"""The key of hits whose thread name could not be read (a seccomp filter
failed the prctl): comm_into's UNREAD_MARK."""


def comm_name(raw: int) -> str:
    """A COMM key (its 16 bytes as a little-endian number) as the name."""
    got = raw.to_bytes(COMM_BYTES, "little")
    if got[-1] == UNREAD_MARK:
        return UNKNOWN_COMM
    return got.split(b"\0", 1)[0].decode(errors="replace")


def timing_key(src: Source, block: int, seal: int = 0) -> KeyLoad:
    """`src` as the key of a timed call (timing.entry_code), in the timing
    block at `block`; `seal`: the seccomp word guarding a name's prctl."""
    i = Instruction
    at = ROW_STACK + ENTRY_KEY

    def emit(a: _Asm, frame: int) -> None:
        if src is COMM:
            a.seal = seal
            a(i.create_reg(Code.PUSH_R64, R.RCX), i.create_reg(Code.PUSH_R64, R.R11))
            comm_into(a, R.RCX, at)
            a(i.create_reg(Code.POP_R64, R.R11), i.create_reg(Code.POP_R64, R.RCX))
            return
        load(a, src, R.RDX, frame, block, TIMING_TLS)
        a(i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RCX, at), R.RDX),
          i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RCX, at + 8), 0))
    return emit


def loadable(reg: str | None, stack: int | None) -> bool:
    """Whether `load` can read a register (or the stack) the recording recipe names."""
    return stack is not None or reg in ("rsp", *_SAVED_AT, *_REGS)


def source_of(probe: ResolvedProbe, name: str, ret: bool) -> Source | str:
    """Where probe line `probe`'s fetcharg `name` is at its hit, or why it
    cannot be read in the program. `ret`: the code runs right before the
    probed `ret` (the stack a return probe sees is 8 bytes higher)."""
    arg = next((a for a in probe.args if a.name == name), None)
    if arg is None:
        return f"it fetches no {name}"
    usdt = probe.usdt_args if isinstance(probe.spec.target, UsdtTarget) else None
    low: FetchArg = lower_fetcharg(arg, usdt)
    t = low.type
    if t.is_string or t.bitfield is not None or t.array or t.base == "char":
        return f"{name}: only whole integers are keys and values in the program"
    need = needs(low)
    if isinstance(need, str):
        return f"{name}: {need}"
    reg, span = need
    stack = None if span is None else span[0] + (8 if ret else 0)
    if span is not None and span[1] - span[0] > 8 or not loadable(reg, stack) \
            or (ret and reg == "rsp"):
        return f"{name}: not a register or stack word the program's code can read"
    return Source(reg, stack, t.size, t.base.startswith("s"))


Guard = Callable[[_Asm, int], None]
"""Code that goes to "done" for a hit not to count (given the frame's size):
a filter compiled by filtercode.py."""


def prologue(at: int, block: int, table: int, key: Source, value: Source | None,
             guard: Guard | None = None, seal: int = 0) -> bytes:
    """The keyed count for a trampoline at `at`: table `table` of the keyed
    block at `block` (within rel32 reach); a hit `guard` turns away costs
    its test and nothing else. `seal`: the seccomp word guarding a name
    key's prctl (timing.comm_into)."""
    assert 0 <= table < KEYED_TABLES
    i = Instruction
    a = _Asm()
    frame = _enter(a)
    if guard is not None:
        guard(a, frame)
    if value is not None:
        load(a, value, R.RDX, frame, block)
    # The key's second word on the stack (the rest of a comm, else 0), popped at "kdone".
    if key is COMM:
        a.seal = seal
        a(i.create_reg(Code.PUSH_R64, R.R11),
          i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, -COMM_BYTES)))
        comm_into(a, R.RSP, 0)  # the system call keeps rdx, the value
        a(i.create_reg(Code.POP_R64, R.RSI))
    else:
        load(a, key, R.RSI, frame, block)
        a(i.create_i32(Code.PUSHQ_IMM32, 0))
    second = _mem(R.RSP, 0)
    entries = block + KEYED_TABLES_OFFSET + table * TABLE_BYTES + TABLE_ENTRIES
    key_hash(a, second, KEY_ENTRIES)
    for k in range(KEY_PROBES):
        nxt, free = f"next{k}", f"free{k}"
        a(i.create_reg_mem(Code.LEA_R32_M, R.ECX, _mem(R.RAX, k)),
          i.create_reg_i32(Code.AND_RM32_IMM32, R.ECX, KEY_ENTRIES - 1),
          i.create_reg_i32(Code.SHL_RM64_IMM8, R.RCX, KEY_ENTRY_BYTES.bit_length() - 1),
          i.create_reg_mem(Code.LEA_R64_M, R.RDI, _mem(R.RIP, entries)),
          i.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RCX),
          i.create_mem_i32(Code.CMP_RM64_IMM8, _mem(R.RDI, KEY_STATE), _READY))
        a.jump(Code.JNE_REL32_64, free)
        key_matches(a, (KEY_KEY, KEY_KEY2), second, nxt)
        a.jump(Code.JMP_REL32_64, "found")
        a.label(free)
        claim_entry(a, KEY_STATE, nxt)
        lo, hi = ((1 << 63) - 1, 1 << 63) if value is not None and value.signed else (_U64, 0)
        key_store(a, (KEY_KEY, KEY_KEY2), second)
        a(i.create_reg_u64(Code.MOV_R64_IMM64, R.RCX, lo),
          i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, KEY_MIN), R.RCX),
          i.create_reg_u64(Code.MOV_R64_IMM64, R.RCX, hi),
          i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI, KEY_MAX), R.RCX),
          i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RDI, KEY_STATE), _READY))
        a.jump(Code.JMP_REL32_64, "found")
        a.label(nxt)
    a(_locked_inc(block + KEYED_TABLES_OFFSET + table * TABLE_BYTES + TABLE_OVERFLOW))
    a.jump(Code.JMP_REL32_64, "kdone")
    a.label("found")
    inc = i.create_mem(Code.INC_RM64, _mem(R.RDI, KEY_COUNT))
    inc.has_lock_prefix = True
    a(inc)
    if value is not None:
        add = i.create_mem_reg(Code.ADD_RM64_R64, _mem(R.RDI, KEY_SUM), R.RDX)
        add.has_lock_prefix = True
        a(add)
        below = Code.JGE_REL32_64 if value.signed else Code.JAE_REL32_64
        above = Code.JLE_REL32_64 if value.signed else Code.JBE_REL32_64
        for field, keep, name in ((KEY_MIN, below, "min"), (KEY_MAX, above, "max")):
            cas = i.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R.RDI, field), R.RDX)
            cas.has_lock_prefix = True
            a(i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RDI, field)))
            a.label(name)
            a(i.create_reg_reg(Code.CMP_R64_RM64, R.RDX, R.RAX))
            a.jump(keep, f"{name}_kept")  # the value does not beat what is there
            a(cas)  # rax reloaded with what is there when another thread won
            a.jump(Code.JNE_REL32_64, name)
            a.label(f"{name}_kept")
    a.label("kdone")
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, 8)))  # the key's second word
    if key is COMM:
        a(i.create_reg(Code.POP_R64, R.R11))
    _leave(a)
    return a.encode(at)


def prologue_size(value: bool) -> int:
    worst = Source("rdi", size=1, signed=True)
    return max(len(prologue(0x10000000, 0x10100000, KEYED_TABLES - 1, key,
                            worst if value else None, seal=0x10200000))
               for key in (worst, COMM)) \
        + 64  # the tid path is longer


class KeyedBlock:
    """One memfd of keyed tables, mapped in a tracee (and its fork children) and here."""

    def __init__(self, view: mmap.mmap, runtime_addr: int) -> None:
        self.view = view
        self.runtime_addr = runtime_addr
        self.made = time.monotonic()
        self.used = 0
        self.corrupt = 0  # entries and counters left out: counts no run can have reached

    def alloc(self) -> int | None:
        if self.used >= KEYED_TABLES:
            return None
        self.used += 1
        return self.used - 1

    def tls_confirmed(self) -> None:
        self.view[KEYED_TLS] = 1

    def no_kept_verdicts(self) -> None:
        self.view[KEYED_TLS + NO_KEPT_VERDICTS] = 1

    def read(self, table: int, signed: bool) -> tuple[dict[int, Aggregate], int]:
        """Table `table`'s entries by raw key (its 16 bytes as a
        little-endian number), and its overflow count."""
        bound = most_hits(time.monotonic() - self.made)
        base = KEYED_TABLES_OFFSET + table * TABLE_BYTES
        overflow = struct.unpack_from("<Q", self.view, base + TABLE_OVERFLOW)[0]
        if overflow > bound:
            self.corrupt += 1
            overflow = 0
        out: dict[int, Aggregate] = {}
        for n in range(KEY_ENTRIES):
            state, low, count, total, lo, hi, high = _ENTRY.unpack_from(
                self.view, base + TABLE_ENTRIES + n * KEY_ENTRY_BYTES)
            key = low | high << 64
            if state != _READY or not count:
                continue
            if count > bound:
                self.corrupt += 1
                continue
            if not signed:
                total, lo, hi = total & _U64, lo & _U64, hi & _U64
            out.setdefault(key, Aggregate()).add(count, total, lo, hi)
        return out, overflow
