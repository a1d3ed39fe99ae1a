"""Where a CPython 3.11 build's eval loop starts a Python function, returns
from one, and keeps the frame: the ground `py:` function probes stand on.

Every Python frame runs in `_PyEval_EvalFrameDefault`: a call from C enters
it, and a Python-to-Python call is inlined there (CALL pushes the frame and
jumps to its start). A function's first instruction is RESUME (oparg 0;
1-3 resume a generator or coroutine), which turns into RESUME_QUICK once
the code is warm: both handlers are where calls start. RETURN_VALUE is
where they return, YIELD_VALUE where a generator gives a value, and
RETURN_GENERATOR where a generator function's call returns its generator.

Built with computed gotos, the loop dispatches through a static table of
256 handler addresses (`opcode_targets`, a local symbol of the file or of
its debug file): its word for an opcode is the handler's link address, or,
in a shared library, the addend of the R_X86_64_RELATIVE relocation that
fills it in at load time.

Which registers hold `frame`, `next_instr` and `stack_pointer` at a
handler's entry is not in the DWARF (its location lists do not cover the
handlers' first bytes), but the compiler gives every handler the same
registers there, and the code shows them: nearly every handler begins by
storing `next_instr` into `frame->prev_instr` (`mov [FRAME+prev_instr],
NEXT`), and reads the top of the value stack as `[STACK-8]`. The pair most
handlers agree on is taken, and refused below AGREE of them.

Opcode numbers are each version's (pyversions.py; the tests check them
against the interpreter's own `dis`). From 3.12 RETURN_CONST returns a
constant of the code, `co_consts[oparg]`, which no fetch can index: the
handler's own load of it (`mov REG, [CONSTS + OPARG*8 + ob_item]`, before
its first branch) shows the register that holds it, and a return probe
there goes right after that load.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from iced_x86 import Decoder, FlowControl, Mnemonic, OpKind, RegisterExt
from iced_x86 import Register as R

from uprobes.elf.image import ElfImage
from uprobes.elf.relocs import relative_addends
from uprobes.errors import ResolveError
from uprobes.resolve.pyversions import ENTRY_HANDLERS, RETURN_HANDLERS
from uprobes.resolve.pyversions import OPCODES as VERSION_OPCODES

OPCODES = VERSION_OPCODES[(3, 11)]
"""CPython 3.11's numbers of the opcodes whose handlers matter here (each
version's: pyversions.OPCODES)."""
TABLE_WORDS = 256
AGREE = 0.95
"""The share of the handlers that store `prev_instr` which must agree on the registers."""
_FIRST = 7  # instructions of a handler read for the registers it starts with
_KERNEL_NAMES = {R.RAX: "ax", R.RBX: "bx", R.RCX: "cx", R.RDX: "dx", R.RSI: "si", R.RDI: "di",
                 R.RBP: "bp", R.RSP: "sp",
                 **{getattr(R, f"R{n}"): f"r{n}" for n in range(8, 16)}}


@dataclass(frozen=True)
class EvalLoop:
    """One build's eval loop: link addresses, and the registers (the kernel's
    names: `bx`, `r15`) that hold `frame`, `next_instr` and `stack_pointer`
    when a handler starts."""

    path: str
    function: int
    size: int
    table: int
    handlers: dict[str, int]
    frame: str
    next_instr: str
    stack: str
    shown: frozenset[str] = frozenset()
    """The handlers (of `handlers`) whose own first instructions store
    `next_instr` into the frame through these registers: where code in the
    program may read through them (trapfree/pyguard.py), not only the
    tracer, whose reads cannot crash the program."""
    entries: tuple[str, ...] = ENTRY_HANDLERS[(3, 11)]
    """The handlers (of `handlers`) where a Python call starts."""
    returns: tuple[str, ...] = RETURN_HANDLERS[(3, 11)]
    """The handlers where a Python call returns."""
    loaded: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Return handlers whose value is not on the stack (RETURN_CONST): the
    link address right after the handler loads it, and the register there."""


def find_eval_loop(image: ElfImage, symbols_path: str, prev_instr: int,
                   version: tuple[int, int] = (3, 11), tuple_items: int = 0x18) -> EvalLoop:
    """The eval loop of `image` (the interpreter, or libpython), with its
    symbols read from `symbols_path` (the file itself, or its debug file);
    `prev_instr`: offsetof(_PyInterpreterFrame, prev_instr) (3.13's
    `instr_ptr`) in this build (resolve/pylayout.py), `version` its
    CPython's, `tuple_items`: offsetof(PyTupleObject, ob_item). A
    ResolveError, in one line, when the build cannot be read this way."""
    (function, size), cold, table = _symbols(image.path, symbols_path)
    words = _table(image, table)
    handlers = {name: words[op] for name, op in VERSION_OPCODES[version].items()}
    for name, addr in handlers.items():
        if not (function <= addr < function + size
                or cold is not None and cold[0] <= addr < cold[0] + cold[1]):
            raise ResolveError(f"{image.path}: the dispatch table's {name} handler "
                               f"0x{addr:x} is outside _PyEval_EvalFrameDefault")
    frame, next_instr, stack = _registers(image, set(words), prev_instr)
    shown = frozenset(name for name, addr in handlers.items()
                      if _stores(image, addr, prev_instr) == (frame, next_instr))
    returns = RETURN_HANDLERS[version]
    loaded = {}
    for name in (n for n in returns if n.endswith("RETURN_CONST")):
        found = _const_load(image, handlers[name], tuple_items, {frame, stack})
        if found is None:
            raise ResolveError(f"{image.path}: its eval loop's {name} handler does not show "
                               "where it loads the constant it returns")
        loaded[name] = found
    return EvalLoop(image.path, function, size, table, handlers, frame, next_instr, stack,
                    shown, ENTRY_HANDLERS[version], returns, loaded)


def _const_load(image: ElfImage, addr: int, tuple_items: int,
                kept: set[str]) -> tuple[int, str] | None:
    """(the link address after the load, its register) of the handler at
    `addr` loading `co_consts[oparg]` (`mov REG, [BASE + INDEX*8 +
    ob_item]`) before its first branch, with the registers of `kept` not
    written before it; None if it does not."""
    try:
        code = image.read_link(addr, 160)
    except ResolveError:
        return None
    for insn in Decoder(64, code, ip=addr):
        written = _KERNEL_NAMES.get(RegisterExt.full_register(insn.op0_register)) \
            if insn.op_count and insn.op0_kind == OpKind.REGISTER else None
        if insn.mnemonic == Mnemonic.MOV and insn.op1_kind == OpKind.MEMORY \
                and insn.memory_index != R.NONE and insn.memory_index_scale == 8 \
                and insn.memory_displacement == tuple_items and written:
            return insn.next_ip, written
        if insn.flow_control != FlowControl.NEXT or (written in kept):
            return None
    return None


def _stores(image: ElfImage, addr: int, prev_instr: int) -> tuple[str, str] | None:
    """(frame, next_instr) as the handler at `addr` stores `prev_instr`
    among its first instructions, before any branch; None if it does not."""
    try:
        code = image.read_link(addr, 64)
    except ResolveError:
        return None
    for insn in list(Decoder(64, code, ip=addr))[:_FIRST]:
        if insn.mnemonic == Mnemonic.MOV and insn.op0_kind == OpKind.MEMORY \
                and insn.memory_displacement == prev_instr \
                and insn.memory_index == R.NONE and insn.op1_kind == OpKind.REGISTER:
            base, value = (_KERNEL_NAMES.get(r) for r in (insn.memory_base, insn.op1_register))
            return (base, value) if base and value else None
        if insn.flow_control != FlowControl.NEXT:
            return None
    return None


def _symbols(path: str, symbols_path: str
             ) -> tuple[tuple[int, int], tuple[int, int] | None, int]:
    """(_PyEval_EvalFrameDefault's (address, size), its `.cold` part's if the
    compiler split one off, opcode_targets' address)."""
    function: tuple[int, int] | None = None
    cold: tuple[int, int] | None = None
    table: int | None = None
    try:
        with open(symbols_path, "rb") as f:
            symtab = ELFFile(f).get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                symtab = None
            for sym in symtab.iter_symbols() if symtab is not None else ():
                if sym.name == "_PyEval_EvalFrameDefault" and sym["st_value"]:
                    function = (sym["st_value"], sym["st_size"])
                elif sym.name == "_PyEval_EvalFrameDefault.cold" and sym["st_value"]:
                    cold = (sym["st_value"], sym["st_size"])
                elif sym.name.split(".")[0] == "opcode_targets" \
                        and sym["st_size"] == 8 * TABLE_WORDS:
                    table = sym["st_value"]
    except (OSError, ELFError, ELFParseError) as e:
        raise ResolveError(f"cannot read the symbols of {path} in {symbols_path}: {e}") from e
    if function is None:
        raise ResolveError(f"{path}: no _PyEval_EvalFrameDefault in {symbols_path}'s symbol "
                           "table (not a CPython, or stripped with no debug file)")
    if table is None:
        raise ResolveError(f"{path}: its eval loop has no dispatch table (opcode_targets): "
                           "a build without computed gotos dispatches by a switch, which "
                           "py: probes do not read")
    return function, cold, table


def _table(image: ElfImage, table: int) -> list[int]:
    """The table's 256 words: handler link addresses (a shared library's are
    the addends of the relocations that fill the words in)."""
    raw = image.read_link(table, 8 * TABLE_WORDS)
    words = [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(TABLE_WORDS)]
    addends: dict[int, int] = {}
    try:
        with image.elffile() as elf:
            for addr, addend in relative_addends(elf):
                at = addr - table
                if 0 <= at < 8 * TABLE_WORDS:
                    addends[at // 8] = addend
    except (ELFError, ELFParseError) as e:
        raise ResolveError(f"cannot read the relocations of {image.path}: {e}") from e
    return [addends.get(i, w) for i, w in enumerate(words)]


def _registers(image: ElfImage, handlers: set[int], prev_instr: int) -> tuple[str, str, str]:
    """(frame, next_instr, stack_pointer) registers at the handlers' entries."""
    pairs: Counter[tuple[int, int]] = Counter()
    tops: Counter[int] = Counter()
    for addr in handlers:
        try:
            code = image.read_link(addr, 64)
        except ResolveError:
            continue
        stored = False
        for insn in list(Decoder(64, code, ip=addr))[:_FIRST]:
            if not stored and insn.mnemonic == Mnemonic.MOV and insn.op0_kind == OpKind.MEMORY \
                    and insn.memory_displacement == prev_instr \
                    and insn.memory_index == R.NONE and insn.op1_kind == OpKind.REGISTER:
                pairs[(insn.memory_base, insn.op1_register)] += 1
                stored = True
            if insn.op_count == 2 and insn.op1_kind == OpKind.MEMORY \
                    and insn.memory_displacement == (1 << 64) - 8 and insn.memory_index == R.NONE:
                tops[insn.memory_base] += 1
    if not pairs or not tops:
        raise ResolveError(f"{image.path}: its eval loop's handlers do not show where the "
                           "frame is (no store of frame->prev_instr at their start)")
    (frame, next_instr), agreeing = pairs.most_common(1)[0]
    stack, reads = tops.most_common(1)[0]
    names = [_KERNEL_NAMES.get(r) for r in (frame, next_instr, stack)]
    # (the value stack's top is read by most handlers that read one; a frame
    # pointer build's locals at [rbp-8] are fewer)
    if agreeing < AGREE * sum(pairs.values()) or reads < 0.5 * sum(tops.values()) \
            or None in names or len(set(names)) < 3:
        raise ResolveError(f"{image.path}: its eval loop's handlers disagree on where the "
                           "frame is kept")
    return names[0] or "", names[1] or "", names[2] or ""
