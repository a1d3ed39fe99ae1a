"""How a probed instruction runs while its first byte is an int3.

`uprobes.engines.ptrace.relocate` (the `reloc` helper's module) decides it
once it is on main: emulation, a boosted slot (the instruction relocated,
then a jmp back), or a single-stepped slot. Until then this module carries a
minimal plan of the same shape that handles what a prologue usually holds:
any instruction that falls through (boosted; RIP-relative ones re-encoded
for the slot by iced-x86) and a plain `ret` (emulated). Everything else is
refused with the reason, never mis-executed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

from uprobes.errors import ResolveError

try:
    from uprobes.engines.ptrace.relocate import (  # noqa: F401
        SLOT_SIZE, SlotPlan, UnsupportedInstruction, plan)
except ImportError:  # interim, until relocate.py is on main
    import iced_x86

    SLOT_SIZE = 64  # type: ignore[misc]

    class UnsupportedInstruction(ResolveError):  # type: ignore[no-redef]
        """An instruction the engine cannot execute out of line (yet)."""

    class _Mem(Protocol):
        def read(self, runtime_addr: int, n: int) -> bytes: ...

    @dataclass(frozen=True)
    class SlotPlan:  # type: ignore[no-redef]
        insn_len: int
        code: bytes
        boosted: bool
        text: str
        slot_addr: int = 0
        insn_addr: int = 0
        emulated_ret: bool = False

        def emulate(self, regs: Any, mem: _Mem) -> bool:
            if not self.emulated_ret:
                return False
            regs.rip = struct.unpack("<Q", mem.read(regs.rsp, 8))[0]
            regs.rsp += 8
            return True

        def after_step(self, regs: Any) -> None:
            regs.rip += self.insn_addr - self.slot_addr

        def original_rip(self, slot_rip: int) -> int | None:
            if slot_rip == self.slot_addr:
                return self.insn_addr
            if self.boosted and slot_rip == self.slot_addr + len(self.code) - 5:
                return self.insn_addr + self.insn_len  # at the jmp back
            return None

    def plan(code: bytes, insn_addr: int, slot_addr: int) -> SlotPlan:  # type: ignore[misc]
        insn = iced_x86.Decoder(64, code, ip=insn_addr).decode()
        text = str(insn)
        if insn.code == iced_x86.Code.INVALID:
            raise UnsupportedInstruction(f"cannot decode the instruction at {insn_addr:#x}")
        flow = insn.flow_control
        if flow == iced_x86.FlowControl.RETURN and code[0] == 0xC3:
            return SlotPlan(insn.len, b"", False, text, slot_addr, insn_addr, emulated_ret=True)
        if flow != iced_x86.FlowControl.NEXT:
            raise UnsupportedInstruction(f"{text}: not handled out of line yet")
        if insn.is_ip_rel_memory_operand:
            enc = iced_x86.BlockEncoder(64)
            enc.add(insn)
            body = enc.encode(slot_addr)
        else:
            body = bytes(code[:insn.len])
        back = insn_addr + insn.len - (slot_addr + len(body) + 5)
        if not -2**31 <= back < 2**31:
            raise UnsupportedInstruction(f"{text}: the slot is out of jmp range")
        return SlotPlan(insn.len, body + b"\xe9" + struct.pack("<i", back), True, text,
                        slot_addr, insn_addr)
