"""Trap-free probe code: what a jump patch jumps to.

A trap-free probe replaces the whole instructions covering the first 5
bytes at the probe with `jmp rel32` to a trampoline in the XOL area:

    lea  rsp, [rsp-128]          ; below the red zone (a leaf may keep data there)
    push rax
    seto al                      ; `lock inc` writes OF SF ZF AF PF: the program's
    lahf                         ; must survive (OF in al, SF ZF AF PF CF in ah)
    lock inc qword [rip+counter] ; the hit, atomic across threads and forked children
    add  al, 0x7f                ; OF back (1+127 overflows, 0+127 does not)
    sahf                         ; SF ZF AF PF CF back
    pop  rax
    lea  rsp, [rsp+128]
    <the displaced instructions, relocated>
    jmp  <first original instruction after the patch>

lahf/sahf and seto/add rather than pushfq/popfq: popfq is microcoded, and
the pair costs a hit noticeably more (bench.ptrace measures a hit's cost).
No trap, no tracer: a hit costs a few nanoseconds, and the program runs on
unharmed if the tracer dies (nothing stops it). Each displaced instruction
is relocated by `relocate.plan` at its own place in the trampoline (its
RIP-relative operand recomputed, or read through a scratch register); the
slot's own jump back is cut off, since the next displaced instruction
follows. A near jcc becomes a jcc rel32 to its original target. Only the
last may leave the run (jmp, call, ret); a call pushes the original return
address (the end of the patch), so unwinders see the caller as untraced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from iced_x86 import Decoder, Encoder, Instruction, Mnemonic

from uprobes.engines.tracee import relocate
from uprobes.engines.tracee.relocate import UnsupportedInstruction

JMP_REL32_LEN = 5
_MASK64 = (1 << 64) - 1
_ENTER = bytes.fromhex("488d642480" "50" "0f90c0" "9f")  # lea rsp,[rsp-128]; push rax;
                                                         # seto al; lahf
_LOCK_INC = bytes.fromhex("f048ff05")                    # lock inc qword [rip+disp32]
_LEAVE = bytes.fromhex("047f" "9e" "58" "488da42480000000")  # add al,0x7f; sahf; pop rax;
                                                             # lea rsp,[rsp+128]


@dataclass(frozen=True)
class Displaced:
    """One whole instruction under the patch: its run-time address and original bytes."""

    runtime_addr: int
    raw: bytes


def jmp_rel32(at: int, target: int) -> bytes:
    """`jmp target` encoded at `at` (ValueError if out of rel32 reach)."""
    rel = target - (at + JMP_REL32_LEN)
    if not -(1 << 31) <= rel < (1 << 31):
        raise ValueError(f"{target:#x} is out of rel32 reach of {at:#x}")
    return b"\xe9" + (rel & 0xFFFFFFFF).to_bytes(4, "little")


def _jump_back(at: int, target: int) -> bytes:
    """A jump that changes no register: rel32, else `jmp [rip+0]` and the address."""
    try:
        return jmp_rel32(at, target)
    except ValueError:
        return b"\xff\x25\x00\x00\x00\x00" + (target & _MASK64).to_bytes(8, "little")


def counting_prologue(at: int, counter_addr: int) -> bytes:
    """The flag-preserving atomic increment of the 8-byte counter at `counter_addr`."""
    inc_end = at + len(_ENTER) + len(_LOCK_INC) + 4
    disp = counter_addr - inc_end
    if not -(1 << 31) <= disp < (1 << 31):
        raise UnsupportedInstruction(f"the counter at {counter_addr:#x} is out of reach of "
                                     f"the trampoline at {at:#x}")
    return _ENTER + _LOCK_INC + (disp & 0xFFFFFFFF).to_bytes(4, "little") + _LEAVE


def _decode(d: Displaced) -> Instruction:
    insn = Decoder(64, d.raw, ip=d.runtime_addr).decode()
    if insn.is_invalid or insn.len != len(d.raw):
        raise UnsupportedInstruction(f"the bytes at {d.runtime_addr:#x} are not one instruction")
    return insn


def ends_run(insn: Instruction) -> bool:
    """Whether control never falls through `insn` (it must be the last displaced)."""
    return insn.is_jmp_short_or_near or insn.is_call_near or insn.mnemonic == Mnemonic.RET


def why_not_displaced(insn: Instruction, last: bool) -> str | None:
    """Why `insn` cannot be one of the displaced instructions (None: it can).
    Only the kinds the trampoline knows how to move; relocate.plan then
    refuses what cannot run out of line at all."""
    if insn.is_call_near_indirect or insn.is_jmp_near_indirect:
        return "an indirect call or jump"
    if insn.is_loop or insn.is_loopcc or insn.is_jcx_short:
        return "a loop/jrcxz (no rel32 form)"
    if ends_run(insn) and not last:
        return "a jump, call or ret before the last displaced instruction (a call would " \
               "return into the patch)"
    return None


def _one(d: Displaced, insn: Instruction, at: int) -> bytes:
    """`insn` relocated to run at `at`, falling through to whatever follows."""
    if insn.mnemonic in (Mnemonic.NOP, Mnemonic.ENDBR64, Mnemonic.ENDBR32):
        return d.raw  # no effect but rip: position-independent
    if insn.mnemonic == Mnemonic.RET:
        return d.raw
    if insn.is_jcc_short_or_near or insn.is_jmp_short_or_near:
        moved = insn.copy()
        moved.as_near_branch()
        enc = Encoder(64)
        try:
            enc.encode(moved, at)
        except ValueError as e:
            raise UnsupportedInstruction(f"{d.runtime_addr:#x}: branch out of reach ({e})") \
                from None
        return bytes(enc.take_buffer())
    slot = relocate.plan(d.raw, d.runtime_addr, at)
    if insn.is_call_near:
        return slot.code  # push the original return address, jump to the callee
    if not slot.code or (slot.emulation is not None and insn.mnemonic != Mnemonic.PUSH):
        raise UnsupportedInstruction(f"{slot.text}: no relocated form")
    if not slot.boosted:
        raise UnsupportedInstruction(f"{slot.text}: it would need a single-step")
    cut = [pos for pos, original in slot.resume_points if original == insn.next_ip]
    if not cut:
        raise UnsupportedInstruction(f"{slot.text}: no point where it is done")
    return slot.code[:cut[-1] - at]


def build(at: int, prologue: Callable[[int], bytes], displaced: list[Displaced],
          resume_addr: int, at_return: bool = False,
          ret_prologue: Callable[[int], bytes] | None = None) -> bytes:
    """The trampoline's bytes for address `at`: `prologue` (its code for the
    address it lands at: `counting_prologue`, or recording.prologue), then
    `displaced`, then on at `resume_addr` (the first original instruction
    after the patch). `at_return`: the patch ends with the probed `ret`;
    the prologue goes right before it, where a uretprobe's handler would
    see the function returning. `ret_prologue` (with `at_return`): the
    patch is a whole function, `prologue` goes first and `ret_prologue`
    before its `ret`. Raises UnsupportedInstruction when a displaced
    instruction cannot be moved."""
    insns = [_decode(d) for d in displaced]
    if at_return and (not insns or insns[-1].mnemonic != Mnemonic.RET):
        raise UnsupportedInstruction("a return patch must end with the ret")
    before_ret = prologue if ret_prologue is None else ret_prologue
    code = bytearray() if at_return and ret_prologue is None else bytearray(prologue(at))
    for i, (d, insn) in enumerate(zip(displaced, insns)):
        why = why_not_displaced(insn, i == len(insns) - 1)
        if why is not None:
            raise UnsupportedInstruction(f"{d.runtime_addr:#x}: {why}")
        if at_return and i == len(insns) - 1:
            code += before_ret(at + len(code))
        code += _one(d, insn, at + len(code))
    if not insns or not ends_run(insns[-1]):
        code += _jump_back(at + len(code), resume_addr)
    return bytes(code)


COUNTING_PROLOGUE_SIZE = len(_ENTER) + len(_LOCK_INC) + 4 + len(_LEAVE)


def max_size(displaced: list[Displaced], prologue_size: int = COUNTING_PROLOGUE_SIZE) -> int:
    """An upper bound of `build`'s length (to allocate before the address is known)."""
    return prologue_size + len(displaced) * relocate.SLOT_SIZE + 14
