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

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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


Reads = list[tuple[int, int, int]]
"""What a walk read, in order: (REGISTER, DWARF number, value) of the
registers it was given, (MEMORY, address, value) of the stack (value None
is not kept: a read outside the copy is MEMORY with value -1)."""
REGISTER, MEMORY = 0, 1


@dataclass(frozen=True)
class _Logged(StackCopy):
    """A StackCopy whose reads are noted in `reads`."""

    reads: Reads = field(default_factory=list)

    def u64(self, runtime_addr: int) -> int | None:
        value = StackCopy.u64(self, runtime_addr)
        self.reads.append((MEMORY, runtime_addr, -1 if value is None else value))
        return value

    def peek(self, runtime_addr: int) -> int | None:
        """A read noted only if its value is used (`_LoggedRegs.restore`)."""
        return StackCopy.u64(self, runtime_addr)


class _LoggedRegs(dict[int, int]):
    """Registers whose given values, when read, are noted (values the walk
    set since are its own: they follow from what it read)."""

    def __init__(self, regs: Mapping[int, int], reads: Reads) -> None:
        super().__init__(regs)
        self.reads, self.given = reads, set(regs)
        # A callee-saved register restored from the stack: its slot, noted
        # as read only when the walk uses the value (most never are).
        self.restored: dict[int, int] = {}

    def _used(self, reg: int, value: int | None) -> None:
        if reg in self.given:
            self.reads.append((REGISTER, reg, -1 if value is None else value))
        elif reg in self.restored:
            self.reads.append((MEMORY, self.restored.pop(reg), -1 if value is None else value))

    def get(self, reg: int, default: int | None = None) -> int | None:  # type: ignore[override]
        value = super().get(reg, default)
        self._used(reg, value)
        return value

    def __getitem__(self, reg: int) -> int:
        value = super().__getitem__(reg)
        self._used(reg, value)
        return value

    def __setitem__(self, reg: int, value: int) -> None:
        self.given.discard(reg)
        self.restored.pop(reg, None)
        super().__setitem__(reg, value)

    def restore(self, reg: int, runtime_addr: int, value: int) -> None:
        self[reg] = value
        self.restored[reg] = runtime_addr


@dataclass(frozen=True)
class SameWalk:
    """What a walk read, compiled into one test of another capture from the
    same stack pointer (`same`): equal, a walk would go the same way, to the
    same frames (a walk is a function of what it reads, the rules being the
    same). One struct unpack of the words it read, not a read each."""

    regs: tuple[int, ...]
    reg_values: tuple[int | None, ...]
    length: int  # the copy's: a read past it failed, and would again
    words: struct.Struct
    word_values: tuple[int, ...]

    @classmethod
    def of(cls, reads: Reads, stack: StackCopy) -> SameWalk:
        regs: dict[int, int] = {}
        offsets: set[int] = set()
        for kind, where, value in reads:
            if kind == REGISTER:
                regs.setdefault(where, value)
            elif 0 <= where - stack.start <= len(stack.data) - 8:
                offsets.add(where - stack.start)
        fmt, at = "<", 0
        for off in sorted(offsets):
            if off < at:  # overlaps the word before: its own unpack
                continue
            fmt += f"{off - at}xQ" if off > at else "Q"
            at = off + 8
        words = struct.Struct(fmt)
        return cls(tuple(regs), tuple(None if v == -1 else v for v in regs.values()),
                   len(stack.data), words, words.unpack_from(stack.data) if at else ())

    def same(self, regs: Mapping[int, int], stack: StackCopy) -> bool:
        data = stack.data
        return len(data) == self.length \
            and tuple(regs.get(r) for r in self.regs) == self.reg_values \
            and (not self.word_values or self.words.unpack_from(data) == self.word_values)


def unwind(regs: Mapping[int, int], stack: StackCopy, rule_for: RuleFinder,
           max_frames: int = MAX_FRAMES, reads: Reads | None = None) -> list[int]:
    """Runtime code addresses, innermost first: `regs[RA]` (the ip; DWARF
    numbering for the rest), then each caller's return address. `reads`
    gets what the walk read (`SameWalk` tells a capture that walks the same)."""
    if reads is not None:
        regs = _LoggedRegs(regs, reads)
        stack = _Logged(stack.start, stack.data, reads)
    else:
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
    logged = isinstance(regs, _LoggedRegs) and isinstance(stack, _Logged)
    for reg, offset in saved.items():
        if reg != RA:
            if logged:
                value = stack.peek(cfa + offset)  # type: ignore[attr-defined]
                if value is not None:
                    regs.restore(reg, cfa + offset, value)  # type: ignore[attr-defined]
                continue
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
