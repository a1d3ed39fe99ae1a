"""Where a function's indirect jumps land, when they are computed gotos.

A jump patch must not cover an address a branch lands on. Direct branches
say where they go; an indirect `jmp` does not, so a function with one was
refused whole. An interpreter's eval loop (CPython's) is made of them: GCC
compiles `goto *table[op]` as a load from a table of label addresses and
a jump to the register loaded,

    mov  rcx, [rsi + rcx*8]      ; rsi = lea [rip+table], or the table's
    jmp  rcx                     ;  address itself in a non-PIE file

or as `jmp [table + rcx*8]`. When every indirect jump of a function is
one of these, its targets are the words of those tables: read from the
file (the addend of the R_X86_64_RELATIVE relocation that fills a word
in at load time, or the word as it stands: a non-PIE file's, or a
RELR-packed one's). Anything else (a jump to a register computed by
arithmetic, a function pointer's tail call, a switch table of relative
offsets) leaves the targets unknown, and the function is refused.

The words are read generously: up to MAX_WORDS from the table's start
within its section, every one that points into the function counted (a
table's neighbours only add targets, which only refuses more patches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.relocation import RelocationSection
from iced_x86 import (
    FlowControl,
    Instruction,
    InstructionInfoFactory,
    Mnemonic,
    OpAccess,
    OpKind,
    Register,
    RegisterExt,
)

from uprobes.elf.image import ElfImage
from uprobes.errors import UprobesError

MAX_WORDS = 1024
_BACK = 8       # instructions looked back from a jump for its register's load
_BASE_BACK = 64  # and from the load for its table's base
_R_X86_64_RELATIVE = 8
_WRITES = (OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE)


class Addends:
    """A file's R_X86_64_RELATIVE relocations: link address -> addend (read once)."""

    def __init__(self, image: ElfImage) -> None:
        self.image = image
        self._by_addr: dict[int, int] | None = None

    def word(self, addr: int) -> int:
        """The 8 bytes at link address `addr` as the program sees them once loaded."""
        if self._by_addr is None:
            self._by_addr = {}
            try:
                with self.image.elffile() as elf:
                    for section in elf.iter_sections():
                        if isinstance(section, RelocationSection) and section.is_RELA():
                            self._by_addr.update(
                                (rel["r_offset"], rel["r_addend"])
                                for rel in section.iter_relocations()
                                if rel["r_info_type"] == _R_X86_64_RELATIVE)
            except (ELFError, ELFParseError):
                pass  # no table is read then: words as they stand
        found = self._by_addr.get(addr)
        if found is not None:
            return found
        return int.from_bytes(self.image.read_link(addr, 8), "little")


@dataclass(frozen=True)
class _Label:
    """A jump's register holds one label's address, taken in the code."""

    addr: int


Landings = Callable[[int, int], list[int]]  # (lo, hi) -> direct branch targets in between
Arrivals = Callable[[int], int]  # an address -> how many direct branches of the file land there


def indirect_targets(insns: Sequence[Instruction], lo: int, hi: int, addends: Addends,
                     landings: Landings, arrivals: Arrivals) -> list[int] | str:
    """The addresses in [lo, hi) that the indirect jumps among `insns` (a
    function's parts, decoded, in address order) can land on, or why they
    are not known. `landings(a, b)`: where the file's direct branches land,
    a < t < b; `arrivals(t)`: how many land at t."""
    walk = _Walk(insns, landings, arrivals)
    tables: set[int] = set()
    targets: set[int] = set()
    for n, jump in enumerate(insns):
        if not jump.is_jmp_near_indirect:
            continue  # (an indirect call returns right after itself)
        if jump.op0_kind == OpKind.MEMORY:
            if jump.memory_base == Register.RIP and jump.memory_index == Register.NONE:
                continue  # through one word (a PLT-style jump): to another function
            found = walk.table_of(n, jump)
        else:
            found = walk.loaded(n, _full(jump.op0_register), follow=True)
        if isinstance(found, str):
            return f"an indirect jump at {jump.ip:#x}: {found}"
        for one in found:
            if isinstance(one, _Label):
                targets.add(one.addr)
            else:
                tables.add(one)
    for start in tables:
        targets.update(w for w in _words(start, addends) if lo <= w < hi)
    return sorted(t for t in targets if lo <= t < hi)


class _Walk:
    """Backward walks over straight-line code, from a jump to the load of
    its register."""

    def __init__(self, insns: Sequence[Instruction], landings: Landings,
                 arrivals: Arrivals) -> None:
        self.insns = insns
        self.landings = landings
        self.arrivals = arrivals
        self.info = InstructionInfoFactory()
        self._at = {insn.ip: n for n, insn in enumerate(insns)}
        self._from: dict[int, list[int]] = {}
        for n, insn in enumerate(insns):
            if insn.op0_kind == OpKind.NEAR_BRANCH64 and insn.flow_control in (
                    FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH):
                self._from.setdefault(insn.near_branch_target, []).append(n)

    def loaded(self, n: int, full: int, follow: bool) -> list[int | _Label] | str:
        """Where the register `full` that insns[n] jumps through (or that
        is live at the branch insns[n]) was loaded from: tables, or a
        label's address. `follow`: branches that land between the load and
        insns[n] are walked back from too (a dispatch the compiler shared
        among handlers that each load the register and jump to it)."""
        insns = self.insns
        for k in range(n - 1, max(-1, n - 1 - _BACK), -1):
            insn = insns[k]
            if insn.flow_control != FlowControl.NEXT or insn.next_ip != insns[k + 1].ip:
                return "its register comes from before a branch"
            if not self._writes(insn, full):
                continue
            if _takes_address(insn, full):
                found: list[int | _Label] | str = [_Label(insn.memory_displacement)]
            elif insn.mnemonic == Mnemonic.MOV and insn.op1_kind == OpKind.MEMORY \
                    and _full(insn.op0_register) == full:
                found = self.table_of(k, insn)
            else:
                return "its register is computed, not loaded from a table"
            for t in self.landings(insn.ip, insns[n].ip + 1):
                if isinstance(found, str):
                    break
                found = self._arriving(t, n, full, follow, found)
            return found
        return "no load of its register from a table right before it"

    def _arriving(self, t: int, n: int, full: int, follow: bool,
                  found: list[int | _Label]) -> list[int | _Label] | str:
        """`found` and what the branches landing at `t` bring in the register."""
        sources = self._from.get(t, [])
        at = self._at.get(t)
        if not follow or at is None or len(sources) != self.arrivals(t) \
                or any(self._writes(self.insns[m], full) for m in range(at, n)):
            return "a branch lands between its register's load and the jump"
        out = list(found)
        for m in sources:
            more = self.loaded(m, full, follow=False)
            if isinstance(more, str):
                return more
            out += more
        return out

    def table_of(self, k: int, load: Instruction) -> list[int | _Label] | str:
        found = _table_of(self.insns, k, load, self.info)
        return found if isinstance(found, str) else list(found)

    def _writes(self, insn: Instruction, full: int) -> bool:
        return _writes(insn, full, self.info)


def _table_of(insns: Sequence[Instruction], k: int, load: Instruction,
              info: InstructionInfoFactory) -> list[int] | str:
    """The table `load` (insns[k]: `[base + index*8 + disp]`) reads."""
    if load.memory_index == Register.NONE or load.memory_index_scale != 8:
        return "not a load from a table of 8-byte words"
    disp = load.memory_displacement
    base = load.memory_base
    if base in (Register.NONE, Register.RIP):
        return [disp]
    full = _full(base)
    for j in range(k - 1, max(-1, k - 1 - _BASE_BACK), -1):
        insn = insns[j]
        if _writes(insn, full, info):
            if _takes_address(insn, full):
                return [insn.memory_displacement + disp]
            break
    # (the base is kept in a register across the loop: every address the
    # function takes into it)
    found = [i.memory_displacement + disp for i in insns if _takes_address(i, full)]
    return found or "no table address taken for its base register"


def _takes_address(insn: Instruction, full: int) -> bool:
    return insn.mnemonic == Mnemonic.LEA and insn.memory_base == Register.RIP \
        and insn.op0_kind == OpKind.REGISTER and _full(insn.op0_register) == full


def _writes(insn: Instruction, full: int, info: InstructionInfoFactory) -> bool:
    return any(_full(u.register) == full and u.access in _WRITES
               for u in info.info(insn).used_registers())


def _full(reg: int) -> int:
    """The 64-bit register `reg` is part of (`ecx` -> `rcx`)."""
    return int(RegisterExt.full_register(reg))  # type: ignore[arg-type]


def _words(table: int, addends: Addends) -> list[int]:
    """Up to MAX_WORDS words from `table`, as loaded (as far as the file has them)."""
    out = []
    for i in range(MAX_WORDS):
        try:
            out.append(addends.word(table + 8 * i))
        except UprobesError:
            break
    return out
