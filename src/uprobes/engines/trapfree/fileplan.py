"""What a jump patch replaces, decided from the probed file alone (jumppatch.py
places it into processes): the whole instructions covering the 5 bytes of a
`jmp rel32`, inside one function symbol with a size, with no branch of the
file into them and no other probe among them, each movable by the
trampoline (trampoline.py). Files are decoded once and plans are cached.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.relocation import RelocationSection
from iced_x86 import Decoder, FlowControl, Instruction, Mnemonic, OpKind, Register

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.tracee.relocate import UnsupportedInstruction
from uprobes.engines.trapfree import trampoline
from uprobes.engines.trapfree.trampoline import Displaced
from uprobes.errors import UprobesError

PATCH_LEN = 5  # jmp rel32


class NotTrapFree(Exception):
    """This probe keeps its int3 here; the message says why (internal)."""


@dataclass(frozen=True)
class FilePlan:
    """What to patch for one probe in one file, decided from the file alone."""

    file_offset: int                     # where the patch starts
    original: bytes                      # the patched bytes, whole instructions
    displaced: tuple[tuple[int, bytes], ...]  # (offset from the start, raw bytes)
    at_return: bool = False              # it ends with the probed `ret` (trampoline.build)
    whole: bool = False                  # the whole function, from its entry to its one ret


# ---------------------------------------------------------------- the file


@dataclass
class _FileCode:
    """A file's functions decoded once: direct branch targets (link addresses)."""

    image: ElfImage
    symbols: SymbolTable
    targets: list[int]  # sorted
    _pointers: list[int] | None = None

    def targets_between(self, lo: int, hi: int) -> list[int]:
        """Branch targets t with lo < t < hi."""
        return self.targets[bisect.bisect_right(self.targets, lo):
                            bisect.bisect_left(self.targets, hi)]

    def pointers_between(self, lo: int, hi: int) -> list[int]:
        """Code addresses the file's relocated data holds, lo <= t < hi: in
        a position-independent file, every address a computed goto can
        reach (a table of label addresses) is one, filled in at load time."""
        if self._pointers is None:
            self._pointers = sorted(_relocated_pointers(self.image))
        return self._pointers[bisect.bisect_left(self._pointers, lo):
                              bisect.bisect_left(self._pointers, hi)]


_R_X86_64_RELATIVE = 8


def _relocated_pointers(image: ElfImage) -> set[int]:
    """Code addresses the file's data holds: the addends of its
    R_X86_64_RELATIVE relocations, and in a file loaded where it was
    linked (ET_EXEC, no relocations for its own addresses) every aligned
    word of its data that falls in its executable sections."""
    found: set[int] = set()
    try:
        with image.elffile() as elf:
            code: list[tuple[int, int]] = []
            data = []
            for section in elf.iter_sections():
                if isinstance(section, RelocationSection) and section.is_RELA():
                    found.update(rel["r_addend"] for rel in section.iter_relocations()
                                 if rel["r_info_type"] == _R_X86_64_RELATIVE)
                flags = section["sh_flags"]
                if not flags & SH_FLAGS.SHF_ALLOC or section["sh_type"] != "SHT_PROGBITS":
                    continue
                if flags & SH_FLAGS.SHF_EXECINSTR:
                    code.append((section["sh_addr"], section["sh_addr"] + section["sh_size"]))
                else:
                    data.append(section)
            if elf["e_type"] == "ET_EXEC":
                for section in data:
                    raw = section.data()
                    start = (-section["sh_addr"]) % 8
                    words = memoryview(raw[start:start + (len(raw) - start) // 8 * 8]).cast("Q")
                    found.update(w for w in words if any(lo <= w < hi for lo, hi in code))
    except (ELFError, ELFParseError) as e:
        raise NotTrapFree(f"cannot read the relocations: {e}") from None
    return found


def _switch_table(insn: Instruction) -> bool:
    """`movsxd reg, [base+index*4]`: a switch table of relative offsets,
    whose targets no relocation names."""
    return insn.mnemonic == Mnemonic.MOVSXD and insn.op1_kind == OpKind.MEMORY \
        and insn.memory_index != Register.NONE and insn.memory_index_scale == 4


_files: dict[tuple[int, int], _FileCode] = {}
_plans: dict[tuple[int, int, int, tuple[int, ...], bool], FilePlan | str] = {}


def _file_code(path: str, dev: int, ino: int) -> _FileCode:
    key = (dev, ino)
    found = _files.get(key)
    if found is not None:
        return found
    image = ElfImage.open(path)
    if image.identity is None or (image.identity.dev, image.identity.ino) != key:
        raise NotTrapFree(f"{path} was replaced since it was resolved")
    symbols = SymbolTable.load(image)
    try:
        with open(path, "rb") as f:
            whole = f.read()
    except OSError as e:
        raise NotTrapFree(f"cannot read {path}: {e.strerror}") from None
    targets: set[int] = set()
    insn = Instruction()
    branches = (FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH,
                FlowControl.CALL)
    for sym in symbols.functions():  # every instruction of the file: once per file
        if sym.size == 0:
            continue
        try:
            start = image.link_to_file_offset(sym.link_addr)
        except UprobesError:
            continue
        decoder = Decoder(64, whole[start:start + sym.size], ip=sym.link_addr)
        while decoder.can_decode:
            decoder.decode_out(insn)
            if insn.flow_control in branches and insn.op0_kind == OpKind.NEAR_BRANCH64:
                targets.add(insn.near_branch_target)
    found = _FileCode(image, symbols, sorted(targets))
    _files[key] = found
    return found


def plan_for(path: str, dev: int, ino: int, file_offset: int,
             other_probes: Iterable[int] = (), at_return: bool = False) -> FilePlan | str:
    """The patch for a probe at `file_offset`, or why there is none.
    `other_probes`: file offsets of the file's other probes. `at_return`:
    the probe is on a `ret` (a return probe on the function's rets): the
    patch is the whole instructions covering 5 bytes that end with it."""
    others = tuple(sorted(o for o in other_probes if o != file_offset))
    return _cached(_plans, (dev, ino, file_offset, others, at_return),
                   lambda: _plan(path, dev, ino, file_offset, others, at_return))


def _cached(cache: dict[Any, FilePlan | str], key: Any,
            make: Callable[[], FilePlan]) -> FilePlan | str:
    """`make()`'s plan, or why there is none, made once per key."""
    found = cache.get(key)
    if found is None:
        try:
            found = make()
        except NotTrapFree as e:
            found = str(e)
        except UprobesError as e:
            found = f"cannot read the function: {e}"
        cache[key] = found
    return found


def _plan(path: str, dev: int, ino: int, file_offset: int, others: tuple[int, ...],
          at_return: bool) -> FilePlan:
    code = _file_code(path, dev, ino)
    image = code.image
    link = image.file_to_link_addr(file_offset)
    sym = code.symbols.containing(link)
    if sym is None or sym.size == 0:
        raise NotTrapFree("no function symbol with a size holds it (its branches are unknown)")
    name, lo = sym.display_name, sym.link_addr
    start = image.link_to_file_offset(lo)
    with image:
        data = image.read_file(start, sym.size)
    insns = list(Decoder(64, data, ip=lo))
    if any(i.is_invalid for i in insns):
        raise NotTrapFree(f"{name} does not decode as x86-64 code throughout")
    computed: list[int] = []
    indirect = [i for i in insns if i.flow_control == FlowControl.INDIRECT_BRANCH
                and not (i.op0_kind == OpKind.MEMORY and i.memory_base == Register.RIP)]
    if indirect:
        # Computed gotos (an interpreter's dispatch) land only on addresses
        # the file's data holds (relocated, or in place in an ET_EXEC) or
        # the function's code takes (`lea reg, [rip+label]`); a switch
        # table's relative offsets are neither, so a function with one is
        # refused.
        computed = code.pointers_between(lo, lo + sym.size) + [
            i.memory_displacement for i in insns if i.mnemonic == Mnemonic.LEA
            and i.memory_base == Register.RIP and lo <= i.memory_displacement < lo + sym.size]
        if not computed or any(_switch_table(i) for i in insns):
            raise NotTrapFree(f"{name} has an indirect jump at {name}+{indirect[0].ip - lo:#x} "
                              "(a switch table?) whose targets are unknown")
    first = next((n for n, i in enumerate(insns) if i.ip == link), None)
    if first is None:
        raise NotTrapFree(f"{link:#x} does not start an instruction of {name}")
    chosen: list[Instruction] = []
    length = 0
    if at_return:
        if insns[first].mnemonic != Mnemonic.RET:
            raise NotTrapFree(f"{name}+{link - lo:#x} is not a ret")
        for i in reversed(insns[:first + 1]):
            chosen.insert(0, i)
            length += i.len
            if length >= PATCH_LEN:
                break
        if length < PATCH_LEN:
            raise NotTrapFree(f"{name} has {length} bytes up to this ret (a jump needs "
                              f"{PATCH_LEN})")
    else:
        for i in insns[first:]:
            chosen.append(i)
            length += i.len
            if length >= PATCH_LEN:
                break
        if length < PATCH_LEN:
            raise NotTrapFree(f"{name} ends {length} bytes after it (a jump needs {PATCH_LEN})")
    first_ip = chosen[0].ip
    start_offset = file_offset - (link - first_ip)
    end = first_ip + length
    inside = code.targets_between(first_ip, end) + [t for t in computed if first_ip < t < end]
    if inside:
        raise NotTrapFree(f"a branch targets {name}+{inside[0] - lo:#x}, inside the "
                          f"{length} bytes a jump would replace")
    near = [o for o in others if start_offset <= o < start_offset + length]
    if near:
        raise NotTrapFree(f"another probe is at file offset {near[0]:#x}, inside the "
                          f"{length} bytes a jump would replace")
    raw = data[first_ip - lo:end - lo]
    displaced = tuple((i.ip - first_ip, raw[i.ip - first_ip:i.ip - first_ip + i.len])
                      for i in chosen)
    # A dry build at plausible addresses: what cannot be moved is refused now.
    fake = 0x10000000 + start_offset
    try:
        trampoline.build(fake + 0x100000,
                         lambda at: trampoline.counting_prologue(at, fake + 0x110000),
                         [Displaced(fake + off, b) for off, b in displaced], fake + length,
                         at_return)
    except UnsupportedInstruction as e:
        raise NotTrapFree(f"a displaced instruction cannot move: {e}") from None
    return FilePlan(start_offset, bytes(raw), displaced, at_return)


_wholes: dict[tuple[int, int, int], FilePlan | str] = {}


def plan_whole(path: str, dev: int, ino: int, file_offset: int) -> FilePlan | str:
    """A patch of the whole function starting at `file_offset`, or why there
    is none: a function too short for a patch at its entry and another at
    its ret (they would overlap) is timed by one patch of all of it. It must
    run straight through: no branch, call or other ret before its one `ret`
    at the end, and no branch from elsewhere into it."""
    return _cached(_wholes, (dev, ino, file_offset),
                   lambda: _whole(path, dev, ino, file_offset))


def _whole(path: str, dev: int, ino: int, file_offset: int) -> FilePlan:
    code = _file_code(path, dev, ino)
    image = code.image
    link = image.file_to_link_addr(file_offset)
    sym = code.symbols.containing(link)
    if sym is None or sym.size == 0 or sym.link_addr != link:
        raise NotTrapFree("it does not start a function symbol with a size")
    with image:
        data = image.read_file(file_offset, sym.size)
    insns = list(Decoder(64, data, ip=link))
    if len(data) < PATCH_LEN or any(i.is_invalid for i in insns) \
            or insns[-1].mnemonic != Mnemonic.RET \
            or any(i.flow_control != FlowControl.NEXT for i in insns[:-1]):
        raise NotTrapFree(f"{sym.display_name} does not run straight to one ret at its end")
    inside = code.targets_between(link, link + len(data))
    if inside:
        raise NotTrapFree(f"a branch targets {sym.display_name}+{inside[0] - link:#x}")
    displaced = tuple((i.ip - link, data[i.ip - link:i.ip - link + i.len]) for i in insns)
    fake = 0x10000000 + file_offset
    try:
        trampoline.build(fake + 0x100000,
                         lambda at: trampoline.counting_prologue(at, fake + 0x110000),
                         [Displaced(fake + off, b) for off, b in displaced], fake + len(data),
                         True, lambda at: trampoline.counting_prologue(at, fake + 0x110000))
    except UnsupportedInstruction as e:
        raise NotTrapFree(f"a displaced instruction cannot move: {e}") from None
    return FilePlan(file_offset, bytes(data), displaced, True, whole=True)
