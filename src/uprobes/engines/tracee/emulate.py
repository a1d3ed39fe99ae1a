"""Instructions the tracer performs itself on a stopped thread's registers and memory.

An emulated probe costs one trap and never puts the thread in the XOL area:
at the int3 stop the tracer applies the instruction to the saved registers
(and, for call/push/ret, to the stack through the process's memory) and
resumes at the result.  This is the kernel's `branch_xol_ops`/`push_xol_ops`
tier (arch/x86/kernel/uprobes.c), widened to what a user-space tracer can do
as cheaply: indirect call/jmp (PLT stubs are `jmp [rip+disp]`), ret, push imm,
loop/jrcxz.

Every emulation reads what it needs first and changes the registers last, so
a memory fault (`mem` raising) leaves `regs` untouched; it then returns False
and the caller runs the plan's slot code instead, where the real instruction
takes the real fault or grows the stack (remote writes through /proc/PID/mem
never expand a stack VMA since Linux 6.5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from iced_x86 import ConditionCode, ConditionCode_, Register, Register_, RegisterExt

from uprobes.errors import UprobesError

MASK64 = (1 << 64) - 1

# struct user_regs_struct names, in x86 register-number order (iced's RegisterExt.number).
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

_CF, _PF, _ZF, _SF, _OF = 1 << 0, 1 << 2, 1 << 6, 1 << 7, 1 << 11


class Memory(Protocol):
    """What emulation needs of a process's memory (uprobes.sys.procmem.ProcessMemory)."""

    def read(self, runtime_addr: int, n: int) -> bytes: ...

    def write(self, runtime_addr: int, data: bytes) -> None: ...


Regs = Any  # uprobes.sys.ptrace.UserRegs, or any object with its field names
Emulation = Callable[[Regs, Memory], bool]


def gpr_name(register: Register_) -> str:
    """The user_regs_struct field holding `register`'s full 64-bit register."""
    return GPR_NAMES[RegisterExt.number(RegisterExt.full_register(register))]


def read_gpr(regs: Regs, register: Register_) -> int:
    """The value of a general-purpose register as the instruction sees it (8..64 bits)."""
    value = int(getattr(regs, gpr_name(register))) & MASK64
    return value & ((1 << (8 * RegisterExt.size(register))) - 1)


def condition_holds(condition: ConditionCode_, eflags: int) -> bool:
    """Whether a jcc/setcc/cmovcc condition (iced ConditionCode) is true for `eflags`."""
    cf, pf, zf = bool(eflags & _CF), bool(eflags & _PF), bool(eflags & _ZF)
    sf, of = bool(eflags & _SF), bool(eflags & _OF)
    base = {
        ConditionCode.O: of, ConditionCode.NO: not of,
        ConditionCode.B: cf, ConditionCode.AE: not cf,
        ConditionCode.E: zf, ConditionCode.NE: not zf,
        ConditionCode.BE: cf or zf, ConditionCode.A: not (cf or zf),
        ConditionCode.S: sf, ConditionCode.NS: not sf,
        ConditionCode.P: pf, ConditionCode.NP: not pf,
        ConditionCode.L: sf != of, ConditionCode.GE: sf == of,
        ConditionCode.LE: zf or sf != of, ConditionCode.G: not zf and sf == of,
    }
    return base[condition]


@dataclass(frozen=True)
class MemRef:
    """A memory operand, with a RIP-relative one already made absolute (`displacement`)."""

    base: Register_
    index: Register_
    scale: int
    displacement: int
    segment: Register_
    addr32: bool

    def address(self, regs: Regs) -> int:
        """The runtime address the operand names for these registers."""
        addr = self.displacement
        if self.base not in (Register.NONE, Register.RIP, Register.EIP):
            addr += read_gpr(regs, self.base)
        if self.index != Register.NONE:
            addr += read_gpr(regs, self.index) * self.scale
        addr &= 0xFFFFFFFF if self.addr32 else MASK64
        if self.segment == Register.FS:
            addr += int(regs.fs_base)
        elif self.segment == Register.GS:
            addr += int(regs.gs_base)
        return addr & MASK64


def _read_u64(mem: Memory, runtime_addr: int) -> int | None:
    try:
        data = mem.read(runtime_addr, 8)
    except (UprobesError, OSError):
        return None
    return int.from_bytes(data, "little") if len(data) == 8 else None


def _push(regs: Regs, mem: Memory, value: int) -> bool:
    """Store `value` below the stack pointer; False (nothing changed) if it faults."""
    sp = (int(regs.rsp) - 8) & MASK64
    try:
        mem.write(sp, (value & MASK64).to_bytes(8, "little"))
    except (UprobesError, OSError):
        return False
    regs.rsp = sp
    return True


@dataclass(frozen=True)
class Advance:
    """nop, endbr64: nothing happens but the instruction pointer moving on."""

    next_ip: int

    def __call__(self, regs: Regs, mem: Memory) -> bool:
        regs.rip = self.next_ip
        return True


@dataclass(frozen=True)
class Branch:
    """jmp rel, jcc rel, and (with `counter`) loop/loopcc/jrcxz: a direct branch."""

    next_ip: int
    target: int
    condition: ConditionCode_ = ConditionCode.NONE   # jcc/loopcc's flag condition, NONE: always
    counter: str | None = None            # "loop": decrement rcx, taken while non-zero;
    counter_bits: int = 64                # "jrcxz": taken if rcx is zero

    def __call__(self, regs: Regs, mem: Memory) -> bool:
        taken = True
        if self.counter is not None:
            mask = (1 << self.counter_bits) - 1
            rcx = int(regs.rcx) & MASK64
            if self.counter == "loop":
                rcx = (rcx & ~mask) | (((rcx & mask) - 1) & mask)
                regs.rcx = rcx
            taken = (rcx & mask) != 0 if self.counter == "loop" else (rcx & mask) == 0
        if self.condition != ConditionCode.NONE:
            taken = taken and condition_holds(self.condition, int(regs.eflags))
        regs.rip = self.target if taken else self.next_ip
        return True


@dataclass(frozen=True)
class IndirectTarget:
    """Where an indirect call/jmp goes: a register or a pointer in memory."""

    register: Register_ = Register.NONE
    memory: MemRef | None = None

    def resolve(self, regs: Regs, mem: Memory) -> int | None:
        if self.memory is None:
            return read_gpr(regs, self.register)
        return _read_u64(mem, self.memory.address(regs))


@dataclass(frozen=True)
class Call:
    """call rel32 (`direct`), or call r/m64 (`indirect`): push next_ip, go to the target."""

    next_ip: int
    direct: int | None = None
    indirect: IndirectTarget | None = None

    def __call__(self, regs: Regs, mem: Memory) -> bool:
        target = self.direct if self.indirect is None else self.indirect.resolve(regs, mem)
        if target is None or not _push(regs, mem, self.next_ip):
            return False
        regs.rip = target
        return True


@dataclass(frozen=True)
class IndirectJump:
    """jmp r/m64, e.g. a PLT stub's `jmp [rip+disp]`."""

    target: IndirectTarget

    def __call__(self, regs: Regs, mem: Memory) -> bool:
        target = self.target.resolve(regs, mem)
        if target is None:
            return False
        regs.rip = target
        return True


@dataclass(frozen=True)
class Return:
    """ret / ret imm16: pop the return address, then release `pop_extra` bytes."""

    pop_extra: int = 0

    def __call__(self, regs: Regs, mem: Memory) -> bool:
        sp = int(regs.rsp) & MASK64
        target = _read_u64(mem, sp)
        if target is None:
            return False
        regs.rsp = (sp + 8 + self.pop_extra) & MASK64
        regs.rip = target
        return True


@dataclass(frozen=True)
class Push:
    """push r64 (the value before the push, so `push rsp` too) or push imm (sign-extended)."""

    next_ip: int
    register: Register_ = Register.NONE
    immediate: int = 0

    def __call__(self, regs: Regs, mem: Memory) -> bool:
        value = self.immediate if self.register == Register.NONE else read_gpr(regs,
                                                                                self.register)
        if not _push(regs, mem, value):
            return False
        regs.rip = self.next_ip
        return True
