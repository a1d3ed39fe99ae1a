"""Source variables (`s->name`, `$params`, `arr[3]`, `*p`) as fetches both
engines make, from the program's DWARF at the probe's address.

A variable's place there (`uprobes.elf.dwarf.location`) and its C type give
the fetch: a register, memory at a register plus an offset, a chain of
those for each pointer followed, memory at a static's address; the access
steps and what prints each type are `uprobes.resolve.dwarfaccess`'s.

A variable with no place at the address prints `<optimized out>`; one whose
place no fetch can express (a register the engines cannot read such as
xmm0, a value computed from two registers) is an error naming why, or in
`$params` an argument that says so: never a wrong value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any

from uprobes.elf.dwarf.index import DwarfFile, die_attr, die_name
from uprobes.elf.dwarf.location import Frame, Place, listed_at, location_at, register_name
from uprobes.elf.dwarf.types import CType
from uprobes.elf.ehframe import EhFrameTable
from uprobes.elf.image import ElfImage
from uprobes.errors import ResolveError
from uprobes.lang.ast import Deref, FetchArg, FetchExpr, Register, RetVal, StackPointer, Variable
from uprobes.lang.fetchargs import MAX_ARG_NAME_LEN
from uprobes.lang.render import render_variable
from uprobes.model.event import RA_ARG, SP_ARG
from uprobes.resolve.debugdwarf import dwarf_if_any
from uprobes.resolve.dwarfaccess import Access, Item
from uprobes.resolve.dwarfguards import guard_faults


@dataclass
class Scope:
    """What a probe's address sees of its function's DWARF."""

    df: DwarfFile
    link_addr: int
    entry: int
    """The function's first address (link)."""
    frame: Frame
    variables: dict[str, Any]
    """name -> DIE of the function's scopes, the innermost scope's first
    (shadowing as C does)."""
    params: list[Any]
    locals: list[Any]
    """Parameters and variables of the function's scopes that hold the address
    (not globals), outermost first: what `$vars` prints, as perf probe's."""
    function: str
    cu: Any
    """The unit, whose top holds its globals and statics."""
    _globals: dict[str, Any] | None = None

    def lookup(self, name: str) -> Any | None:
        """The DIE `name` names here: a variable of the function's scopes,
        else one of the unit's globals and statics (read only then: a big
        C++ unit has thousands of DIEs at its top)."""
        found = self.variables.get(name)
        return found if found is not None else self.globals().get(name)

    def globals(self) -> dict[str, Any]:
        if self._globals is None:
            self._globals = {}
            for die in self.df.unit_variables(self.cu):
                name = die_name(die)
                if name is not None and name not in self.variables and (
                        "DW_AT_location" in die.attributes
                        or "DW_AT_const_value" in die.attributes):
                    self._globals.setdefault(name, die)
        return self._globals

    def names(self) -> list[str]:
        """What is in scope, the function's own first."""
        return [*self.variables, *self.globals()]


def scope_at(df: DwarfFile, image: ElfImage, link_addr: int, file_offset: int) -> Scope:
    """The variables and parameters in scope at `link_addr` (file offset
    `file_offset` of `image`), and how to find their places."""
    scopes = df.scopes_at(link_addr)
    functions = [s for s in scopes if s.tag == "DW_TAG_subprogram"]
    if not functions:
        raise ResolveError(f"{image.path}: no function in its DWARF ({df.path}) covers "
                           f"0x{link_addr:x}")
    outer = functions[-1]
    cfi: list[EhFrameTable | None] = []

    def cfa() -> tuple[str, int] | None:
        if not cfi:
            cfi.append(EhFrameTable.from_image(image))
        table = cfi[0]
        rule = table.rule_at(link_addr) if table is not None else None
        reg = register_name(rule.cfa_reg) if rule is not None else None
        return None if rule is None or reg is None else (reg, rule.cfa_offset)

    entry = min((lo for lo, _ in df.ranges(outer)), default=link_addr)
    frame = Frame(cfa=cfa, at_entry=entry == link_addr, delta=link_addr - file_offset)
    frame.frame_base = lambda: location_at(df, outer, link_addr, frame, "DW_AT_frame_base")
    variables: dict[str, Any] = {}
    for die in reversed(scopes):
        for child in die.iter_children():
            if child.tag in ("DW_TAG_formal_parameter", "DW_TAG_variable"):
                name = die_name(child)
                if name is not None:
                    variables.setdefault(name, child)
    locals_ = [c for die in scopes for c in die.iter_children()
               if c.tag in ("DW_TAG_formal_parameter", "DW_TAG_variable")
               and variables.get(die_name(c) or "") is c]
    innermost = next(s for s in reversed(scopes)
                     if s.tag in ("DW_TAG_subprogram", "DW_TAG_inlined_subroutine"))
    params = [c for c in innermost.iter_children() if c.tag == "DW_TAG_formal_parameter"]
    return Scope(df, link_addr, entry, frame, variables, params, locals_,
                 die_name(innermost) or "?", outer.cu)


def lower_variables(args: tuple[FetchArg, ...], scope: Scope) -> tuple[FetchArg, ...]:
    """`args` with every `Variable` replaced by the fetches of its value."""
    access = Access(scope.frame.delta)
    out: list[FetchArg] = []
    typed: set[int] = set()  # the fetches the user typed (`s->flags:x32`, `p:string`)
    for arg in args:
        if not isinstance(arg.expr, Variable):
            typed.add(len(out))
            out.append(arg)
            continue
        var = arg.expr
        if var.is_params or var.is_vars:
            dies = scope.params if var.is_params else scope.locals
            for i, die in enumerate(dies):
                out += access.leaves(_item(scope, die), die_name(die) or f"param{i + 1}", 0,
                                     lenient=True)
            continue
        die = scope.lookup(var.name)
        if die is None:
            names = scope.names()
            near = difflib.get_close_matches(var.name, names, n=5, cutoff=0.6)
            hint = f" (did you mean: {', '.join(near)}?)" if near else \
                f" (in scope: {', '.join(names[:12]) or 'none'})"
            raise ResolveError(f"no variable '{var.name}' at {scope.function}+"
                               f"0x{scope.link_addr - scope.entry:x}{hint}")
        text = render_variable(var)
        item = _item(scope, die)
        for step in var.steps:
            item = access.step(item, step.op, step.field, step.index, text)
        if arg.type.is_string and item.type.kind in ("pointer", "reference"):
            # `p:string`: the string a pointer of any type points to, as perf probe reads it
            typed.add(len(out))
            out.append(FetchArg(arg.name, access.read(access.pointee(item, 0, text)),
                                replace(arg.type, view=None), arg.text))
            continue
        leaves = access.leaves(item, arg.name, 0, lenient=False, text=text)
        if arg.type.explicit:
            leaves = [_explicit(leaves, arg, item)]
            typed.add(len(out))
        out += leaves
    cfa = scope.frame.cfa()
    frame = {"sp", cfa[0]} if cfa is not None else {"sp"}
    if scope.link_addr != scope.entry and cfa is not None:
        out = [_entry_frame(a, cfa) for a in out]
    return guard_faults(_unique(out), set(range(len(out))) - typed, frame)


def _entry_frame(arg: FetchArg, cfa: tuple[str, int]) -> FetchArg:
    """The stack pointer and return address a call's entry fetches to pair
    it with its return (`latency`: `__sp=%sp`, `__ra=+0(%sp)`), where the
    probe is past the function's first instruction (after an unoptimized
    function's prologue): the return address is at the CFA - 8 there, and
    the stack pointer is read as the CFA's register (the entry's stack
    pointer less a constant of the probe's, which is what pairing compares)."""
    reg, off = cfa
    if arg.name == SP_ARG and (arg.expr == Register("sp") or isinstance(arg.expr, StackPointer)):
        return replace(arg, expr=Register(reg))
    if arg.name == RA_ARG and arg.expr == Deref(0, Register("sp")):
        return replace(arg, expr=Deref(off - 8, Register(reg)))
    return arg


def typed_return(args: tuple[FetchArg, ...], image: ElfImage,
                 debug_dirs: tuple[str, ...] | None, file_offset: int) -> tuple[FetchArg, ...]:
    """A return probe's bare `$retval`s read by the function's DWARF return
    type, as gdb's `finish` prints it (`char *` a string, enums by name,
    bool, signed widths, pointers in hex); as written (x64) without DWARF,
    for void, structs and DWARF this cannot read. A `float` or `double` is
    returned in xmm0 (the SysV ABI), which only the ptrace engine reads: such
    a probe goes to it, as a float parameter in an SSE register does. A
    value in neither rax nor xmm0 alone (complex, long double, a small struct
    of floats) is refused rather than printed from rax.
    `file_offset`: the function's entry in `image`."""
    if not any(isinstance(a.expr, RetVal) and not a.type.explicit for a in args):
        return args
    try:
        return _typed_return(args, image, debug_dirs, file_offset)
    except _NotInRax:
        raise
    except Exception:  # noqa: BLE001 - a bonus: DWARF it cannot read leaves $retval raw
        return args


def _typed_return(args: tuple[FetchArg, ...], image: ElfImage,
                  debug_dirs: tuple[str, ...] | None, file_offset: int) -> tuple[FetchArg, ...]:
    df = dwarf_if_any(image, debug_dirs)
    if df is None:
        return args  # no debug info: the raw register, as the kernel gives it
    entry = image.file_to_link_addr(file_offset)
    function = next((d for d in df.scopes_at(entry) if d.tag == "DW_TAG_subprogram"), None)
    if function is None:
        return args
    rtype = CType.of(function) if "DW_AT_type" in function.attributes \
        else CType.of(_origin(function))
    elsewhere = _not_in_rax(rtype)
    if elsewhere:
        text = next(a.text for a in args if isinstance(a.expr, RetVal) and not a.type.explicit)
        name = die_name(function) or die_name(_origin(function))
        raise _NotInRax(f"{text}: {name} returns a {rtype.name}, "
                        f"{elsewhere}; no $retval reads it (write $retval:x64 for rax "
                        "as it is)")
    if rtype.kind in ("void", "struct", "union", "array", "unknown") \
            or rtype.size not in (1, 2, 4, 8):
        return args
    # A long double (16 bytes, in st0) was left raw above; floats and doubles are in xmm0.
    held: FetchExpr = Register("xmm0") if rtype.encoding == "float" else RetVal()
    access = Access(entry - file_offset)
    out: list[FetchArg] = []
    for arg in args:
        if not isinstance(arg.expr, RetVal) or arg.type.explicit:
            out.append(arg)
            continue
        try:
            out += access.leaves(Item(Place("value", held), rtype), arg.name, 0,
                                 lenient=False, text="$retval")
        except ResolveError:
            out.append(arg)  # a type no fetch reads: the raw register, as written
    return tuple(out)


class _NotInRax(ResolveError):
    """A return value the registers $retval can read do not hold."""


def _not_in_rax(t: CType) -> str:
    """Where the SysV ABI returns a value of type `t` if not in rax/xmm0 alone
    (a complex number, a long double, a small struct or union with a
    floating-point member); "" when $retval can read it or leaves it raw."""
    if t.kind == "base" and t.encoding == "DW_ATE_0x3":  # complex_float
        return "in SSE registers" if t.size <= 16 else "in st0 and st1"
    if t.kind == "base" and t.encoding == "float" and t.size not in (4, 8):
        return "in st0"
    if t.kind in ("struct", "union") and 0 < t.size <= 16 and _has_float(t):
        return "in SSE registers"
    return ""


def _has_float(t: CType) -> bool:
    """Whether a floating-point value is part of a struct, union or array."""
    if t.kind in ("struct", "union"):
        return any(_has_float(m.type) for m in t.members)
    if t.kind == "array":
        return _has_float(t.target)
    return t.kind == "base" and (t.encoding == "float" or t.encoding == "DW_ATE_0x3")


def _item(scope: Scope, die: Any) -> Item:
    place = location_at(scope.df, die, scope.link_addr, scope.frame)
    if place.kind == "optimized_out" and "DW_AT_location" not in die.attributes:
        const = die_attr(die, "DW_AT_const_value")  # an inlined copy keeps it on its origin
        if const is not None and isinstance(const.value, int):
            place = Place("value", None, int(const.value))
    return Item(place, CType.of(die) if "DW_AT_type" in die.attributes
                else CType.of(_origin(die)))


def _origin(die: Any) -> Any:
    for link in ("DW_AT_abstract_origin", "DW_AT_specification"):
        if link in die.attributes:
            return die.get_DIE_from_attribute(link)
    return die


def _explicit(leaves: list[FetchArg], arg: FetchArg, item: Item) -> FetchArg:
    """The one fetch of a variable whose type the user wrote (`s->name:x64`)."""
    if len(leaves) != 1:
        raise ResolveError(f"{arg.text}: a {item.type.name} is {len(leaves)} values; "
                           "a type applies to one")
    return FetchArg(arg.name, leaves[0].expr, replace(arg.type, view=None), arg.text)


def _unique(args: list[FetchArg]) -> list[FetchArg]:
    """Argument names the kernel takes: at most 32 characters, each once (a
    value's `parts`, which follow it, renamed with them)."""
    used: set[str] = set()
    names = []
    for a in args:
        name, n = a.name[:MAX_ARG_NAME_LEN], 1
        while name in used:
            suffix = f"_{n}"
            name = a.name[:MAX_ARG_NAME_LEN - len(suffix)] + suffix
            n += 1
        used.add(name)
        names.append(name)
    out = []
    for i, (a, name) in enumerate(zip(args, names)):
        view = a.type.view
        if view is not None and view.parts:
            # each part is the first argument after its value with its name
            renamed = tuple(next(names[j] for j in range(i + 1, len(args))
                                 if args[j].name == p) for p in view.parts)
            if renamed != view.parts:
                a = replace(a, type=replace(a.type, view=replace(view, parts=renamed)))
        out.append(a if name == a.name else replace(a, name=name))
    return out


def after_prologue(df: DwarfFile, entry: int) -> int | None:
    """Where unoptimized code (-O0, or no -O, in the unit's DW_AT_producer) has set
    up its frame and stored its arguments: the first address of the
    function's second source line, as gdb's `break FUNC` and perf probe pick.
    None for optimized code (its locations are right from the first
    instruction) or when the line table says nothing better."""
    cu = df.unit_at(entry)
    if cu is None:
        return None
    producer = df.producer(cu)
    levels = [f for f in producer.split() if f.startswith("-O")]
    if levels and levels[-1] != "-O0":  # gcc takes the last -O given
        return None
    scopes = [s for s in df.scopes_at(entry) if s.tag == "DW_TAG_subprogram"]
    if not scopes:
        return None
    if not producer.startswith("GNU ") and _entry_is_right(df, scopes[-1], entry):
        return None  # LLVM (clang, rustc) records no -O: its locations tell
    end = max(hi for lo, hi in df.ranges(scopes[-1]) if lo <= entry < hi)
    rows = sorted((r for r in df.line_rows(cu)
                   if entry <= r.address < end and not r.end_sequence),
                  key=lambda r: r.address)
    if not rows or rows[0].address != entry:
        return None
    first = (rows[0].file, rows[0].line)
    later = [r for r in rows if r.address > entry and r.is_stmt]
    # A function on one line (`long area(long s) { return s * s; }`) has no
    # second line: its body starts at the line's next row, as gdb breaks there.
    # A line of another file is a callee inlined there, not the second line.
    return next((r.address for r in later if r.file == first[0] and r.line != first[1]),
                later[0].address if later else None)


_LOCATION_LISTS = frozenset(("DW_FORM_sec_offset", "DW_FORM_loclistx", "DW_FORM_data4",
                             "DW_FORM_data8"))
_DW_OP_REG0, _DW_OP_REG31, _DW_OP_REGX = 0x50, 0x6F, 0x90
_DW_OP_BREG0, _DW_OP_BREG31, _DW_OP_FBREG = 0x70, 0x8F, 0x91
_FRAME_REGISTERS = frozenset((6, 7))  # rbp, rsp: DWARF's x86-64 numbers


def _entry_is_right(df: DwarfFile, function: Any, entry: int) -> bool:
    """Whether a function's entry already shows what a probe there reads:
    its parameters and variables are where optimized code keeps them (in
    registers, or by location lists that hold at the entry) rather than in
    frame slots that the prologue fills, or it has no parameter with a
    location at all (none, or all optimized out), so no prologue stores one.
    A parameter that another register points to (`DW_OP_breg5`: passed by
    reference) is right at the entry too; only the frame's own registers
    (and the frame base) address a slot the prologue fills. Nothing else in
    LLVM's DWARF tells -O from -O0 for such a function: its producer records
    no flags, and with frame pointers both set up the same frame. A location
    list is no sign of -O by itself: rustc gives one to a parameter passed
    by reference at -O0 too, which starts after the prologue."""
    stored = False
    for child in function.iter_children():
        if child.tag not in ("DW_TAG_formal_parameter", "DW_TAG_variable"):
            continue
        attr = child.attributes.get("DW_AT_location")
        if attr is None:
            continue
        if attr.form in _LOCATION_LISTS:
            if listed_at(df, child, entry):
                return True
            stored = stored or child.tag == "DW_TAG_formal_parameter"
            continue
        ops = attr.value if isinstance(attr.value, list) else []
        if not ops:
            continue
        op = ops[0]
        if _DW_OP_REG0 <= op <= _DW_OP_REG31 or op == _DW_OP_REGX:
            return True
        if _DW_OP_BREG0 <= op <= _DW_OP_BREG31 and op - _DW_OP_BREG0 not in _FRAME_REGISTERS:
            return True
        if op == _DW_OP_FBREG or _DW_OP_BREG0 <= op <= _DW_OP_BREG31:
            stored = stored or child.tag == "DW_TAG_formal_parameter"
    return not stored
