"""What a jump patch replaces, decided from the probed file alone (jumppatch.py
places it into processes): the whole instructions covering the 5 bytes of a
`jmp rel32`, inside one function symbol with a size, with no branch of the
file into them and no other probe among them, each movable by the
trampoline (trampoline.py). Files are decoded once and plans are cached,
for the life of the process (the agent's: many runs, and processes, come and
go): by the file's version, read by the path the latest caller gave.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from iced_x86 import Decoder, FlowControl, Instruction, Mnemonic, OpKind, Register

from uprobes.elf.image import ElfImage, FileIdentity
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.tracee.relocate import UnsupportedInstruction
from uprobes.engines.trapfree import trampoline
from uprobes.engines.trapfree.gotos import FileData, indirect_targets
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
    arrivals: Counter[int]  # how many direct branches land at each target
    data: FileData | None = None  # read when a function with indirect jumps is planned
    plans: dict[tuple[int, tuple[int, ...], bool, tuple[int, ...]], FilePlan | str] = \
        field(default_factory=dict)  # plan_for's, by its arguments
    wholes: dict[int, FilePlan | str] = field(default_factory=dict)  # plan_whole's

    def targets_between(self, lo: int, hi: int) -> list[int]:
        """Branch targets t with lo < t < hi."""
        return self.targets[bisect.bisect_right(self.targets, lo):
                            bisect.bisect_left(self.targets, hi)]


_files: dict[tuple[int, int], _FileCode] = {}


def _file_code(path: str, dev: int, ino: int) -> _FileCode:
    """File `path`'s code, decoded once per version of the file (its dev and
    inode as resolved, the size and times it has now)."""
    key = (dev, ino)
    try:
        now = FileIdentity.of(os.stat(path))
    except OSError as e:
        raise NotTrapFree(f"cannot read {path}: {e.strerror}") from None
    found = _files.get(key)
    if found is not None and found.image.identity == now:
        # Read by this path from now on: the first caller's may be gone (a
        # /proc/PID/root/... of a process that has exited). Every read checks
        # the file is still this version.
        found.image.path = path
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
    targets: Counter[int] = Counter()
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
                targets[insn.near_branch_target] += 1
    found = _FileCode(image, symbols, sorted(targets), targets)
    _files[key] = found
    return found


def plan_for(path: str, dev: int, ino: int, file_offset: int,
             other_probes: Iterable[int] = (), at_return: bool = False,
             tables: tuple[int, ...] = ()) -> FilePlan | str:
    """The patch for a probe at `file_offset`, or why there is none.
    `other_probes`: file offsets of the file's other probes. `at_return`:
    the probe is on a `ret` (a return probe on the function's rets): the
    patch is the whole instructions covering 5 bytes that end with it.
    `tables`: the dispatch tables the function's computed gotos read, as
    resolution found them (ResolvedProbe.computed_gotos)."""
    others = tuple(sorted(o for o in other_probes if o != file_offset))
    return _cached(path, dev, ino, False, (file_offset, others, at_return, tables),
                   lambda: _plan(path, dev, ino, file_offset, others, at_return, tables))


def _cached(path: str, dev: int, ino: int, whole: bool, key: Any,
            make: Callable[[], FilePlan]) -> FilePlan | str:
    """`make()`'s plan, or why there is none, made once per key and version
    of the file (kept with the file's code, apart for `whole` plans). A
    file that could not be read is not kept as a reason: the next caller's
    path may read it."""
    try:
        code = _file_code(path, dev, ino)
        kept: dict[Any, FilePlan | str] = code.wholes if whole else code.plans
    except NotTrapFree as e:
        return str(e)
    except UprobesError as e:
        return f"cannot read the function: {e}"
    found = kept.get(key)
    if found is None:
        try:
            found = make()
        except NotTrapFree as e:
            found = str(e)
        except UprobesError as e:
            return f"cannot read the function: {e}"
        kept[key] = found
    return found


def _cold_parts(code: _FileCode, name: str) -> list[list[Instruction]]:
    """The parts of function `name` the compiler moved away (`NAME.cold`,
    `NAME.cold.N`), decoded."""
    out = []
    for sym in code.symbols.functions():
        if not sym.size or not (sym.name == f"{name}.cold"
                                or sym.name.startswith(f"{name}.cold.")):
            continue
        try:
            start = code.image.link_to_file_offset(sym.link_addr)
            with code.image:
                raw = code.image.read_file(start, sym.size)
        except UprobesError:
            continue
        out.append(list(Decoder(64, raw, ip=sym.link_addr)))
    return out


def _returns_through_a_thunk(code: _FileCode, insns: list[Instruction]) -> str | None:
    """Why `insns` jump somewhere no branch names, by a retpoline (a thunk
    that `ret`s to a register stored over its return address), or None."""
    for before, insn in zip(insns, insns[1:]):
        if insn.mnemonic == Mnemonic.RET and before.mnemonic == Mnemonic.MOV \
                and before.op0_kind == OpKind.MEMORY and before.memory_base == Register.RSP \
                and before.memory_displacement == 0 and before.memory_index == Register.NONE:
            return f"returns to a register stored on its stack at {insn.ip:#x}"
    for insn in insns:
        if insn.op0_kind == OpKind.NEAR_BRANCH64 and (insn.is_call_near or insn.is_jmp_near):
            sym = code.symbols.containing(insn.near_branch_target)
            if sym is not None and "indirect_thunk" in sym.name:
                return f"jumps through {sym.name} at {insn.ip:#x}"
    return None


def _plan(path: str, dev: int, ino: int, file_offset: int, others: tuple[int, ...],
          at_return: bool, tables: tuple[int, ...] = ()) -> FilePlan:
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
    # (a part of the function the compiler moved away, `NAME.cold`, may
    # jump into it indirectly too: its instructions are read with it)
    parts = sorted([*insns, *(i for cold in _cold_parts(code, name) for i in cold)],
                   key=lambda i: i.ip)
    thunk = _returns_through_a_thunk(code, parts)
    if thunk is not None:
        raise NotTrapFree(f"{name} {thunk}; where it lands is unknown")
    if any(i.is_jmp_near_indirect for i in parts):
        if code.data is None:
            code.data = FileData(image)
        found = indirect_targets(parts, lo, lo + sym.size, code.data, code.targets_between,
                                 lambda t: code.arrivals[t], tables)
        if isinstance(found, str):
            raise NotTrapFree(f"{name} has {found}; the jumps' targets are unknown")
        computed = found
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


def plan_whole(path: str, dev: int, ino: int, file_offset: int) -> FilePlan | str:
    """A patch of the whole function starting at `file_offset`, or why there
    is none: a function too short for a patch at its entry and another at
    its ret (they would overlap) is timed by one patch of all of it. It must
    run straight through: no branch, call or other ret before its one `ret`
    at the end, and no branch from elsewhere into it."""
    return _cached(path, dev, ino, True, file_offset,
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
