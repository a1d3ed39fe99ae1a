"""Walking a copy of a user stack into return addresses.

Input: the thread's registers at the hit and a copy of its stack from the
stack pointer up (what perf's PERF_SAMPLE_STACK_USER gives, or any read of
the tracee's memory). Each step finds the code's file in the process's
maps, the CFI rule for the address in that file, and computes the caller's
CFA, return address and callee-saved registers. Without a rule it falls
back to frame pointers. The walk stops at the outermost frame, at a read outside the copy, or after
`max_frames`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from uprobes.elf.framerule import RA, RBP, RSP, FrameRule

MAX_FRAMES = 64

# A code address -> the CFI rule that covers it (None: no rule there), or
# raise LookupError when the address is in no file we know (end the walk).
RuleFinder = Callable[[int], FrameRule | None]


@dataclass(frozen=True)
class StackCopy:
    """`data` is the memory at [`start`, `start + len(data)`) of the thread."""

    start: int
    data: bytes

    def u64(self, runtime_addr: int) -> int | None:
        at = runtime_addr - self.start
        if at < 0 or at + 8 > len(self.data):
            return None
        return int.from_bytes(self.data[at:at + 8], "little")


def unwind(regs: Mapping[int, int], stack: StackCopy, rule_for: RuleFinder,
           max_frames: int = MAX_FRAMES) -> list[int]:
    """Runtime code addresses, innermost first: `regs[RA]` (the ip; DWARF
    numbering for the rest), then each caller's return address."""
    regs = dict(regs)
    frames = [regs[RA]]
    first = True
    while len(frames) < max_frames:
        ip = frames[-1]
        # A return address points after the call; its CFI row is the call's.
        try:
            rule = rule_for(ip if first else ip - 1)
        except LookupError:
            break
        step = _step_cfi(regs, stack, rule) if rule is not None else _step_fp(regs, stack)
        if step is None:
            break
        cfa, ra = step
        if ra == 0 or cfa <= regs[RSP]:
            break  # the outermost frame, or a walk that does not move up
        regs[RSP], regs[RA] = cfa, ra
        frames.append(ra)
        first = False
    return frames


def _step_cfi(regs: dict[int, int], stack: StackCopy,
              rule: FrameRule) -> tuple[int, int] | None:
    base = regs.get(rule.cfa_reg)
    if base is None:
        return None
    cfa = base + rule.cfa_offset
    saved = dict(rule.saved)
    if RA not in saved:
        return None  # the return address is undefined: the outermost frame
    ra = stack.u64(cfa + saved[RA])
    if ra is None:
        return None
    for reg, offset in saved.items():
        if reg != RA:
            value = stack.u64(cfa + offset)
            if value is not None:
                regs[reg] = value
    return cfa, ra


def _step_fp(regs: dict[int, int], stack: StackCopy) -> tuple[int, int] | None:
    """Code without CFI: follow the frame-pointer chain ([bp] = caller's bp,
    [bp+8] = return address)."""
    bp = regs.get(RBP, 0)
    if bp <= regs[RSP]:
        return None
    ra, caller_bp = stack.u64(bp + 8), stack.u64(bp)
    if ra is None or caller_bp is None:
        return None
    regs[RBP] = caller_bp
    return bp + 16, ra
