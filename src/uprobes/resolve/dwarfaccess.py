"""Access steps and the fetches that print a value, from its DWARF type and
place (`uprobes.elf.dwarf.location`).

Each access step moves the place: `.f` adds the member's offset, `->f` and
`*p` read the pointer and go there, `[i]` adds i elements. What the access
ends on is fetched by its type: integers by width and sign, `char *` and
`char[N]` as strings, enums, bools, chars and floats with a `ValueView` that
renderers print by, other pointers in hex, arrays of scalars as a kernel
array, and a struct as one argument per member (`s_id`, `s_name`...) to a
depth. A value one fetch cannot hold is several, which print as one (its
view's `parts`): a counted string or list (`&str`, `String`, `Vec<T>`,
`std::string`) its first elements and its count, a Rust enum with data its
discriminant and every variant's fields. The same fetchargs serve both
engines (`uprobe_events` lines, or evaluated).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from typing import Any

from uprobes.elf.dwarf.location import OPTIMIZED_OUT, Place, unsupported
from uprobes.elf.dwarf.types import Counted, CType, Member
from uprobes.errors import ResolveError
from uprobes.lang.ast import (
    Bitfield,
    FetchArg,
    FetchExpr,
    FetchType,
    Immediate,
    ValueView,
    Variant,
)
from uprobes.lang.fetchargs import MAX_ARRAY_LEN
from uprobes.lang.render import render_expr

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


def _part(place: Place, offset: int) -> Place:
    """The place `offset` bytes into a value: memory moves; in pieces, the
    pieces from the one that holds it on (a field further in is in a later
    piece); in a register, the register with the bit offset noted (`bits@N`)."""
    if place.kind == "pieces":
        at = 0
        for i, (size, piece) in enumerate(place.pieces):
            if at <= offset < at + size:
                if piece.kind in ("optimized_out", "unsupported"):
                    return piece
                return Place("pieces", pieces=((at + size - offset, _part(piece, offset - at)),
                                               *place.pieces[i + 1:]))
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


def _first(place: Place, size: int) -> Place:
    """The place of a value of `size` bytes that starts at `place`: in pieces,
    the first, which must hold all of it (a value split over two registers
    has no one fetch)."""
    if place.kind != "pieces":
        return place
    held, piece = place.pieces[0]
    if size > held:
        return unsupported(f"a value of {size} bytes split over pieces of {held}")
    return piece


class Access:
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
        place = _first(item.place, item.type.size)
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
        counts: list[FetchArg] = []
        try:
            first = self.pointee(data, counted.skip, text)
            if first.kind != "memory":
                raise ResolveError(f"{text}: its data pointer {first.note or first.kind}")
            size_expr, size_type = self.fetch(length, FetchType("u64"), text)
            if counted.shared:  # Rc<str>, Arc<str>: the counts before the text
                counts = [FetchArg(f"{name}__{c}", self.read(self.pointee(data, off, text)),
                                   FetchType("u64")) for c, off in (("strong", 0), ("weak", 8))]
            if counted.text:
                ftype = FetchType("u64", array=TEXT_BYTES // 8, view=_view(
                    "text", t, parts=(part, *(c.name for c in counts)), note=counted.shared))
            elif elem.kind in _NAMED_SCALARS and elem.size in (1, 2, 4, 8):
                one = _fetch_type(elem)
                ftype = replace(one, array=MAX_ARRAY_LEN,
                                view=_view("list", t, parts=(part,), element=one.view))
            elif _records(elem) is not None:
                ftype = FetchType("u64", array=MAX_ARRAY_LEN, view=_view(
                    "list", t, parts=(part,), element=ValueView(
                        "struct", elem.name, layout=_records(elem) or (), stride=elem.size)))
            else:
                raise ResolveError(f"{text}: a {t.name} prints elements that are numbers "
                                   f"or structs of numbers only: {_not_record(elem)}")
        except ResolveError as exc:
            if not lenient:
                raise
            return [_marker(name, unsupported(str(exc)), t, text, lenient)]
        return [FetchArg(name, self.read(first), ftype),
                FetchArg(part, size_expr, size_type), *counts]

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
        # Variants often hold the same field at the same place (24 variants of
        # one String): it is fetched once, for each of them, so that the probe
        # stays within what the kernel takes in one event.
        fetched: dict[tuple[object, ...], str] = {}
        for value, member in layout.variants:
            fields: list[tuple[str, int]] = []
            for f in member.type.members:
                at = _member(Item(_part(item.place, member.offset), member.type), f)
                got = self.one_value(at, f"{name}_{_identifier(member.name)}_{_identifier(f.name)}",
                                     depth + 1, f"{text}.{member.name}.{f.name}")
                first = fetched.setdefault(_fetches(got), got[0].name)
                fields.append((f.name, len(shown)))
                shown.append(first)
                if first == got[0].name:
                    parts += got
            variants.append(Variant(member.name, value, tuple(fields)))
        try:
            sign = "s" if discr.type.encoding.startswith("signed") else "u"
            expr, ftype = self.fetch(_member(item, discr), FetchType(
                f"{sign}{discr.type.size * 8}"), text)
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
        place = _first(item.place, item.type.size)
        in_register = int(place.note[5:]) if place.note.startswith("bits@") else 0
        bits = item.bits
        if place.kind == "value" and (in_register or place.width):
            size = min(item.type.size * 8, place.width or 64)
            if in_register + size > 64:
                raise ResolveError(f"{text}: bits {in_register}..{in_register + size} of a "
                                   "64-bit register")
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


def _records(t: CType) -> tuple[tuple[str, int, FetchType], ...] | None:
    """A struct of scalars as a list's element: each member's name, offset
    and type; None for another type (a member that is no scalar, a bitfield)."""
    if t.kind != "struct" or t.counted is not None or t.has_variants or not t.members \
            or not 0 < t.size <= MAX_ARRAY_LEN * 8:
        return None
    out = []
    for m in t.members:
        if m.bit_size is not None or m.type.kind not in _NAMED_SCALARS \
                or m.type.size not in (1, 2, 4, 8):
            return None
        out.append((m.name, m.offset, _fetch_type(m.type)))
    return tuple(out)


def _not_record(t: CType) -> str:
    """Why `_records` takes no `t`, in words."""
    if t.kind != "struct" or t.counted is not None or t.has_variants or not t.members:
        return f"{t.name} is not a plain struct"
    if not 0 < t.size <= MAX_ARRAY_LEN * 8:
        return f"{t.name} is {t.size} bytes"
    for m in t.members:
        if m.bit_size is not None:
            return f"{t.name}'s member {m.name} is a bitfield"
        if m.type.kind not in _NAMED_SCALARS or m.type.size not in (1, 2, 4, 8):
            return f"{t.name}'s member {m.name} is {m.type.name}, a {m.type.kind}"
    return f"{t.name} is not one"


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


def _fetches(got: list[FetchArg]) -> tuple[object, ...]:
    """What a value's fetches read, whatever they are named: equal for the
    same field at the same place."""
    lead = got[0].name

    def own(n: str) -> str:
        return n[len(lead):] if n.startswith(lead) else n
    out: list[object] = []
    for a in got:
        view = a.type.view
        if view is not None and view.parts:
            view = replace(view, parts=tuple(own(p) for p in view.parts))
        out.append((own(a.name), render_expr(a.expr), replace(a.type, view=view)))
    return tuple(out)


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
