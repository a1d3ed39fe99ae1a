"""Where CPython 3.11's eval loop leaves a frame by an exception.

A function that returns passes RETURN_VALUE; one left by an exception
passes `exit_unwind` instead: the unwinding found no handler in the frame,
popped its value stack and goes there, which counts the recursion back and
tests `frame->is_entry` (an entry frame returns NULL to its C caller, any
other is popped and its caller resumed with the error). Every such exit
passes it, and nothing else does. It is a label, not a handler: the
dispatch table does not give it, nor any symbol; the build's DWARF names it
(DW_TAG_label in `_PyEval_EvalFrameDefault`), so a build without DWARF (and
no debug file) has none, and a `py:` return probe there sees returns only.
The register that holds the frame there is the one that tests `is_entry`.

A generator or coroutine resumed by `throw()` or `close()` does not pass
RESUME either: the eval loop starts it at `resume_with_error` (another
label), with the exception set, as if the yield it is suspended at had
raised. The unwinding of a frame into its caller goes there too (the
caller resumes with the error); a suspended frame is told apart by the
instruction it last ran, a YIELD_VALUE (a caller's is a call). The
register that holds the frame there is the one the label's code first
reads `prev_instr` through.

3.12 and 3.13 have the same two labels, where their own code tells the
registers: `exit_unwind` first reads the dying frame's `previous` (to pop
it) and calls `_PyEval(Frame)ClearAndPop(tstate, dying)`, whose first
argument is the thread state, loaded from the eval loop's stack frame
there (3.12 keeps the raised exception itself in the thread state, not its
type); `resume_with_error` has the frame's `prev_instr` (`instr_ptr`)
loaded before it is jumped to, and first takes the address of the frame's
`localsplus` (its value stack).

Reading the labels takes seconds (the eval loop's unit is large): the
answer is cached per build-id beside the layouts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from elftools.common.exceptions import DWARFError, ELFError, ELFParseError
from elftools.elf.elffile import ELFFile
from iced_x86 import Decoder, FlowControl, Instruction, Mnemonic, OpKind, RegisterExt
from iced_x86 import Register as R

from uprobes.elf.image import ElfImage
from uprobes.errors import ResolveError
from uprobes.resolve.pydwarf import debug_file_for
from uprobes.resolve.pyeval import _KERNEL_NAMES as KERNEL_NAMES
from uprobes.resolve.pylayout import _cache_dir as cache_dir

LABEL = "exit_unwind"
THROWN = "resume_with_error"
_FIRST = 12  # instructions after a label in which the frame's register shows


@dataclass(frozen=True)
class UnwindExit:
    """The `exit_unwind` label's link address, and the register (the
    kernel's name) holding the frame there."""

    link_addr: int
    frame: str
    tstate: str | None = None
    """The fetch of the thread state there, where the code says it (3.12 on)."""


def eval_labels(debug: str, function: int) -> dict[str, int]:
    """The DWARF labels (DW_TAG_label) of the unit holding `function` (the
    eval loop's link address) in `debug`, by name."""
    with open(debug, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        aranges = dwarf.get_aranges()
        if aranges is None:
            return {}
        at = aranges.cu_offset_at_addr(function)
        if at is None:
            return {}
        cu = dwarf.get_CU_at(at)
        out: dict[str, int] = {}
        for die in cu.iter_DIEs():
            if die.tag != "DW_TAG_label" or "DW_AT_low_pc" not in die.attributes:
                continue
            named = die  # (an LTO build's labels name their abstract origin)
            while "DW_AT_name" not in named.attributes \
                    and "DW_AT_abstract_origin" in named.attributes:
                named = named.get_DIE_from_attribute("DW_AT_abstract_origin")
            if "DW_AT_name" in named.attributes:
                out[named.attributes["DW_AT_name"].value.decode()] = \
                    die.attributes["DW_AT_low_pc"].value
        return out


def _first(image: ElfImage, link_addr: int) -> list[Instruction]:
    """The first instructions after a label (none if they cannot be read)."""
    try:
        code = image.read_link(link_addr, 96)
    except ResolveError:
        return []
    return list(Decoder(64, code, ip=link_addr))[:_FIRST]


def _frame_register(image: ElfImage, link_addr: int, is_entry: int) -> str | None:
    """The register `cmp byte [REG+is_entry], 0` reads, soon after the label."""
    insns = _first(image, link_addr)
    for insn in insns:
        if insn.mnemonic == Mnemonic.CMP and insn.op0_kind == OpKind.MEMORY \
                and insn.memory_displacement == is_entry and insn.memory_index == R.NONE \
                and insn.op1_kind == OpKind.IMMEDIATE8 and insn.immediate8 == 0:
            return KERNEL_NAMES.get(insn.memory_base)
    return None


def _read_register(image: ElfImage, link_addr: int, field: int) -> str | None:
    """The register the first read of `[REG+field]` after the label goes
    through, if no instruction before it writes that register."""
    insns = _first(image, link_addr)
    written: set[int] = set()
    for insn in insns:
        if insn.mnemonic == Mnemonic.MOV and insn.op1_kind == OpKind.MEMORY \
                and insn.memory_displacement == field and insn.memory_index == R.NONE \
                and insn.memory_base not in written and insn.memory_base != R.RSP:
            return KERNEL_NAMES.get(insn.memory_base)
        if insn.op0_kind == OpKind.REGISTER:
            written.add(insn.op0_register)
            written.add(RegisterExt.full_register(insn.op0_register))
        if insn.mnemonic == Mnemonic.CALL:
            return None
    return None


def _lea_register(image: ElfImage, link_addr: int, field: int) -> str | None:
    """The register whose `[REG+field]` the first `lea` after the label takes
    the address of, if no instruction before it writes that register."""
    insns = _first(image, link_addr)
    written: set[int] = set()
    for insn in insns:
        if insn.mnemonic == Mnemonic.LEA and insn.memory_displacement == field \
                and insn.memory_index == R.NONE and insn.memory_base not in written:
            return KERNEL_NAMES.get(insn.memory_base)
        if insn.op0_kind == OpKind.REGISTER:
            written.add(RegisterExt.full_register(insn.op0_register))
        if insn.flow_control != FlowControl.NEXT:
            return None
    return None


def _first_argument(image: ElfImage, link_addr: int) -> str | None:
    """What the first argument (`rdi`) of the first call after the label
    holds, as a fetch of the registers and memory at the label (`%bx`,
    `+8(%sp)`), followed through plain moves; None if it is anything else."""
    insns = _first(image, link_addr)
    held: dict[int, tuple[int, int | None] | None] = {}  # reg: (base at the label, disp)

    def value(reg: int) -> tuple[int, int | None] | None:
        return held[reg] if reg in held else (reg, None)

    for insn in insns:
        if insn.mnemonic == Mnemonic.CALL:
            at = value(R.RDI)
            if at is None or at[0] not in KERNEL_NAMES:
                return None
            name = KERNEL_NAMES[at[0]]
            return f"%{name}" if at[1] is None else f"+{at[1]}(%{name})"
        if insn.flow_control != FlowControl.NEXT:
            return None
        if insn.op_count == 0 or insn.op0_kind != OpKind.REGISTER:
            continue
        dest = RegisterExt.full_register(insn.op0_register)
        held[dest] = None
        if insn.mnemonic != Mnemonic.MOV or insn.op0_register != dest:
            continue  # (a 32-bit write, or anything but a copy: not followed)
        if insn.op1_kind == OpKind.REGISTER and insn.op1_register in KERNEL_NAMES:
            held[dest] = value(insn.op1_register)
        elif insn.op1_kind == OpKind.MEMORY and insn.memory_index == R.NONE \
                and (base := value(insn.memory_base)) is not None and base[1] is None:
            held[dest] = (base[0], insn.memory_displacement)
    return None


def find_unwind_exit(image: ElfImage, function: int, is_entry: int | None,
                     previous: int = 8) -> UnwindExit | None:
    """`exit_unwind` in the eval loop at `function` of `image`, or None when
    the build has no DWARF that names it (or its code is not as described).
    `is_entry`: 3.11's `frame->is_entry` offset; None, a later version's
    label, told by its reading `frame->previous` (`previous`) and its call's
    thread state."""
    if is_entry is not None:
        return _at_label(image, function, LABEL,
                         lambda at: _frame_register(image, at, is_entry))
    link_addr = _label(image, function, LABEL)
    if link_addr is None:
        return None
    frame = _read_register(image, link_addr, previous)
    tstate = _first_argument(image, link_addr)
    return UnwindExit(link_addr, frame, tstate) if frame and tstate else None


def find_thrown_resume(image: ElfImage, function: int, prev_instr: int,
                       localsplus: int | None = None) -> UnwindExit | None:
    """`resume_with_error` in the eval loop at `function` of `image` (where a
    generator resumed by `throw()` starts), as `find_unwind_exit`; on 3.12
    and later (`localsplus`: the offset of the frame's value stack) the
    frame is told by its first `lea`."""
    if localsplus is not None:
        return _at_label(image, function, THROWN,
                         lambda at: _lea_register(image, at, localsplus))
    return _at_label(image, function, THROWN, lambda at: _read_register(image, at, prev_instr))


def _at_label(image: ElfImage, function: int, label: str,
              frame_at: Callable[[int], str | None]) -> UnwindExit | None:
    link_addr = _label(image, function, label)
    frame = None if link_addr is None else frame_at(link_addr)
    return UnwindExit(link_addr, frame) if link_addr is not None and frame else None


def _label(image: ElfImage, function: int, label: str) -> int | None:
    """The link address of `label` in the eval loop, from the build's DWARF
    (cached by build-id), or None."""
    cached = os.path.join(cache_dir(), f"{image.build_id}.{label}.json") \
        if image.build_id else None
    link_addr: int | None = None
    try:
        with open(cached or "") as f:
            link_addr = json.load(f)["link_addr"]
    except (OSError, ValueError, KeyError, TypeError):
        debug = debug_file_for(image.path, image.build_id)
        try:
            link_addr = eval_labels(debug, function).get(label) if debug else None
        except (OSError, ELFError, ELFParseError, DWARFError):
            link_addr = None
        if cached:
            try:
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                with open(cached + ".tmp", "w") as f:
                    json.dump({"link_addr": link_addr}, f)
                os.replace(cached + ".tmp", cached)
            except OSError:
                pass  # (found again next time)
    return link_addr if isinstance(link_addr, int) else None
