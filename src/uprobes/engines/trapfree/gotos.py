"""Where a function's indirect jumps land, when they are computed gotos.

A jump patch must not cover an address a branch lands on. Direct branches
say where they go; an indirect `jmp` does not, so a function with one was
refused whole. An interpreter's eval loop (CPython's) is made of them: GCC
compiles `goto *table[op]` as a load from a table of label addresses and
a jump to the register loaded,

    mov  rcx, [rsi + rcx*8]      ; rsi = lea [rip+table], or the table's
    jmp  rcx                     ;  address itself in a non-PIE file

or as `jmp [table + rcx*8]`. A function is accepted when every indirect
jump of it (and of its `.cold` parts) is one of these, proven from its
code: the register loaded in straight-line code right before the jump
(or by each branch that lands between, followed one step back, when every
branch of the file landing there is known), or set to one label's address
by a `lea`; the table's address a constant, or taken by a `lea` in
straight-line code before the load, or, for a base register kept across
the whole function, the table resolution named (`known`: CPython's
`opcode_targets`, the only table its dispatch reads). The table must lie
in data the program cannot change (read-only, or RELRO); its words, as
loaded (a RELATIVE relocation's addend, or the word in place: non-PIE and
RELR files), from the table to the end of that data, are the targets
(what follows the table only adds targets, so only refuses more). No
target may lie between a load and its jump. A jump through the GOT goes
to another function. Anything else (a register computed by arithmetic, a
function pointer's tail call, a table in writable data, a switch table
of relative offsets) leaves the targets unknown: refused.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.constants import SH_FLAGS
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
from uprobes.elf.relocs import relative_addends
from uprobes.errors import UprobesError

MAX_WORDS = 1 << 20
_BACK = 8       # instructions looked back from a jump for its register's load
_BASE_BACK = 64  # and from the load for its table's base
_WRITES = (OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE)


class FileData:
    """What a file's data holds once loaded, read once: its R_X86_64_RELATIVE
    relocations (link address -> addend), which of its data cannot change
    after load (read-only sections, and the RELRO part the dynamic linker
    protects), and its GOT sections."""

    def __init__(self, image: ElfImage) -> None:
        self.image = image
        self._by_addr: dict[int, int] | None = None
        self._fixed: list[tuple[int, int]] = []
        self._got: list[tuple[int, int]] = []
        self._sorted: list[int] | None = None

    def _read(self) -> dict[int, int]:
        if self._by_addr is not None:
            return self._by_addr
        self._by_addr = {}
        try:
            with self.image.elffile() as elf:
                for segment in elf.iter_segments():
                    if segment["p_type"] == "PT_GNU_RELRO":
                        self._fixed.append((segment["p_vaddr"],
                                            segment["p_vaddr"] + segment["p_memsz"]))
                self._by_addr.update(relative_addends(elf))
                for section in elf.iter_sections():
                    span = (section["sh_addr"], section["sh_addr"] + section["sh_size"])
                    flags = section["sh_flags"]
                    if flags & SH_FLAGS.SHF_ALLOC and section["sh_type"] == "SHT_PROGBITS":
                        if not flags & SH_FLAGS.SHF_WRITE:
                            self._fixed.append(span)
                        if section.name in (".got", ".got.plt"):
                            self._got.append(span)
        except (ELFError, ELFParseError):
            self._fixed.clear()  # nothing is known fixed: every table refused
        return self._by_addr

    def fixed_span(self, addr: int) -> tuple[int, int] | None:
        """The read-only or RELRO span holding `addr`, if one does."""
        self._read()
        return next(((lo, hi) for lo, hi in self._fixed if lo <= addr < hi), None)

    def in_got(self, addr: int) -> bool:
        self._read()
        return any(lo <= addr < hi for lo, hi in self._got)

    def relocated(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(address, addend) of the relocations that fill words in [lo, hi)."""
        by_addr = self._read()
        if self._sorted is None:
            self._sorted = sorted(by_addr)
        at = self._sorted[bisect.bisect_left(self._sorted, lo):bisect.bisect_left(self._sorted, hi)]
        return [(a, by_addr[a]) for a in at]


@dataclass(frozen=True)
class _Label:
    """A jump's register holds one label's address, taken in the code."""

    addr: int


Landings = Callable[[int, int], list[int]]  # (lo, hi) -> direct branch targets in between
Arrivals = Callable[[int], int]  # an address -> how many direct branches of the file land there


def indirect_targets(insns: Sequence[Instruction], lo: int, hi: int, data: FileData,
                     landings: Landings, arrivals: Arrivals,
                     known: Sequence[int] = ()) -> list[int] | str:
    """The addresses in [lo, hi) that the indirect jumps among `insns` (a
    function's parts, decoded, in address order) can land on, or why they
    are not known. `landings(a, b)`: where the file's direct branches land,
    a < t < b; `arrivals(t)`: how many land at t. `known`: the tables the
    function's computed gotos read (the interpreter's dispatch table, when
    resolution found it), for a base register kept across the function."""
    walk = _Walk(insns, landings, arrivals, known)
    tables: set[int] = set()
    targets: set[int] = set()
    for n, jump in enumerate(insns):
        if not jump.is_jmp_near_indirect:
            continue  # (an indirect call returns right after itself)
        if jump.op0_kind == OpKind.MEMORY:
            if jump.memory_base == Register.RIP and jump.memory_index == Register.NONE \
                    and data.in_got(jump.memory_displacement):
                continue  # through the GOT: to another function
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
        words = _words(start, data)
        if isinstance(words, str):
            return words
        targets.update(w for w in words if lo <= w < hi)
    # A target between a register's load and its jump would carry a value
    # from elsewhere into that jump.
    for load, jump_ip in walk.spans:
        inside = [t for t in targets if load < t <= jump_ip]
        if inside:
            return f"a computed goto lands at {inside[0]:#x}, between a load and its jump"
    return sorted(targets)


class _Walk:
    """Backward walks over straight-line code, from a jump to the load of
    its register."""

    def __init__(self, insns: Sequence[Instruction], landings: Landings,
                 arrivals: Arrivals, known: Sequence[int]) -> None:
        self.insns = insns
        self.known = list(known)
        self.spans: list[tuple[int, int]] = []  # (a load's ip, its jump's or branch's ip)
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
            self.spans.append((insn.ip, insns[n].ip))
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
        found = _table_of(self.insns, k, load, self.info, self.landings, self.known)
        return found if isinstance(found, str) else list(found)

    def _writes(self, insn: Instruction, full: int) -> bool:
        return _writes(insn, full, self.info)


def _table_of(insns: Sequence[Instruction], k: int, load: Instruction,
              info: InstructionInfoFactory, landings: Landings,
              known: Sequence[int]) -> list[int] | str:
    """The table `load` (insns[k]: `[base + index*8 + disp]`, or `[disp]`)
    reads: its base is an address, or taken by a `lea` in straight-line
    code before it that no branch enters, or one of the `known` tables."""
    if load.memory_index == Register.NONE and load.memory_base in (Register.NONE,
                                                                   Register.RIP):
        return [load.memory_displacement]  # one word
    if load.memory_index == Register.NONE or load.memory_index_scale != 8:
        return "not a load from a table of 8-byte words"
    disp = load.memory_displacement
    base = load.memory_base
    if base in (Register.NONE, Register.RIP):
        return [disp]
    full = _full(base)
    for j in range(k - 1, max(-1, k - 1 - _BASE_BACK), -1):
        insn = insns[j]
        if insn.flow_control != FlowControl.NEXT or insn.next_ip != insns[j + 1].ip \
                or landings(insn.ip, load.ip + 1):
            break
        if _writes(insn, full, info):
            if _takes_address(insn, full):
                return [insn.memory_displacement + disp]
            break
    if known and disp == 0:
        return list(known)
    return "its table's address is not known where it is loaded"


def _takes_address(insn: Instruction, full: int) -> bool:
    return insn.mnemonic == Mnemonic.LEA and insn.memory_base == Register.RIP \
        and insn.op0_kind == OpKind.REGISTER and _full(insn.op0_register) == full


def _writes(insn: Instruction, full: int, info: InstructionInfoFactory) -> bool:
    return any(_full(u.register) == full and u.access in _WRITES
               for u in info.info(insn).used_registers())


def _full(reg: int) -> int:
    """The 64-bit register `reg` is part of (`ecx` -> `rcx`)."""
    return int(RegisterExt.full_register(reg))  # type: ignore[arg-type]


def _words(table: int, data: FileData) -> list[int] | str:
    """The words from `table` to the end of the read-only or RELRO data that
    holds it, as loaded (what follows the table only adds targets); why
    not, for a table the program could change."""
    span = data.fixed_span(table)
    if span is None:
        return f"the table at {table:#x} is in data the program can write"
    count = (min(span[1], table + 8 * MAX_WORDS) - table) // 8
    try:
        raw = data.image.read_link(table, 8 * count)
    except UprobesError as e:
        return f"the table at {table:#x} cannot be read: {e}"
    words = list(memoryview(raw).cast("Q"))
    for addr, addend in data.relocated(table, table + 8 * count):
        if (addr - table) % 8 == 0:
            words[(addr - table) // 8] = addend
    return words
