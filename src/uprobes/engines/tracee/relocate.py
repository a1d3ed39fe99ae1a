"""Displaced instructions: how the instruction under a breakpoint runs without its first byte.

The breakpoint's int3 stays in place while threads run (other threads must
never run past a probe unseen), so the original instruction runs
somewhere else or not at all.  `plan()` decides, once per probe, how:

- **emulated**: the tracer applies it to the stopped thread's registers (and
  stack) and resumes at the result: nop/endbr64, jmp/jcc/loop/jrcxz rel,
  call rel32, call/jmp through a register or memory (`jmp [rip+disp]` is a
  PLT stub), ret, push reg/imm.  One trap, the thread never enters the XOL
  area.  Those that touch memory also get slot `code`, run (boosted) when the
  emulation's memory access faults, so the real instruction takes the real
  fault or grows the stack.
- **boosted**: everything else that is safe runs from a slot as the relocated
  instruction followed by a jump back to `insn_addr + len`: one trap, no
  single-step.  A RIP-relative operand keeps its original bytes with the
  disp32 recomputed for the slot; if the slot cannot reach the target the
  operand goes through a scratch register that the slot saves and restores
  itself below the red zone (the kernel's scratch scheme, arch/x86/kernel/
  uprobes.c riprel_analyze, but with no state kept in the tracer).
- **refused** (`UnsupportedInstruction`, at placement, with the reason):
  what would behave differently in a slot: int3 itself, int n, syscall and
  sysenter, ud0/1/2 and other instructions that fault by design, privileged
  and port-I/O instructions, far transfers, TSX, popf, mov/pop ss, branches
  with a 0x66 prefix (Intel and AMD disagree), undecodable bytes.

No plan needs a single-step on x86-64, so a hit always costs one trap.  Over
every distinct function entry of this machine's libc (Debian 12, glibc 2.36:
3,706 entries; tests/test_ptrace_relocate.py::test_libc_function_entries):
1,679 emulated (1,589 of them `push`), 2,027 boosted, 0 single-stepped,
0 refused.  Over all 332,033 instructions of its functions: 544 refused (525
`syscall`, 8 TSX, 5 `hlt`, 5 `ud2`, 1 `call [rsp]`... fixed since), none
single-stepped.

Known limits: calls and returns emulated by the tracer do not touch a CET
shadow stack (no Linux distribution enables user shadow stacks for glibc
2.36 programs); code running in a slot is outside any rseq critical section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iced_x86 import (
    Code,
    Decoder,
    Encoder,
    Formatter,
    FormatterSyntax,
    Instruction,
    InstructionInfoFactory,
    MemoryOperand,
    Mnemonic,
    Mnemonic_,
    OpKind,
    Register,
    Register_,
    RegisterExt,
)

from uprobes.engines.tracee.emulate import (
    MASK64,
    Advance,
    Branch,
    Call,
    Emulation,
    IndirectJump,
    IndirectTarget,
    Memory,
    MemRef,
    Push,
    Regs,
    Return,
)
from uprobes.errors import ResolveError

SLOT_SIZE = 64
"""Bytes one slot needs at most (the scratch-register form is the longest, 54)."""

_LEGACY_PREFIXES = frozenset(b"\x66\x67\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65")
_RED_ZONE = 128
_SCRATCH_ORDER = (Register.RSI, Register.RDI, Register.RBX, Register.R11, Register.R10,
                  Register.R9, Register.R8)

_formatter = Formatter(FormatterSyntax.INTEL)
_formatter.rip_relative_addresses = True
_formatter.hex_prefix = "0x"
_formatter.hex_suffix = ""
_formatter.uppercase_hex = False
_formatter.leading_zeros = False
_formatter.branch_leading_zeros = False
_info_factory = InstructionInfoFactory()

_REFUSED: dict[Mnemonic_, str] = {}
for _mnemonic, _why in (
    (Mnemonic.INT3, "it is a breakpoint already (pass the original bytes, not an int3)"),
    (Mnemonic.INT, "int n enters the kernel with the slot as its return address"),
    (Mnemonic.INT1, "int1 raises a debug trap by design"),
    (Mnemonic.SYSCALL, "a system call in a slot returns the slot's address in rcx, and a "
                       "blocking one parks the thread there, where a forked child, a signal "
                       "handler or a restart would see it (the kernel refuses it too)"),
    (Mnemonic.SYSENTER, "a system call entry cannot run out of line"),
    (Mnemonic.UD0, "it faults by design, and the SIGILL must show the original address"),
    (Mnemonic.UD1, "it faults by design, and the SIGILL must show the original address"),
    (Mnemonic.UD2, "it faults by design, and the SIGILL must show the original address"),
    (Mnemonic.HLT, "it faults in user space by design (glibc's abort ends with it)"),
    (Mnemonic.CLI, "it faults in user space by design"),
    (Mnemonic.STI, "it faults in user space by design"),
    (Mnemonic.XBEGIN, "transactional memory: a trap aborts the transaction anyway"),
    (Mnemonic.XEND, "transactional memory: a trap aborts the transaction anyway"),
    (Mnemonic.XABORT, "transactional memory: a trap aborts the transaction anyway"),
    (Mnemonic.POPF, "popf may set TF (a program stepping itself): its trap would come late"),
    (Mnemonic.POPFQ, "popf may set TF (a program stepping itself): its trap would come late"),
    (Mnemonic.IRET, "a far return cannot run out of line"),
    (Mnemonic.IRETD, "a far return cannot run out of line"),
    (Mnemonic.IRETQ, "a far return cannot run out of line"),
    (Mnemonic.RETF, "a far return cannot run out of line"),
):
    _REFUSED[_mnemonic] = _why


class UnsupportedInstruction(ResolveError):
    """An instruction that cannot be displaced correctly; the message says which and why."""


@dataclass(frozen=True)
class SlotPlan:
    """How one probed instruction runs while its first byte is an int3.

    `code` goes at `slot_addr`; `resume_points` are the slot addresses at
    which a thread's registers are exactly those of a thread at an original
    address (the slot's start, the jump back, a jump to a branch target).
    """

    insn_addr: int
    slot_addr: int
    insn_len: int
    code: bytes
    boosted: bool
    text: str
    emulation: Emulation | None = field(default=None, repr=False, compare=False)
    resume_points: tuple[tuple[int, int], ...] = ()

    @property
    def kind(self) -> str:
        """"emulated", "boosted" or "stepped" (no plan() result is stepped on x86-64)."""
        if self.emulation is not None:
            return "emulated"
        return "boosted" if self.boosted else "stepped"

    def emulate(self, regs: Regs, mem: Memory) -> bool:
        """Apply the instruction to a thread stopped at the probe; True if done (rip set).

        False when this plan has no emulation, or its memory access faulted
        (then `regs` is unchanged and the boosted `code` must run instead).
        """
        return self.emulation is not None and self.emulation(regs, mem)

    def after_step(self, regs: Regs) -> None:
        """After single-stepping from the slot: move rip back into the original code
        where the slot position has an exact original address; else leave it (the
        rest of the boosted slot code, run on, ends in the original code)."""
        original = self.original_rip(int(regs.rip))
        if original is not None:
            regs.rip = original

    def slot_rip(self, original: int) -> int | None:
        """The slot address at which a thread is as at `original`, if any
        (the reverse of original_rip)."""
        for at, orig in self.resume_points:
            if orig == original:
                return at
        return None

    def original_rip(self, slot_rip: int) -> int | None:
        """Where a thread found at `slot_rip` belongs in the original code, or None if
        it is mid-sequence (run or step it on until it leaves the slot)."""
        for at, original in self.resume_points:
            if at == slot_rip:
                return original
        return None


def _legacy_prefixes(raw: bytes) -> bytes:
    n = 0
    while n < len(raw) and raw[n] in _LEGACY_PREFIXES:
        n += 1
    return raw[:n]


def _refusal(insn: Instruction, raw: bytes) -> str | None:
    if insn.mnemonic in _REFUSED:
        return _REFUSED[insn.mnemonic]
    if insn.is_privileged or insn.op_code().is_input_output:
        return "privileged or port-I/O instruction: it faults in user space by design"
    if insn.is_call_far or insn.is_call_far_indirect or insn.is_jmp_far \
            or insn.is_jmp_far_indirect:
        return "a far transfer cannot run out of line"
    if (insn.mnemonic == Mnemonic.MOV and insn.op0_register == Register.SS) \
            or (insn.mnemonic == Mnemonic.POP and insn.op0_register == Register.SS):
        return "mov/pop ss holds traps back for one instruction"
    is_branch = insn.is_call_near or insn.is_call_near_indirect or insn.is_jmp_short_or_near \
        or insn.is_jmp_near_indirect or insn.is_jcc_short_or_near or insn.is_loop \
        or insn.is_loopcc or insn.is_jcx_short or insn.mnemonic == Mnemonic.RET
    if is_branch and 0x66 in _legacy_prefixes(raw):
        return "a branch with an operand-size prefix (0x66): Intel and AMD execute it differently"
    if insn.is_ip_rel_memory_operand and insn.memory_base == Register.EIP:
        return "a 32-bit (eip-relative) address cannot be relocated"
    return None


class OutOfReach(Exception):
    """A RIP-relative operand that a rel32 from the slot cannot reach (internal)."""


class _SlotWriter:
    """Slot code assembled at its runtime address, with its resume points."""

    def __init__(self, slot_addr: int) -> None:
        self.slot_addr = slot_addr
        self.code = bytearray()
        self.resume: list[tuple[int, int]] = []
        self._encoder = Encoder(64)

    @property
    def here(self) -> int:
        return self.slot_addr + len(self.code)

    def resume_at(self, original: int) -> None:
        self.resume.append((self.here, original))

    def emit(self, insn: Instruction) -> None:
        """Encode `insn` here; `OutOfReach` if its RIP-relative operand is too far."""
        try:
            self._encoder.encode(insn, self.here)
        except ValueError as err:
            if insn.is_ip_rel_memory_operand:
                raise OutOfReach(str(err)) from None
            raise
        self.code += self._encoder.take_buffer()

    def jump(self, target: int) -> None:
        """Go to `target` with no register changed: jmp rel32, else jmp [rip+0] + pointer."""
        rel = target - (self.here + 5)
        if -(1 << 31) <= rel < (1 << 31):
            self.code += b"\xe9" + (rel & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            self.code += b"\xff\x25\x00\x00\x00\x00" + (target & MASK64).to_bytes(8, "little")

    def push_address(self, value: int) -> None:
        """A `push imm64` that leaves flags alone: lea rsp,[rsp-8]; two dword stores."""
        self.emit(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP,
                                             MemoryOperand(Register.RSP, displ=-8)))
        self.emit(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, MemoryOperand(Register.RSP),
                                             value & 0xFFFFFFFF))
        self.emit(Instruction.create_mem_u32(Code.MOV_RM32_IMM32,
                                             MemoryOperand(Register.RSP, displ=4),
                                             (value >> 32) & 0xFFFFFFFF))

    def relocated(self, insn: Instruction, raw: bytes, disp_offset: int) -> None:
        """The original bytes, with a RIP-relative disp32 recomputed for this address."""
        if not insn.is_ip_rel_memory_operand:
            self.code += raw
            return
        disp = insn.memory_displacement - (self.here + len(raw))
        if not -(1 << 31) <= disp < (1 << 31):
            raise OutOfReach(f"{insn.memory_displacement:#x} is {disp:#x} from the slot")
        out = bytearray(raw)
        out[disp_offset:disp_offset + 4] = (disp & 0xFFFFFFFF).to_bytes(4, "little")
        self.code += out


def _memref(insn: Instruction) -> MemRef:
    base = insn.memory_base
    return MemRef(base=base, index=insn.memory_index, scale=insn.memory_index_scale,
                  displacement=insn.memory_displacement, segment=insn.memory_segment,
                  addr32=base == Register.EIP or (base != Register.NONE
                                                  and RegisterExt.is_gpr32(base)))


def _indirect_target(insn: Instruction) -> IndirectTarget:
    if insn.op0_kind == OpKind.REGISTER:
        return IndirectTarget(register=insn.op0_register)
    return IndirectTarget(memory=_memref(insn))


def _used_full_registers(insn: Instruction) -> set[Register_]:
    return {RegisterExt.full_register(u.register)
            for u in _info_factory.info(insn).used_registers()}


def _scratch_form(insn: Instruction, slot: _SlotWriter, next_ip: int, text: str) -> None:
    """`insn` with its RIP-relative operand read through a scratch register the slot
    saves below the red zone: lea rsp,[rsp-128]; push s; mov s,target; insn [s];
    pop s; lea rsp,[rsp+128].  Not for instructions that use the stack pointer."""
    used = _used_full_registers(insn)
    if Register.RSP in used or insn.is_stack_instruction:
        raise UnsupportedInstruction(f"{text}: the slot cannot reach its RIP-relative operand, "
                                     "and it uses the stack, so no scratch register can stand in")
    scratch = next((r for r in _SCRATCH_ORDER if r not in used), None)
    if scratch is None:
        raise UnsupportedInstruction(f"{text}: the slot cannot reach its RIP-relative operand, "
                                     "and no scratch register is free")
    target = insn.memory_displacement
    rewritten = insn.copy()
    rewritten.memory_base = scratch
    rewritten.memory_displacement = 0
    rewritten.memory_displ_size = 0
    slot.emit(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP,
                                         MemoryOperand(Register.RSP, displ=-_RED_ZONE)))
    slot.emit(Instruction.create_reg(Code.PUSH_R64, scratch))
    slot.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, scratch, target))
    slot.emit(rewritten)
    slot.emit(Instruction.create_reg(Code.POP_R64, scratch))
    slot.emit(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP,
                                         MemoryOperand(Register.RSP, displ=_RED_ZONE)))
    slot.resume_at(next_ip)
    slot.jump(next_ip)


def _emulation(insn: Instruction, raw: bytes) -> Emulation | None:
    """The emulation for `insn`, or None if it is not one of the emulated kinds."""
    next_ip = insn.next_ip
    prefixes = _legacy_prefixes(raw)
    if insn.mnemonic in (Mnemonic.NOP, Mnemonic.ENDBR64, Mnemonic.ENDBR32):
        return Advance(next_ip)
    if insn.is_jmp_short_or_near:
        return Branch(next_ip, insn.near_branch_target)
    if insn.is_jcc_short_or_near:
        return Branch(next_ip, insn.near_branch_target, condition=insn.condition_code)
    if insn.is_loop or insn.is_loopcc or insn.is_jcx_short:
        return Branch(next_ip, insn.near_branch_target, condition=insn.condition_code,
                      counter="jrcxz" if insn.is_jcx_short else "loop",
                      counter_bits=32 if 0x67 in prefixes else 64)
    if insn.is_call_near:
        return Call(next_ip, direct=insn.near_branch_target)
    if insn.is_call_near_indirect:
        return Call(next_ip, indirect=_indirect_target(insn))
    if insn.is_jmp_near_indirect:
        return IndirectJump(_indirect_target(insn))
    if insn.mnemonic == Mnemonic.RET:
        return Return(insn.immediate16 if insn.op_count else 0)
    if insn.mnemonic == Mnemonic.PUSH and 0x66 not in prefixes:
        kind = insn.op0_kind
        if kind == OpKind.REGISTER and RegisterExt.is_gpr64(insn.op0_register):
            return Push(next_ip, register=insn.op0_register)
        if kind == OpKind.IMMEDIATE8TO64:
            return Push(next_ip, immediate=insn.immediate8to64 & MASK64)
        if kind == OpKind.IMMEDIATE32TO64:
            return Push(next_ip, immediate=insn.immediate32to64 & MASK64)
    return None


def _fallback_code(insn: Instruction, raw: bytes, disp_offset: int, slot: _SlotWriter,
                   text: str) -> bool:
    """Slot code for an emulated instruction whose emulation may fault; False if it
    needs none (it touches no memory)."""
    next_ip = insn.next_ip
    slot.resume_at(insn.ip)
    if insn.is_call_near or insn.is_call_near_indirect:
        # The return address must be the original one (unwinders, C++ exceptions), so
        # no real `call` from the slot: push it by hand, then jump.
        if insn.is_call_near_indirect and insn.op0_kind == OpKind.REGISTER:
            if insn.op0_register == Register.RSP:
                raise UnsupportedInstruction(f"{text}: call through rsp")
            jump = Instruction.create_reg(Code.JMP_RM64, insn.op0_register)
        elif insn.is_call_near_indirect:
            jump = insn.copy()
            jump.code = Code.JMP_RM64
            if jump.memory_base == Register.RSP:
                disp = ((jump.memory_displacement + 8 + (1 << 63)) & MASK64) - (1 << 63)
                jump.memory_displacement = disp & MASK64
                jump.memory_displ_size = 1 if -128 <= disp < 128 else 8
        slot.push_address(next_ip)
        if insn.is_call_near:
            slot.resume_at(insn.near_branch_target)
            slot.jump(insn.near_branch_target)
        else:
            slot.emit(jump)
        return True
    if insn.is_jmp_near_indirect and insn.op0_kind != OpKind.REGISTER \
            or insn.mnemonic in (Mnemonic.RET, Mnemonic.PUSH):
        slot.relocated(insn, raw, disp_offset)
        if insn.mnemonic == Mnemonic.PUSH:
            slot.resume_at(next_ip)
            slot.jump(next_ip)
        return True
    return False


def _orphan_code(insn: Instruction, raw: bytes, slot: _SlotWriter) -> None:
    """Slot code for an emulated instruction that needs no fallback (it touches
    no memory: nop/endbr, jmp/jcc/loop/jrcxz rel, jmp through a register).
    The tracer never runs it; a thread runs it when the tracer is gone and the
    in-tracee SIGTRAP handler (orphan.py) sends an orphaned int3 here."""
    next_ip = insn.next_ip
    slot.resume_at(insn.ip)
    if insn.is_jmp_near_indirect:  # jmp reg: position-independent as it is
        slot.code += raw
        return
    if insn.is_jmp_short_or_near:
        slot.resume_at(insn.near_branch_target)
        slot.jump(insn.near_branch_target)
        return
    if insn.is_jcc_short_or_near or insn.is_loop or insn.is_loopcc or insn.is_jcx_short:
        # The condition as a rel8 branch over the way out to next_ip, to the way
        # out to the target: `jCC/loop/jrcxz L; jmp next; L: jmp target`.
        if insn.is_jcc_short_or_near:
            prefixes = _legacy_prefixes(raw)
            opcode = raw[len(prefixes)]
            cc = (raw[len(prefixes) + 1] if opcode == 0x0F else opcode) & 0x0F
            slot.code += bytes([0x70 | cc, 0])
        else:  # loop/loopcc/jrcxz are rel8 only; keep their 0x67 (ecx) prefix
            slot.code += raw[:-1] + b"\0"
        rel = next_ip - (slot.here + 5)
        slot.code[-1] = 5 if -(1 << 31) <= rel < (1 << 31) else 14  # over jump(next_ip)
        slot.resume_at(next_ip)
        slot.jump(next_ip)
        slot.resume_at(insn.near_branch_target)
        slot.jump(insn.near_branch_target)
        return
    slot.resume_at(next_ip)  # nop, endbr64
    slot.jump(next_ip)


def plan(code: bytes, insn_addr: int, slot_addr: int, boost: bool = True) -> SlotPlan:
    """How to run the instruction whose original bytes start `code`, at runtime address
    `insn_addr`, with a slot at `slot_addr` (both in the tracee).  Raises
    `UnsupportedInstruction` for what cannot run correctly out of line.

    `boost=False` gives the kernel's tier instead, to measure what boosting saves:
    what would be boosted is single-stepped from the slot (then `after_step`),
    except rep string instructions (a step runs one iteration) and the
    scratch-register form (several instructions), which stay boosted."""
    decoder = Decoder(64, bytes(code[:15]), ip=insn_addr)
    insn = decoder.decode()
    where = f"instruction at {insn_addr:#x}"
    if insn.is_invalid:
        raise UnsupportedInstruction(f"{where}: the bytes {bytes(code[:15]).hex(' ')} do not "
                                     "decode as an x86-64 instruction")
    raw = bytes(code[:insn.len])
    text = _formatter.format(insn)
    disp_offset = decoder.get_constant_offsets(insn).displacement_offset
    why = _refusal(insn, raw)
    if why is not None:
        raise UnsupportedInstruction(f"{where} ({text}) cannot be probed: {why}")
    slot = _SlotWriter(slot_addr)
    what = f"{where} ({text})"
    emulation = _emulation(insn, raw)
    try:
        if emulation is not None:
            if not _fallback_code(insn, raw, disp_offset, slot, what):
                slot = _SlotWriter(slot_addr)
                _orphan_code(insn, raw, slot)
            boosted = True  # every emulated plan has runnable slot code
        else:
            boosted = True
            slot.resume_at(insn_addr)
            try:
                slot.relocated(insn, raw, disp_offset)
                slot.resume_at(insn.next_ip)
                slot.jump(insn.next_ip)
                boosted = boost or (insn.is_string_instruction
                                    and (insn.has_rep_prefix or insn.has_repne_prefix))
            except OutOfReach:
                slot = _SlotWriter(slot_addr)
                slot.resume_at(insn_addr)
                _scratch_form(insn, slot, insn.next_ip, what)
    except OutOfReach as err:
        raise UnsupportedInstruction(f"{what}: the slot at {slot_addr:#x} cannot reach its "
                                     f"RIP-relative operand ({err}); place the XOL area within "
                                     "2 GiB of the code") from None
    assert len(slot.code) <= SLOT_SIZE, (text, len(slot.code))
    return SlotPlan(insn_addr=insn_addr, slot_addr=slot_addr, insn_len=insn.len,
                    code=bytes(slot.code), boosted=boosted, text=text, emulation=emulation,
                    resume_points=tuple(slot.resume))
