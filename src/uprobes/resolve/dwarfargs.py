"""Source variables (`s->name`, `$params`, `arr[3]`, `*p`) as fetches both
engines make, from the program's DWARF at the probe's address.

A variable's place there (`uprobes.elf.dwarf.location`) and its C type give
the fetch: a register, memory at a register plus an offset, a chain of
those for each pointer followed, memory at a static's address. Each access
step moves the place: `.f` adds the member's offset, `->f` and `*p` read the
pointer and go there, `[i]` adds i elements. What the access ends on is
fetched by its type: integers by width and sign, `char *` and `char[N]` as
strings, enums, bools, chars and floats with a `ValueView` that renderers
print by, other pointers in hex, arrays of scalars as a kernel array, and a
struct as one argument per member (`s_id`, `s_name`...) to a depth: the
same fetchargs on both engines (`uprobe_events` lines, or evaluated).

A variable with no place at the address prints `<optimized out>`; one whose
place no fetch can express (a register the engines cannot read such as
xmm0, a value computed from two registers) is an error naming why, or in
`$params` an argument that says so: never a wrong value.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from typing import Any

from uprobes.elf.dwarf.index import DwarfFile, die_attr, die_name
from uprobes.elf.dwarf.location import (
    OPTIMIZED_OUT,
    Frame,
    Place,
    location_at,
    register_name,
    unsupported,
)
from uprobes.elf.dwarf.types import Counted, CType, Member
from uprobes.elf.ehframe import EhFrameTable
from uprobes.elf.image import ElfImage
from uprobes.errors import ResolveError
from uprobes.lang.ast import (
    Bitfield,
    FetchArg,
    FetchExpr,
    FetchType,
    Immediate,
    Register,
    RetVal,
    ValueView,
    Variable,
    Variant,
)
from uprobes.lang.fetchargs import MAX_ARG_NAME_LEN, MAX_ARRAY_LEN
from uprobes.lang.render import render_expr, render_variable
from uprobes.resolve.debugdwarf import dwarf_if_any

MAX_DEPTH = 2
"""How deep structs are printed member by member (`s->in.x` is depth 2);
deeper ones print `{...}`, as gdb's `set print max-depth`."""
TEXT_BYTES = 200
"""How much of a counted string (`&str`, `String`, `std::string`) is read:
gdb's `print elements` default; read as 25 u64 words, one kernel array."""
_NAMED_SCALARS = frozenset(("base", "enum", "pointer", "reference"))


@dataclass(frozen=True)
class Item:
    """A value being accessed: where it is, its type, and for a bitfield
    (bits, bit offset from the place's start) within a container of
    `container` bits."""

    place: Place
    type: CType
    bits: tuple[int, int, int] | None = None


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
    access = _Access(scope.frame.delta)
    out: list[FetchArg] = []
    for arg in args:
        if not isinstance(arg.expr, Variable):
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
            out.append(FetchArg(arg.name, access.read(access.pointee(item, 0, text)),
                                replace(arg.type, view=None), arg.text))
            continue
        leaves = access.leaves(item, arg.name, 0, lenient=False, text=text)
        if arg.type.explicit:
            leaves = [_explicit(leaves, arg, item)]
        out += leaves
    return tuple(_unique(out))


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
    access = _Access(entry - file_offset)
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


def _part(place: Place, offset: int) -> Place:
    """The place `offset` bytes into a value: memory moves; in pieces, the
    piece that holds it; in a register, the register with the bit offset
    noted (`bits@N`)."""
    if place.kind == "pieces":
        at = 0
        for size, piece in place.pieces:
            if at <= offset < at + size:
                return _part(piece, offset - at)
            at += size
        return OPTIMIZED_OUT
    if place.kind == "memory":
        return replace(place, offset=place.offset + offset)
    if place.kind == "value" and offset:
        if place.base is None or place.offset:
            return unsupported("a part of a computed value")
        held = int(place.note[5:]) if place.note.startswith("bits@") else 0
        return replace(place, note=f"bits@{held + offset * 8}")
    return place


class _Access:
    """Access steps and leaves for one probe (`delta` places statics, see `Place.read`)."""

    def __init__(self, delta: int) -> None:
        self.delta = delta

    def read(self, place: Place) -> FetchExpr:
        return place.read(self.delta)

    # -------------------------------------------------------- steps

    def step(self, item: Item, op: str, field: str, index: int, text: str) -> Item:
        t = item.type
        if op == "*":
            if t.kind not in ("pointer", "reference") or t.target.kind == "void":
                raise ResolveError(f"{text}: cannot dereference a {t.name}")
            return Item(self.pointee(item, 0, text), t.target)
        if op == "[]":
            if t.kind == "array":
                count = t.count
                if count is not None and index >= count:
                    raise ResolveError(f"{text}: index {index} is past the end of {t.name}")
                return Item(_part(item.place, index * t.target.size), t.target)
            if t.kind == "pointer" and t.target.kind != "void":
                return Item(self.pointee(item, index * t.target.size, text), t.target)
            raise ResolveError(f"{text}: cannot index a {t.name}")
        if op == "->":
            if t.kind not in ("pointer", "reference"):
                also = f" (write .{field})" if t.kind in ("struct", "union") else ""
                raise ResolveError(f"{text}: '->{field}' needs a pointer, and this is a "
                                   f"{t.name}{also}")
            item, t = Item(self.pointee(item, 0, text), t.target), t.target
        elif t.kind == "pointer" and not t.in_rust:
            raise ResolveError(f"{text}: '.{field}' on a pointer ({t.name}): write ->{field}")
        elif t.kind in ("pointer", "reference"):  # Rust's `.` reads through `&T`, as C++'s `T&`
            item, t = Item(self.pointee(item, 0, text), t.target), t.target
        if t.kind not in ("struct", "union"):
            raise ResolveError(f"{text}: a {t.name} has no member '{field}'")
        member = next((m for m in t.members if m.name == field), None)
        if member is None:
            names = [m.name for m in t.members]
            near = difflib.get_close_matches(field, names, n=5, cutoff=0.5)
            also = f" (did you mean: {', '.join(near)}?)" if near else \
                f" (members: {', '.join(names)})"
            raise ResolveError(f"{text}: {t.name} has no member '{field}'{also}")
        return _member(item, member)

    def pointer_value(self, item: Item, text: str) -> tuple[FetchExpr | None, int, bool] | Place:
        """A pointer's value as (base, offset, link); a Place when it has none."""
        place = _part(item.place, 0) if item.place.kind == "pieces" else item.place
        if item.bits is not None or place.note.startswith("bits@"):
            return unsupported(f"{text}: a pointer in part of a register")
        if place.kind == "memory":
            return self.read(place), 0, False
        if place.kind == "value":
            return place.base, place.offset, place.link
        return place

    def pointee(self, item: Item, by: int, text: str) -> Place:
        got = self.pointer_value(item, text)
        if isinstance(got, Place):
            return got
        base, off, link = got
        return Place("memory", base, off + by, link)

    # -------------------------------------------------------- leaves

    def leaves(self, item: Item, name: str, depth: int, *, lenient: bool,
               text: str | None = None) -> list[FetchArg]:
        """The fetches that print `item`: one, or one per member of a struct."""
        text = text or name
        place, t = item.place, item.type
        if place.kind in ("optimized_out", "unsupported"):
            return [_marker(name, place, t, text, lenient)]
        if t.kind == "reference":  # a C++ reference reads as what it refers to, as gdb shows
            return self.leaves(Item(self.pointee(item, 0, text), t.target), name, depth,
                               lenient=lenient, text=text)
        counted = t.counted
        if counted is not None:
            return self.counted(item, counted, name, lenient=lenient, text=text)
        if t.has_variants:
            return self.variants(item, name, depth, lenient=lenient, text=text)
        if t.kind in ("struct", "union"):
            if depth >= MAX_DEPTH:
                return [FetchArg(name, Immediate(0), FetchType("u8", view=_view("elided", t)))]
            out: list[FetchArg] = []
            for m in t.members:
                out += self.leaves(_member(item, m), f"{name}_{_identifier(m.name)}", depth + 1,
                                   lenient=lenient, text=f"{text}.{m.name}")
            return out
        try:
            return [FetchArg(name, *self.scalar(item, text))]
        except ResolveError as exc:
            if not lenient:
                raise
            return [_marker(name, unsupported(str(exc)), t, text, lenient)]

    def counted(self, item: Item, counted: Counted, name: str, *, lenient: bool,
                text: str) -> list[FetchArg]:
        """A string or list that a pointer and a count give (`&str`, `String`,
        `Vec<T>`, `std::string`): its first elements, as many as one kernel
        array holds, and the count, which says how many of them are its
        (the text is not NUL-terminated: a Rust `&str` points into other text)."""
        t, elem = item.type, counted.element
        length = _member(item, counted.length)
        data = _member(item, counted.data)
        for got in (data, length):
            if got.place.kind in ("optimized_out", "unsupported"):
                return [_marker(name, got.place, t, text, lenient)]
        part = f"{name}__len"
        try:
            first = self.pointee(data, 0, text)
            if first.kind != "memory":
                raise ResolveError(f"{text}: its data pointer {first.note or first.kind}")
            size_expr, size_type = self.fetch(length, FetchType("u64"), text)
            if counted.text:
                ftype = FetchType("u64", array=TEXT_BYTES // 8,
                                  view=_view("text", t, parts=(part,)))
            elif elem.kind in _NAMED_SCALARS and elem.size in (1, 2, 4, 8):
                one = _fetch_type(elem)
                ftype = replace(one, array=MAX_ARRAY_LEN,
                                view=_view("list", t, parts=(part,), element=one.view))
            else:
                raise ResolveError(f"{text}: a {t.name} of {elem.name} has no fetch type "
                                   f"(index its elements)")
        except ResolveError as exc:
            if not lenient:
                raise
            return [_marker(name, unsupported(str(exc)), t, text, lenient)]
        return [FetchArg(name, self.read(first), ftype),
                FetchArg(part, size_expr, size_type)]

    def variants(self, item: Item, name: str, depth: int, *, lenient: bool,
                 text: str) -> list[FetchArg]:
        """A Rust enum with data: its discriminant, and each variant's fields
        (where they would be), of which the discriminant picks the ones shown."""
        t = item.type
        layout = t.variant_part
        why = "" if layout is not None else f"{t.name}: its variants' DWARF is not read here"
        discr = layout.discriminant if layout is not None else None
        if discr is not None and (discr.type.kind not in ("base", "enum")
                                  or discr.type.size not in (1, 2, 4, 8)):
            why = f"{t.name}: a discriminant of {discr.type.size} bytes"
        if layout is None or discr is None or why:
            return [_marker(name, unsupported(why), t, text, lenient or depth > 0)]
        parts: list[FetchArg] = []
        variants: list[Variant] = []
        shown: list[str] = []
        for value, member in layout.variants:
            fields: list[tuple[str, int]] = []
            for f in member.type.members:
                at = _member(Item(_part(item.place, member.offset), member.type), f)
                got = self.one_value(at, f"{name}_{_identifier(member.name)}_{_identifier(f.name)}",
                                     depth + 1, f"{text}.{member.name}.{f.name}")
                fields.append((f.name, len(shown)))
                shown.append(got[0].name)
                parts += got
            variants.append(Variant(member.name, value, tuple(fields)))
        try:
            expr, ftype = self.fetch(_member(item, discr), FetchType(
                f"u{discr.type.size * 8}"), text)
        except ResolveError as exc:
            if not lenient:
                raise
            return [_marker(name, unsupported(str(exc)), t, text, lenient)]
        view = _view("variants", t, parts=tuple(shown), variants=tuple(variants))
        return [FetchArg(name, expr, replace(ftype, view=view)), *parts]

    def one_value(self, item: Item, name: str, depth: int, text: str) -> list[FetchArg]:
        """The fetches of one value that prints as one (a variant's field):
        the value first, then the parts it is made of. A struct is one too,
        its members its parts, to a depth."""
        t = item.type
        if t.kind not in ("struct", "union") or t.counted is not None or t.has_variants \
                or depth >= MAX_DEPTH or item.place.kind in ("optimized_out", "unsupported"):
            got = self.leaves(item, name, depth, lenient=True, text=text)
            if len(got) == 1 or (got[0].type.view is not None and got[0].type.view.parts):
                return got
            return [FetchArg(name, Immediate(0), FetchType("u8", view=_view("elided", t)))]
        fields: list[tuple[str, int]] = []
        shown: list[str] = []
        parts: list[FetchArg] = []
        for m in t.members:
            got = self.one_value(_member(item, m), f"{name}_{_identifier(m.name)}", depth + 1,
                                 f"{text}.{m.name}")
            fields.append((m.name, len(shown)))
            shown.append(got[0].name)
            parts += got
        view = _view("struct", t, parts=tuple(shown), variants=(Variant(t.name, None,
                                                                        tuple(fields)),))
        return [FetchArg(name, Immediate(0), FetchType("u8", view=view)), *parts]

    def scalar(self, item: Item, text: str) -> tuple[FetchExpr, FetchType]:
        t = item.type
        if t.kind == "array":
            return self.array(item, text)
        if t.kind in ("pointer", "reference") and t.target.is_char:
            got = self.pointer_value(item, text)
            if isinstance(got, Place):
                raise ResolveError(f"{text}: {got.note or 'no value here'}")
            base, off, link = got
            return (self.read(Place("memory", base, off, link)),
                    FetchType("string", view=_view("string", t)))
        if t.kind not in _NAMED_SCALARS or t.size not in (1, 2, 4, 8):
            raise ResolveError(f"{text}: a {t.name} ({t.size} bytes) has no fetch type")
        return self.fetch(item, _fetch_type(t), text)

    def fetch(self, item: Item, ftype: FetchType, text: str) -> tuple[FetchExpr, FetchType]:
        """The fetch of a scalar `item` read as `ftype`."""
        place = _part(item.place, 0) if item.place.kind == "pieces" else item.place
        in_register = int(place.note[5:]) if place.note.startswith("bits@") else 0
        bits = item.bits
        if place.kind == "value" and (in_register or place.width):
            size = min(item.type.size * 8, place.width or 64)
            bits = (size, in_register, 64) if bits is None \
                else (min(bits[0], size), in_register + bits[1], 64)
        if bits is not None:
            width, at, container = bits
            if place.kind == "value":
                container = 64
            view = ftype.view
            if ftype.base.startswith("s"):
                view = replace(view or ValueView("int", item.type.name), sign_bits=width)
            ftype = FetchType("bitfield", Bitfield(width, at, container), view=view)
        if place.kind == "memory":
            return self.read(place), ftype
        if place.kind == "value":
            if place.base is None and not place.link:
                return Immediate(place.offset), ftype
            if place.offset == 0 and place.base is not None:
                return place.base, ftype
            raise ResolveError(f"{text}: its value is computed ({_describe(place)}), which "
                               "no fetch can express")
        raise ResolveError(f"{text}: {place.note or place.kind}")

    def array(self, item: Item, text: str) -> tuple[FetchExpr, FetchType]:
        t = item.type
        elem, count = t.target, t.count
        if item.place.kind != "memory":
            raise ResolveError(f"{text}: an array outside memory ({item.place.kind})")
        if elem.is_char:
            return self.read(item.place), FetchType("string", view=_view("string", t))
        if count is None or count > MAX_ARRAY_LEN or elem.kind not in _NAMED_SCALARS \
                or elem.size not in (1, 2, 4, 8):
            raise ResolveError(f"{text}: a {t.name} has no fetch type (index it: {text}[0])")
        return self.read(item.place), replace(_fetch_type(elem), array=count)


def _member(item: Item, m: Member) -> Item:
    size = m.type.size
    if m.bit_size is None:
        return Item(_part(item.place, m.offset), m.type)
    container = max(size, 1) * 8
    unit = (m.bit_offset // container) * (container // 8)
    shift = m.bit_offset - unit * 8
    if shift + m.bit_size > container:
        return Item(unsupported(f"bitfield {m.name} straddles its storage unit"), m.type)
    return Item(_part(item.place, unit), m.type, (m.bit_size, shift, container))


def _marker(name: str, place: Place, t: CType, text: str, lenient: bool) -> FetchArg:
    """A value that is not there: `<optimized out>`, or (in `$params`) why not."""
    if place.kind == "optimized_out":
        return FetchArg(name, Immediate(0), FetchType("u8", view=_view("optimized_out", t)))
    if not lenient:
        raise ResolveError(f"{text}: {place.note}; its value cannot be fetched here")
    return FetchArg(name, Immediate(0),
                    FetchType("u8", view=_view("unsupported", t, note=place.note)))


def _identifier(name: str) -> str:
    """A member's name as part of an argument name (`_vptr.Base` -> `_vptr_Base`)."""
    return re.sub(r"\W+", "_", name)


def _view(kind: str, t: CType, **more: Any) -> ValueView:
    return ValueView(kind, t.name, **more)


def _fetch_type(t: CType) -> FetchType:
    bits = t.size * 8
    enc = t.encoding
    if t.kind in ("pointer", "reference"):
        return FetchType("x64", view=_view("pointer", t))
    if t.kind == "enum":
        sign = "s" if enc.startswith("signed") else "u"
        return FetchType(f"{sign}{bits}", view=_view("enum", t, enumerators=t.enumerators))
    if enc == "bool":
        return FetchType(f"u{bits}", view=_view("bool", t))
    if enc == "float":
        return FetchType(f"u{bits}", view=_view("float", t))
    if t.is_char:
        return FetchType(f"{'s' if enc == 'signed_char' else 'u'}8", view=_view("char", t))
    if enc == "utf" and bits == 32:  # a Rust char: a Unicode scalar value
        return FetchType("u32", view=_view("char", t))
    return FetchType(f"{'s' if enc.startswith('signed') else 'u'}{bits}")


def _describe(place: Place) -> str:
    base = render_expr(place.base) if place.base is not None else "an address"
    return f"{base} {'+' if place.offset >= 0 else '-'} {abs(place.offset)}"


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
    if not producer.startswith("GNU ") and _entry_is_right(scopes[-1]):
        return None  # LLVM (clang, rustc) records no -O: its locations tell
    end = max(hi for lo, hi in df.ranges(scopes[-1]) if lo <= entry < hi)
    rows = sorted((r for r in df.line_rows(cu)
                   if entry <= r.address < end and not r.end_sequence),
                  key=lambda r: r.address)
    if not rows or rows[0].address != entry:
        return None
    first = rows[0].line
    later = [r for r in rows if r.address > entry and r.is_stmt]
    # A function on one line (`long area(long s) { return s * s; }`) has no
    # second line: its body starts at the line's next row, as gdb breaks there.
    return next((r.address for r in later if r.line != first),
                later[0].address if later else None)


_LOCATION_LISTS = frozenset(("DW_FORM_sec_offset", "DW_FORM_loclistx", "DW_FORM_data4",
                             "DW_FORM_data8"))
_DW_OP_REG0, _DW_OP_REG31, _DW_OP_REGX = 0x50, 0x6F, 0x90


def _entry_is_right(function: Any) -> bool:
    """Whether a function's entry already shows what a probe there reads:
    its parameters and variables are where optimized code keeps them (in
    registers, or by location lists) rather than in frame slots that the
    prologue fills, or it has no parameter with a location at all (none, or
    all optimized out), so no prologue stores one. Nothing else in LLVM's
    DWARF tells -O from -O0 for such a function: its producer records no
    flags, and with frame pointers both set up the same frame."""
    stored = False
    for child in function.iter_children():
        if child.tag not in ("DW_TAG_formal_parameter", "DW_TAG_variable"):
            continue
        attr = child.attributes.get("DW_AT_location")
        if attr is None:
            continue
        if attr.form in _LOCATION_LISTS:
            return True
        ops = attr.value if isinstance(attr.value, list) else []
        if ops and (_DW_OP_REG0 <= ops[0] <= _DW_OP_REG31 or ops[0] == _DW_OP_REGX):
            return True
        stored = stored or child.tag == "DW_TAG_formal_parameter"
    return not stored
