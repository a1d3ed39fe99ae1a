"""The code a call can run, found by following its branches: what the
Python walk's call (pywalk.py) runs, so a probe there keeps the int3 path.

From a function's entry every instruction of it is decoded (its symbol's
bounds); a direct call or jump out of it starts another function (the one
its symbol holds); a jump into a PLT stub goes where the stub's GOT word is
bound: every loaded file's definition of the symbol its relocation names
(a superset of the one the dynamic linker picks), the stub itself, and,
lazily bound, the dynamic linker (the whole file). Any other indirect branch,
a target no symbol holds, or an IFUNC leaves the code unknown: the caller
refuses. A function that ends the process (`ENDS`: a debug build's failed
assertion) is not followed. Ranges are file offsets, so a probe is compared by its file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.relocation import RelocationSection
from iced_x86 import Decoder, FlowControl, OpKind

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.errors import UprobesError

ENDS = frozenset({"__assert_fail", "__assert_perror_fail", "abort", "__stack_chk_fail",
                  "__fortify_fail", "__chk_fail", "Py_FatalError", "_Py_FatalErrorFunc",
                  "_Py_FatalErrorFormat"})
"""Functions that end the process (a failed assertion of a debug build):
not followed, a probe there meets a program that was dying anyway."""
MAX_FUNCS = 64
MAX_FUNC_BYTES = 1 << 16
_PLTS = (".plt", ".plt.sec", ".plt.got")
_STUB = 16


@dataclass(frozen=True)
class Span:
    """Code the call may run: file offsets [lo, hi) of the file `ident` (st_dev, st_ino)."""

    path: str
    ident: tuple[int, int]
    lo: int
    hi: int


class _File:
    def __init__(self, path: str) -> None:
        self.path = path
        st = os.stat(path)
        self.ident = (st.st_dev, st.st_ino)
        self.image = ElfImage.open(path)
        self.symbols = SymbolTable.load(self.image)
        self._slots: dict[int, str] | None = None

    def slots(self) -> dict[int, str]:
        """GOT word's link address -> the symbol its relocation binds."""
        if self._slots is None:
            self._slots = {}
            with self.image.elffile() as elf:
                for section in elf.iter_sections():
                    if not isinstance(section, RelocationSection):
                        continue
                    table: Any = elf.get_section(section["sh_link"])
                    for rel in section.iter_relocations():
                        if rel["r_info_sym"]:
                            name = table.get_symbol(rel["r_info_sym"]).name
                            self._slots[rel["r_offset"]] = name
        return self._slots

    def plt(self, addr: int) -> bool:
        for name in _PLTS:
            s = self.image.section(name)
            if s is not None and s.link_addr <= addr < s.link_addr + s.size:
                return True
        return False

    def span(self, lo: int, hi: int) -> Span:
        return Span(self.path, self.ident, self.image.link_to_file_offset(lo),
                    self.image.link_to_file_offset(lo) + hi - lo)


def reach(start_path: str, start: int, loaded: Sequence[str], linker: str | None) -> \
        list[Span] | str:
    """The spans the function at link address `start` of `start_path` may
    run, with the files `loaded` in the process (their definitions bind its
    PLT calls) and the dynamic linker `linker`; or why they are not known."""
    try:
        return _reach(start_path, start, loaded, linker)
    except (OSError, UprobesError, ELFError, ELFParseError) as e:
        return f"the code its call runs is not known ({e})"


def _reach(start_path: str, start: int, loaded: Sequence[str], linker: str | None) -> \
        list[Span] | str:
    files: dict[str, _File] = {}

    def get(path: str) -> _File:
        if path not in files:
            files[path] = _File(path)
        return files[path]

    spans: list[Span] = []
    todo = [(start_path, start)]
    seen: set[tuple[str, int]] = set()
    lazy = False
    while todo:
        path, addr = todo.pop()
        f = get(path)
        if f.plt(addr):
            stub = f.image.read_link(addr, _STUB)
            insn = next(iter(Decoder(64, stub, ip=addr)))
            if not (insn.flow_control == FlowControl.INDIRECT_BRANCH
                    and insn.is_ip_rel_memory_operand):
                return f"the PLT stub at {addr:#x} of {path} is not a jump through the GOT"
            name = f.slots().get(insn.ip_rel_memory_address)
            if name in ENDS:
                continue
            if name is None:
                return f"the PLT stub at {addr:#x} of {path} binds no symbol"
            spans.append(f.span(addr, addr + _STUB))
            lazy = True
            found = False
            for other in loaded:
                for sym in get(other).symbols.lookup(name):
                    if sym.kind == "ifunc":
                        return f"{name} is an IFUNC"
                    if sym.kind == "func" and (other, sym.link_addr) not in seen:
                        todo.append((other, sym.link_addr))
                    found = found or sym.kind == "func"
            if not found:
                return f"no loaded file defines {name}"
            continue
        held = f.symbols.containing(addr)
        if held is None or not held.size or held.size > MAX_FUNC_BYTES:
            return f"no symbol of {path} holds {addr:#x}"
        if (path, held.link_addr) in seen or held.name in ENDS:
            continue
        seen.add((path, held.link_addr))
        if len(seen) > MAX_FUNCS:
            return f"its call runs more than {MAX_FUNCS} functions"
        lo, hi = held.link_addr, held.link_addr + held.size
        spans.append(f.span(lo, hi))
        for insn in Decoder(64, f.image.read_link(lo, hi - lo), ip=lo):
            flow = insn.flow_control
            if flow in (FlowControl.INDIRECT_BRANCH, FlowControl.INDIRECT_CALL):
                return f"{held.name} of {path} branches indirectly at {insn.ip:#x}"
            if flow in (FlowControl.CALL, FlowControl.UNCONDITIONAL_BRANCH,
                        FlowControl.CONDITIONAL_BRANCH) and \
                    insn.op0_kind in (OpKind.NEAR_BRANCH64, OpKind.NEAR_BRANCH32):
                target = insn.near_branch_target
                if not lo <= target < hi:
                    todo.append((path, target))
    if lazy and linker is not None:
        ld = get(linker)
        spans.append(Span(linker, ld.ident, 0, os.path.getsize(linker)))
    return spans


def holds(spans: Sequence[Span], path: str, file_offset: int) -> bool:
    """Whether a probe at `file_offset` of `path` is in the code `spans` cover."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    return any(s.ident == (st.st_dev, st.st_ino) and s.lo <= file_offset < s.hi for s in spans)


__all__ = ["Span", "holds", "reach"]
