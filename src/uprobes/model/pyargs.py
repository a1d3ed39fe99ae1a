"""A `py:` entry's arguments: the raw fields both engines fetch, and the
text they read as.

At a Python function's first instruction its arguments are the first
slots of the frame's `localsplus` (positional, then keyword-only, then
`*args`, then `**kwargs`; `co_argcount`, `co_kwonlyargcount` and two bits
of `co_flags` say how many; they are shown in the signature's order,
`*args` before the keyword-only ones), their names the first items of the code's
`co_localsplusnames`. For each of the first `SLOTS` slots an entry probe
fetches the object's pointer, its type's name, and the words an int or a
str keeps its value in; which of them mean something is decided here, in
user space, from the type's address (int, bool, str and None's types:
their link addresses and where PyLong_Type is in the process, fetched
with the rest), so the kernel and the ptrace engine
fetch the same fields and give the same text. Every read is of a fixed
size (arrays, never `:string`): a slot past the arguments holds whatever
the value stack held, and a string read through it could be a page long.

    args=(self=<Job>, k=3, name="x", flag=True, rest=<list>)
"""

from __future__ import annotations

from collections.abc import Mapping

from uprobes.model.event import ArgValue

SLOTS = 8
"""Arguments shown; more are counted (`+3 more`)."""
NAME_BYTES = 24
TYPE_BYTES = 32
TEXT_BYTES = 32
"""Bytes of a name, a type's name and a str's text fetched (a longer name
or text: cut, `...`), as 8-byte words (`u64[N]`): the kernel reads an array element by
element, and 1-byte elements made a call with arguments cost ~200 us."""
CO_VARARGS = 0x4
CO_VARKEYWORDS = 0x8
DIGIT_BITS = 30
"""CPython's int digits: 30 bits in a 32-bit word (PYLONG_BITS_IN_DIGIT)."""

ARGS_FIELD = "args"
"""The field the raw ones are read into (render/pyargs.py)."""
RAISED_FIELD = "__py_raised"
"""1 in a `py:` return left by an exception (0: returned), whose `type`
then is the exception's type's name, shown as `(raised NAME)`."""
RAISED = "(raised)"
TYPE_FIELD = "type"
ARGCOUNT = "__py_argc"
KWONLY = "__py_kwonly"
FLAGS = "__py_flags"
TYPES_ANCHOR = "__py_tanchor"
"""PyLong_Type's address in the process (PyBool_Type's `tp_base`)."""
BUILTIN_TYPES = {"__py_tint": "PyLong_Type", "__py_tbool": "PyBool_Type",
                 "__py_tstr": "PyUnicode_Type", "__py_tnone": "_PyNone_Type"}
"""The fields holding each builtin type's link address, and its symbol."""
WRAPPER_TYPE = ("__py_twrap", "_PyAsyncGenWrappedValue_Type")
"""What an async generator's `yield` gives up (the value wrapped, which its
`asend()` unwraps): the field holding its type's link address, and its symbol."""
YIELD_TPTR = "__py_ytype"
WRAPPED_FIELD = "__py_wrapped"
"""At a yield, the address of the value's type, and (if that is the
wrapper) the name of the wrapped value's type."""


RETURNED = "ret"
"""The slot name of a `py:` return's value (`slot_fields(RETURNED)`), which
a Session's return probes fetch (`uprobes.Session(py_args=True)`)."""
VALUE_ROLES = ("ptr", "tptr", "size", "word", "str", "text", "type")
"""The raw fields of one object's value; an argument adds its name's."""


def slot_fields(i: int | str) -> dict[str, str]:
    """The raw fields of argument slot `i` (or of the value returned,
    `RETURNED`), by role."""
    return {role: f"__py_{role}{i}" for role in (*VALUE_ROLES, "name", "nlen")}


RAW_FIELDS = frozenset({ARGCOUNT, KWONLY, FLAGS, RAISED_FIELD, TYPES_ANCHOR, *BUILTIN_TYPES,
                        WRAPPER_TYPE[0], YIELD_TPTR, WRAPPED_FIELD}
                       | {f for i in (*range(SLOTS), RETURNED)
                          for f in slot_fields(i).values()})


class Shown(str):
    """An argument or value given as the text `trace` shows for it, not as
    the value itself: an object by its type's name (`<list>`, `<int>` for
    one bigger than a machine word, `<str>` for a str not stored as compact
    ASCII), a str cut at its first 32 characters (`"abc..."...`, quoted as
    `trace` quotes it). A str value is a plain `str`, never a `Shown`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Shown({str.__repr__(self)})"


PyValue = int | bool | str | None
"""An argument's value in a Session's event: an int, bool, str or None by
value, anything else a `Shown` (a str subclass)."""


class PyArguments(dict[str, PyValue]):
    """A `py:` call's arguments by name, in order (the first `SLOTS`);
    `more`: how many more it was given (not read). `str()` of it is the
    text `trace` shows, `(n=1, name="x", +3 more)`."""

    more: int = 0
    pairs: tuple[tuple[str, PyValue], ...] = ()
    """(name, value) of each, in order: two names shown alike (cut at the
    same 24 characters, or not ASCII) are one key of the dict, its last."""

    def __str__(self) -> str:
        parts = [f"{name}={shown_text(value)}" for name, value in self.pairs]
        if self.more:
            parts.append(f"+{self.more} more")
        return "(" + ", ".join(parts) + ")"


def shown_text(value: PyValue) -> str:
    """A value as `trace` shows it."""
    if isinstance(value, Shown):
        return str(value)
    if isinstance(value, str):
        return _quoted(value)
    return str(value)


def has_args(names: list[str]) -> bool:
    """Whether a probe with these fields fetches a `py:` entry's arguments."""
    return ARGCOUNT in names


def is_shown_otherwise(names: list[str]) -> bool:
    """Whether these fields are a `py:` probe's raw ones (its arguments, or
    a return's mark of an exception), shown as text instead."""
    return ARGCOUNT in names or RAISED_FIELD in names or YIELD_TPTR in names \
        or slot_fields(RETURNED)["ptr"] in names


def yielded_type(values: Mapping[str, ArgValue]) -> str | None:
    """An async generator's yield: the name of the type of the value its
    wrapper holds (the wrapper told by its type's address), else None."""
    anchor, tint = _int(values.get(TYPES_ANCHOR)), _int(values.get("__py_tint"))
    wrapper = _int(values.get(WRAPPER_TYPE[0]))
    if not (anchor and tint and wrapper) \
            or _int(values.get(YIELD_TPTR)) != wrapper + anchor - tint:
        return None
    return _text(values.get(WRAPPED_FIELD))


def raised_text(exc_type: ArgValue) -> str:
    """A return by an exception's `type`, from the name of the exception's
    type fetched (`(raised)` alone if it could not be read)."""
    return f"(raised {exc_type})" if isinstance(exc_type, str) and exc_type else RAISED


def _int(value: ArgValue) -> int:
    return value if isinstance(value, int) else 0


def _bytes(value: ArgValue) -> bytes:
    """The bytes of words fetched as `u64[N]`."""
    if not isinstance(value, list):
        return b""
    return b"".join((v & (1 << 64) - 1).to_bytes(8, "little")
                    for v in value if isinstance(v, int))


def _text(value: ArgValue) -> str | None:
    """Words fetched as `u64[N]`, as bytes up to their first NUL, if all are ASCII."""
    if not isinstance(value, list):
        return None
    text = _bytes(value).split(b"\0", 1)[0]
    return text.decode() if text.isascii() else None


def _quoted(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}")
    return '"' + "".join(out) + '"'


def _builtin(values: Mapping[str, ArgValue], f: dict[str, str], type_name: str) -> str:
    """Which builtin the argument's type is ("int", "bool", "str",
    "NoneType"), by its address, or "" for any other type. Fields fetched
    without the types' addresses (a recording made before them) go by the
    type's name."""
    anchor = _int(values.get(TYPES_ANCHOR))
    if not anchor or not _int(values.get("__py_tint")):
        return type_name if type_name in ("int", "bool", "str", "NoneType") else ""
    bias = anchor - _int(values.get("__py_tint"))
    at = _int(values.get(f["tptr"]))
    for field, name in (("__py_tint", "int"), ("__py_tbool", "bool"), ("__py_tstr", "str"),
                        ("__py_tnone", "NoneType")):
        if at == _int(values.get(field)) + bias:
            return name
    return ""


def value_of(values: Mapping[str, ArgValue], f: dict[str, str]) -> PyValue:
    """One object's value (the raw fields `f` of its slot): a small int, a
    compact ASCII str of at most 32 characters, None, a bool by value;
    anything else `Shown` by its type's name (a longer str by its start)."""
    if not _int(values.get(f["ptr"])):
        return Shown("<unbound>")
    type_name = _text(values.get(f["type"]))
    if not type_name:
        return Shown("<?>")
    size, word = _int(values.get(f["size"])), _int(values.get(f["word"]))
    kind = _builtin(values, f, type_name)
    if kind == "NoneType":
        return None
    if kind in ("int", "bool"):
        if size < 0:
            size = -size
            sign = -1
        else:
            sign = 1
        if size > 2:
            return Shown(f"<{type_name}>")  # more digits than a machine word holds
        mask = (1 << DIGIT_BITS) - 1
        digits = [(word >> (32 * k)) & mask for k in range(size)]
        n = sign * sum(d << (DIGIT_BITS * k) for k, d in enumerate(digits))
        return bool(n) if kind == "bool" else n
    if kind == "str" and _int(values.get(f["str"])) == 3:  # compact and ASCII
        text = values.get(f["text"])
        if isinstance(text, list):
            shown = _bytes(text)[:min(size, TEXT_BYTES)]
            if shown.isascii() and size > TEXT_BYTES:
                return Shown(_quoted(shown.decode()) + "...")
            if shown.isascii():
                return shown.decode()
    return Shown(f"<{type_name}>")


def _name(values: Mapping[str, ArgValue], f: dict[str, str], i: int) -> str:
    """Argument `i`'s name: its first NAME_BYTES characters (`...` after a
    longer one); `<non-ASCII>` for one that is not ASCII (read as compact
    ASCII only: its bytes are elsewhere in the object); `argI` where the
    fields are missing."""
    length = _int(values.get(f["nlen"]))
    text = _text(values.get(f["name"]))
    if f["nlen"] not in values:  # (a recording made before the names' lengths)
        return text or f"arg{i}"
    if text is None or len(text) != min(length, NAME_BYTES) or not length:
        return "<non-ASCII>"
    return text + ("..." if length > NAME_BYTES else "")


def arguments(values: Mapping[str, ArgValue]) -> PyArguments:
    """A `py:` entry's arguments from its raw fields."""
    flags = _int(values.get(FLAGS))
    positional, kwonly = _int(values.get(ARGCOUNT)), _int(values.get(KWONLY))
    varargs = [positional + kwonly] if flags & CO_VARARGS else []
    count = positional + kwonly + len(varargs) + bool(flags & CO_VARKEYWORDS)
    # (the slots are positional, keyword-only, *args, **kwargs; shown in
    # the signature's order: positional, *args, keyword-only, **kwargs)
    order = [*range(positional), *varargs, *range(positional, positional + kwonly),
             *range(positional + kwonly + len(varargs), count)]
    pairs = tuple((_name(values, slot_fields(i), i), value_of(values, slot_fields(i)))
                  for i in order if i < SLOTS)
    out = PyArguments(pairs)
    out.pairs, out.more = pairs, max(count - SLOTS, 0)
    return out


def args_text(values: Mapping[str, ArgValue]) -> str:
    """`(name=value, ...)` of a `py:` entry's raw fields."""
    return str(arguments(values))


def returned(values: Mapping[str, ArgValue]) -> PyValue:
    """A `py:` return's value (None too where it was left by an exception,
    or its value was not fetched)."""
    f = slot_fields(RETURNED)
    if _int(values.get(RAISED_FIELD)) or f["ptr"] not in values:
        return None
    return value_of(values, f)


def raised_type(values: Mapping[str, ArgValue]) -> str | None:
    """The name of the exception's type a `py:` return was left by (`""`:
    it could not be read), or None: it returned."""
    if not _int(values.get(RAISED_FIELD)):
        return None
    exc_type = values.get(TYPE_FIELD)
    return exc_type if isinstance(exc_type, str) else ""
