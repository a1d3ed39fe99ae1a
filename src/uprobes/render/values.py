"""Values with a DWARF view (`ValueView`) as the source reads them: enums by
name, bools, chars, floats, pointers in hex, strings, and the values that are
not there (`<optimized out>`, as gdb prints it). Text for trace lines, plain
JSON values for JSON output."""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from uprobes.lang.ast import FetchType, ValueView, Variant
from uprobes.model.event import ArgValue

_FLOAT = {4: (struct.Struct("<I"), struct.Struct("<f"), ".9g"),
          8: (struct.Struct("<Q"), struct.Struct("<d"), ".17g")}
"""gdb prints a float with 9 significant digits and a double with 17, the
fewest that always read back to the same value, then trims trailing zeros."""


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _bits(ftype: FetchType) -> int:
    return ftype.bitfield.container if ftype.bitfield else ftype.size * 8


def _number(value: int, ftype: FetchType, view: ValueView) -> int:
    if view.sign_bits:
        return _signed(value, view.sign_bits)
    if ftype.base.startswith("s"):
        return _signed(value, _bits(ftype))
    return value & ((1 << _bits(ftype)) - 1)


def _float(value: int, ftype: FetchType) -> float:
    raw, cooked, _ = _FLOAT[ftype.size]
    return float(cooked.unpack(raw.pack(value & ((1 << (8 * ftype.size)) - 1)))[0])


@dataclass(frozen=True)
class Composed:
    """A value made of several fetches (see `ValueView.parts`): its own, and
    its parts' with their types."""

    own: ArgValue
    parts: tuple[tuple[Shown, FetchType], ...]


Shown = ArgValue | Composed


class Fold:
    """Which of a probe's arguments print, and their values from a hit's:
    the parts of a composed value go into it (`Composed`)."""

    def __init__(self, args: Sequence[tuple[str, FetchType]]) -> None:
        index = {name: i for i, (name, _) in enumerate(args)}
        self.leads: dict[int, tuple[int, ...]] = {}
        self.guards: dict[int, tuple[int, ...]] = {}
        hidden: set[int] = set()
        for i, (_, t) in enumerate(args):
            if t.view is not None and t.view.parts:
                self.leads[i] = tuple(index[p] for p in t.view.parts)
                hidden.update(self.leads[i])
            if t.view is not None and t.view.guards:
                self.guards[i] = tuple(index[g] for g in t.view.guards)
                hidden.update(self.guards[i])
        self.types = [t for _, t in args]
        self.shown = [i for i in range(len(args)) if i not in hidden]
        self.args = tuple(args[i] for i in self.shown)

    def values(self, values: Sequence[ArgValue]) -> list[Shown]:
        return [self._value(i, values) for i in self.shown]

    def _value(self, i: int, values: Sequence[ArgValue]) -> Shown:
        if i not in self.leads:
            return None if self._faulted(i, values) else values[i]
        parts = tuple((self._value(j, values), self.types[j]) for j in self.leads[i])
        view = self.types[i].view
        if view is not None and view.kind in ("text", "list"):
            count = parts[0][0]
            if count is None:
                return None  # its count could not be read
            if count == 0:  # nothing to read: its data pointer may dangle
                return Composed(values[i], parts)
        return None if self._faulted(i, values) else Composed(values[i], parts)

    def _faulted(self, i: int, values: Sequence[ArgValue]) -> bool:
        """Whether a guard of value `i` faulted, its witness not (see
        uprobes.resolve.dwarfguards)."""
        guards = self.guards.get(i)
        if guards is None or values[guards[0]] is None:
            return False
        view = self.types[i].view
        reads = guards[1:-1] if view is not None and view.own_guard else guards[1:]
        if any(values[g] is None for g in reads):
            return True
        return len(reads) < len(guards) - 1 and values[guards[-1]] is None \
            and _zeros(values[i])


def _zeros(value: ArgValue) -> bool:
    """Whether a fetched value is all zero bytes (what a read that faulted
    leaves)."""
    if isinstance(value, list):
        return all(_zeros(v) for v in value)
    return value == 0 or value is None


@functools.lru_cache(maxsize=256)
def fold_of(args: tuple[tuple[str, FetchType], ...]) -> Fold | None:
    """The `Fold` of a probe with composed or guarded values; None for the
    others (most)."""
    if not any(t.view is not None and (t.view.parts or t.view.guards) for _, t in args):
        return None
    return Fold(args)


def shown_args(args: Mapping[str, ArgValue],
               info_args: tuple[tuple[str, FetchType], ...]) -> dict[str, object]:
    """An event's arguments as `--json` and a Session's events give them:
    the user's names only (the parts and guards of a DWARF value go into
    it), each with a DWARF view as the view gives it (`view_json`: enums by
    name, floats, structs as dicts), None for one that could not be read."""
    fold = fold_of(info_args)
    if fold is not None:
        values = fold.values([args.get(name) for name, _ in info_args])
        return {name: view_json(v, t) if t.view is not None else v
                for (name, t), v in zip(fold.args, values)}
    views = {name: t for name, t in info_args if t.view is not None}
    if not views:
        return dict(args)
    return {name: view_json(v, views[name]) if name in views else v
            for name, v in args.items()}


def plain_args(args: dict[str, ArgValue],
               info_args: tuple[tuple[str, FetchType], ...]) -> dict[str, ArgValue]:
    """An event's arguments for outputs that take plain values (Chrome's
    JSON, Perfetto): a composed value as one, its text (a string's own); a
    value with a DWARF view as a number where it is one (signed, a bool 0
    or 1), else as its text (an enum's name, a float), None where it could
    not be read."""
    fold = fold_of(info_args)
    if fold is None:
        if not any(t.view is not None for _, t in info_args):
            return args
        fold = Fold(info_args)
    values = fold.values([args.get(name) for name, _ in info_args])
    out: dict[str, ArgValue] = {}
    for (name, t), v in zip(fold.args, values):
        if t.view is None:
            out[name] = v if not isinstance(v, Composed) else view_text(v, t)
        elif isinstance(v, Composed) and t.view.kind == "text":
            out[name] = _text_bytes(v)[0].decode("utf-8", "replace")
        elif isinstance(v, Composed):
            out[name] = view_text(v, t)
        else:
            out[name] = _plain(v, t)
    return out


def _plain(v: ArgValue, t: FetchType) -> ArgValue:
    """A value with a view, not composed: as JSON where that is an
    `ArgValue` (a bool as 0 or 1), else its text."""
    shown = view_json(v, t)
    if isinstance(shown, list) and all(isinstance(x, int) for x in shown):
        return [int(x) for x in shown]
    if isinstance(shown, int):
        return int(shown)
    return shown if shown is None or isinstance(shown, str) else view_text(v, t)


_ESCAPES = {0x07: "\\a", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v",
            0x0C: "\\f", 0x0D: "\\r", 0x1B: "\\033", 0x22: '\\"', 0x5C: "\\\\"}


_WORDS = [struct.Struct(f"<{n}Q") for n in range(65)]


def _text_bytes(c: Composed) -> tuple[bytes, bool]:
    """A text's bytes (as many as were read) and whether it has more."""
    words = c.own if isinstance(c.own, list) else []
    try:
        data = _WORDS[len(words)].pack(*words)
    except struct.error:  # not all numbers: none of ours
        data = _WORDS[len(words)].pack(*(w if isinstance(w, int) else 0 for w in words))
    count = _count(c)
    return data[:count], count > len(data)


_ESCAPED = re.compile("[\x00-\x1f\x7f\"\\\\\udc80-\udcff]")
"""What `escape` changes."""
_PLAIN_NOT = bytes([*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100)])
"""Bytes other than printable ASCII save the quote and the backslash."""


def _escape_one(m: re.Match[str]) -> str:
    n = ord(m.group())
    if n >= 0xDC80:  # a byte that is not UTF-8
        return f"\\{n - 0xDC00:03o}"
    return _ESCAPES.get(n) or f"\\{n:03o}"


def escape(data: bytes) -> str:
    """Bytes as gdb prints a string's: UTF-8 text as it is, quotes,
    backslashes and control characters escaped (`\\t`, `\\000`), other
    bytes that are not UTF-8 in octal."""
    if len(data.translate(None, _PLAIN_NOT)) == len(data):
        return data.decode("ascii")  # most text: printable ASCII, nothing to escape
    return _ESCAPED.sub(_escape_one, data.decode("utf-8", "surrogateescape"))


def _shared_counts(value: Composed, view: ValueView) -> tuple[Shown, Shown] | None:
    """An `Rc<str>`'s or `Arc<str>`'s strong and weak counts as gdb's printer
    shows them (the weak one less the one the strong ones hold together)."""
    if not view.note or len(value.parts) < 3:
        return None
    strong, weak = value.parts[1][0], value.parts[2][0]
    return strong, weak - 1 if isinstance(weak, int) else weak


def _count(value: Composed) -> int:
    count = value.parts[0][0] if value.parts else 0
    return count if isinstance(count, int) else 0


def _records(value: Composed, view: ValueView) -> tuple[list[list[tuple[str, int, FetchType]]],
                                                          bool]:
    """A list of structs' elements (those it has of those read), each its
    members' (name, value, type), and whether it has more than were read."""
    words = value.own if isinstance(value.own, list) else []
    data = _WORDS[len(words)].pack(*(w if isinstance(w, int) else 0 for w in words))
    stride = view.stride
    count = _count(value)
    shown = min(count, len(data) // stride)
    out = []
    for i in range(shown):
        at = i * stride
        out.append([(name, int.from_bytes(data[at + off:at + off + t.size], "little",
                                          signed=t.signed), t)
                    for name, off, t in view.layout])
    return out, count > shown


def _elements(value: Composed, ftype: FetchType) -> tuple[list[ArgValue], FetchType, bool]:
    """A list's elements (those it has of those read), the type each is read
    by, and whether it has more than were read."""
    view = ftype.view
    assert view is not None
    got = value.own if isinstance(value.own, list) else []
    count = _count(value)
    one = FetchType(ftype.base, ftype.bitfield, None, ftype.explicit, view.element)
    items: list[ArgValue] = list(got[:count])
    return items, one, count > len(got)


def _variant(value: Composed,
             ftype: FetchType) -> tuple[str, list[tuple[str, Shown, FetchType]]] | None:
    """The variant a discriminant selects (a struct's one), and its fields'
    values; None when it selects none."""
    view = ftype.view
    assert view is not None
    chosen: Variant | None = view.variants[0] if view.variants else None
    if view.kind != "struct":
        mask = (1 << (ftype.size * 8)) - 1
        discr = (value.own if isinstance(value.own, int) else 0) & mask
        found = next((v for v in view.variants
                      if v.discr is not None and v.discr & mask == discr), None)
        chosen = found or next((v for v in view.variants if v.discr is None), None)
    if chosen is None:
        return None
    return chosen.name, [(name, value.parts[i][0], value.parts[i][1])
                         for name, i in chosen.fields]


def _composed_text(value: Composed, ftype: FetchType) -> str:
    view = ftype.view
    assert view is not None
    if view.kind == "text":
        data, more = _text_bytes(value)
        quoted = f'"{escape(data)}"' + ("..." if more else "")
        counts = _shared_counts(value, view)
        if counts is None:
            return quoted
        strong, weak = counts
        return (f"{view.note}(strong={strong}, weak={weak}) = "
                f"{{value = {quoted}, strong = {strong}, weak = {weak}}}")
    if view.kind == "list" and view.element is not None and view.element.layout:
        records, more = _records(value, view.element)
        text = [_record_text(r, view.element.type_name) for r in records]
        return "{" + ",".join(text + (["..."] if more else [])) + "}"
    if view.kind == "list":
        items, one, more = _elements(value, ftype)
        text = [view_text(v, one) if one.view is not None else str(v) for v in items]
        return "{" + ",".join(text + (["..."] if more else [])) + "}"
    got = _variant(value, ftype)
    if got is None:
        return f"<discriminant {value.own}>"
    name, fields = got
    # gdb writes a struct `Point {x: 1}`, a variant `Circle{r: 1.5}`
    name = name + " " if view.kind == "struct" else name
    if not fields:
        return name.strip()
    shown = [(f, _field_text(v, t)) for f, v, t in fields]
    if all(f.startswith("__") for f, _ in shown):  # a tuple variant or struct
        return f"{name.strip()}({', '.join(v for _, v in shown)})"
    return name + "{" + ", ".join(f"{f}: {v}" for f, v in shown) + "}"


def _tuple_like(fields: Sequence[tuple[str, object, object]]) -> bool:
    """Whether fields are a tuple's or a tuple struct's (`__0`, `__1`...)."""
    return bool(fields) and all(f.startswith("__") for f, _, _ in fields)


def _record_text(fields: list[tuple[str, int, FetchType]], name: str) -> str:
    """One struct of a list, as gdb prints it: `Point {x: 1, y: 2}`, a tuple
    struct `Tup (5, -6)`, a tuple `(1, 2)`."""
    values = [_field_text(v, t) for _, v, t in fields]
    if _tuple_like(fields):
        inner = "(" + ", ".join(values) + ")"
        return inner if name.startswith("(") else f"{name} {inner}"
    return f"{name} {{" + ", ".join(f"{f}: {v}" for (f, _, _), v in zip(fields, values)) + "}"


def _field_text(value: Shown, ftype: FetchType) -> str:
    if ftype.view is not None or isinstance(value, Composed):
        return view_text(value, ftype)
    if isinstance(value, int) and ftype.base.startswith("s"):
        return str(_signed(value, ftype.size * 8))
    return str(value)


def _composed_json(value: Composed, ftype: FetchType) -> object:
    """Text as a string (bytes not UTF-8 as U+FFFD), a list as a list, a
    variant as serde writes it: `"None"`, `{"Some": 5}`, `{"Circle": {"r": 1.5}}`;
    a struct as an object. Text or a list longer than was read is
    `{"truncated": what was read, "length": its whole length}`, so that no
    reader takes the first 200 bytes for all of it."""
    view = ftype.view
    assert view is not None
    if view.kind in ("text", "list"):
        got: object
        if view.kind == "text":
            data, more = _text_bytes(value)
            got = data.decode("utf-8", "replace")
            counts = _shared_counts(value, view)
            if counts is not None:
                got = {"value": got, "strong": counts[0], "weak": counts[1]}
        elif view.element is not None and view.element.layout:
            records, more = _records(value, view.element)
            got = [[view_json(v, t) if t.view is not None else v for _, v, t in r]
                   if _tuple_like(r) else
                   {f: view_json(v, t) if t.view is not None else v for f, v, t in r}
                   for r in records]
        else:
            items, one, more = _elements(value, ftype)
            got = [view_json(v, one) if one.view is not None else v for v in items]
        return {"truncated": got, "length": _count(value)} if more else got
    got = _variant(value, ftype)
    if got is None:
        return None
    name, fields = got
    values = [(f, view_json(v, t) if t.view is not None or isinstance(v, Composed) else v)
              for f, v, t in fields]
    tuple_like = bool(values) and all(f.startswith("__") for f, _ in values)
    inner: object = ([v for _, v in values] if len(values) > 1 else values[0][1]) \
        if tuple_like else dict(values)
    if view.kind == "struct":
        return inner
    return {name: inner} if values else name


def view_text(value: Shown, ftype: FetchType) -> str:
    """One value as text (a list as `{a,b}`, like the kernel's arrays)."""
    view = ftype.view
    assert view is not None
    if isinstance(value, Composed):
        return _composed_text(value, ftype)
    if isinstance(value, list):
        one = FetchType(ftype.base, ftype.bitfield, None, ftype.explicit, view)
        return "{" + ",".join(view_text(v, one) for v in value) + "}"
    kind = view.kind
    if kind == "text":
        return str(value)
    if kind == "optimized_out":
        return "<optimized out>"
    if kind == "unsupported":
        return f"<unsupported: {view.note}>"
    if kind == "elided":
        return "{...}"
    if kind == "string" or isinstance(value, str) or value is None:
        return "(fault)" if value is None else f'"{value}"'
    if kind == "float":
        text = format(_float(value, ftype), _FLOAT[ftype.size][2])
        return text
    if kind == "pointer":
        return f"0x{value & ((1 << 64) - 1):x}"
    n = _number(value, ftype, view)
    if kind == "bool":
        return "true" if n == 1 else "false" if n == 0 else str(n)
    if kind == "char" and ftype.size == 4:  # a Rust char, as gdb prints it
        c = chr(n) if 0 <= n < 0x110000 and not 0xD800 <= n < 0xE000 else ""
        return f"{n} '{c}'" if c.isprintable() and c else f"{n} '\\u{{{n:x}}}'"
    if kind == "char":
        c = chr(n & 0xFF)
        return f"{n} '{c}'" if 0x20 <= ord(c) < 0x7F else f"{n} '\\{n & 0xFF:03o}'"
    if kind == "enum":
        return next((name for v, name in view.enumerators if v == n), str(n))
    return str(n)


def view_json(value: Shown, ftype: FetchType) -> object:
    """One value as JSON: enums by name, bools, floats as numbers, pointers
    and chars as numbers, values not there as null."""
    view = ftype.view
    assert view is not None
    if isinstance(value, Composed):
        return _composed_json(value, ftype)
    if isinstance(value, list):
        one = FetchType(ftype.base, ftype.bitfield, None, ftype.explicit, view)
        return [view_json(v, one) for v in value]
    kind = view.kind
    if kind in ("optimized_out", "unsupported", "elided") or value is None:
        return None
    if kind == "string" or isinstance(value, str):
        return value
    if kind == "float":
        return _float(value, ftype)
    if kind == "pointer":
        return value & ((1 << 64) - 1)
    n = _number(value, ftype, view)
    if kind == "bool":
        return bool(n) if n in (0, 1) else n
    if kind == "enum":
        return next((name for v, name in view.enumerators if v == n), n)
    return n
