"""Conditions on a hit: `--if 'size > 4096 && comm == "ls"'`.

The language is the kernel's event filter (kernel/trace/trace_events_filter.c):
comparisons `FIELD OP VALUE` joined by `&&`, `||`, `!` and parentheses.
Numbers take `== != < <= > >= &` (`&`: any of the bits set), strings
`== != ~` (`~`: a glob with `*`, `?` and `[...]`). Fields are the probe's
fetchargs by name, and `comm`, `pid` (the process) and `tid`.

A parsed `Condition` gives both a Python predicate on an `Event` (any
engine, per hit) and, where the kernel can test every field, the kernel's
filter text for the probe's event (`comm` is our hidden `__uprobes_comm`
field, `tid` the kernel's `common_pid`; `pid` has no kernel field).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from uprobes.errors import SpecError
from uprobes.registry import TaskLike
from uprobes.spec.ast import FetchType


class Event(TaskLike, Protocol):
    """What a condition reads of a hit (an engine's `Event` is one)."""

    @property
    def args(self) -> Mapping[str, object]: ...

NUM_OPS = ("==", "!=", "<=", ">=", "<", ">", "&")
STR_OPS = ("==", "!=", "~")
TASK_FIELDS = {"comm": "str", "pid": "int", "tid": "int"}
_KERNEL_NAMES = {"comm": "__uprobes_comm", "tid": "common_pid"}

_TOKEN = re.compile(r"""\s*(?:
    (?P<op>&&|\|\||==|!=|<=|>=|<|>|~|&|!|\(|\))
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<num>-?(?:0[xX][0-9a-fA-F]+|\d+))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
)""", re.X)


@dataclass(frozen=True)
class Compare:
    field: str
    op: str
    value: int | str


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class Logic:
    op: str  # "&&" or "||"
    left: Node
    right: Node


Node = Compare | Not | Logic


@dataclass(frozen=True)
class Condition:
    text: str
    root: Node

    @property
    def fields(self) -> set[str]:
        out: set[str] = set()
        _walk(self.root, lambda c: out.add(c.field))
        return out

    def check_fields(self, probe: str, types: Mapping[str, FetchType]) -> None:
        """Every field exists in `probe` with a kind its operators fit."""
        def check(c: Compare) -> None:
            kind = TASK_FIELDS.get(c.field)
            if kind is None:
                t = types.get(c.field)
                if t is None:
                    known = ", ".join([*types, *TASK_FIELDS])
                    raise SpecError(f"{probe} has no field {c.field!r} (it has: {known})",
                                    self.text, _find(self.text, c.field))
                if t.array is not None:
                    raise SpecError(f"{c.field} is an array: a condition cannot test it",
                                    self.text, _find(self.text, c.field))
                kind = "str" if t.is_string else "int"
            if kind == "str" and (c.op not in STR_OPS or not isinstance(c.value, str)):
                raise SpecError(f"{c.field} is a string: compare it with ==, != or ~ "
                                "and a quoted string", self.text, _find(self.text, c.field))
            if kind == "int" and (c.op not in NUM_OPS or not isinstance(c.value, int)):
                raise SpecError(f"{c.field} is a number: compare it with {' '.join(NUM_OPS)} "
                                "and a number", self.text, _find(self.text, c.field))
        _walk(self.root, check)

    def predicate(self) -> Callable[[Event], bool]:
        """The condition as a test of one event."""
        return _compile(self.root)

    def kernel_filter(self) -> str | None:
        """The kernel's filter text for it, or None when the kernel cannot say
        it: a field with no kernel counterpart (`pid`), or a string with both
        quote characters (the kernel's strings have no escapes). Then it is
        tested per hit in Python."""
        if "pid" in self.fields:
            return None
        try:
            return _render(self.root)
        except ValueError:
            return None


def bind(node: Node, field: str, value: int | None) -> Node | bool:
    """`node` with `field` known to equal `value`: what is left to test, or
    True/False when nothing is. `value` None stands for a number equal to
    none the condition names (any other process, for `pid`). Only `==` and
    `!=` can be bound this way; other operators on `field` raise ValueError.

    Why: the kernel's filter has no field for the process id, but a counter
    bound to a process knows it; each process gets the rest of the condition."""
    if isinstance(node, Compare):
        if node.field != field:
            return node
        if node.op not in ("==", "!="):
            raise ValueError(f"{field} {node.op}")
        equal = value is not None and value == node.value
        return equal if node.op == "==" else not equal
    if isinstance(node, Not):
        inner = bind(node.operand, field, value)
        return (not inner) if isinstance(inner, bool) else Not(inner)
    left, right = bind(node.left, field, value), bind(node.right, field, value)
    absorbing = node.op == "||"  # True absorbs an ||, False an &&
    if left is absorbing or right is absorbing:
        return absorbing
    if isinstance(left, bool):
        return right
    if isinstance(right, bool):
        return left
    return Logic(node.op, left, right)


def widened(node: Node) -> Node | None:
    """A condition the kernel can say that holds wherever `node` holds;
    None when that is every hit. A comparison it cannot say (`pid`, a
    string with both quote characters) is taken as true where that only
    widens: it drops out of an `&&`, takes an `||` or a `!` with it.

    Why: a filter run in Python on what arrives can still have its
    sayable part tested by the kernel first, which then writes no record
    for a hit the whole filter would reject."""
    if isinstance(node, Compare):
        return node if _sayable(node) else None
    if isinstance(node, Not):
        said: list[bool] = []
        _walk(node.operand, lambda c: said.append(_sayable(c)))
        return node if all(said) else None
    left, right = widened(node.left), widened(node.right)
    if node.op == "||":
        return None if left is None or right is None else Logic("||", left, right)
    if left is None or right is None:
        return left or right
    return Logic("&&", left, right)


def _sayable(c: Compare) -> bool:
    try:
        _render(c)
    except ValueError:
        return False
    return c.field != "pid"


def values_of(node: Node, field: str) -> list[int | str]:
    """The values `node` compares `field` with, in order, each once."""
    out: dict[int | str, None] = {}
    _walk(node, lambda c: out.setdefault(c.value, None) if c.field == field else None)
    return list(out)


def parse_condition(text: str) -> Condition:
    """Parse `text`; SpecError with a caret at the first thing that is wrong."""
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str, int] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str, int]:
        nonlocal pos
        tok = peek()
        if tok is None:
            raise SpecError("the condition ends too early", text, len(text))
        pos += 1
        return tok

    def expr() -> Node:
        node = conj()
        while (tok := peek()) is not None and tok[1] == "||":
            take()
            node = Logic("||", node, conj())
        return node

    def conj() -> Node:
        node = unary()
        while (tok := peek()) is not None and tok[1] == "&&":
            take()
            node = Logic("&&", node, unary())
        return node

    def unary() -> Node:
        kind, value, at = take()
        if kind == "op" and value == "!":
            return Not(unary())
        if kind == "op" and value == "(":
            node = expr()
            k, v, a = take()
            if v != ")":
                raise SpecError("expected ')'", text, a)
            return node
        if kind != "name":
            raise SpecError("expected a field name", text, at)
        k, op, a = take()
        if k != "op" or op not in NUM_OPS + STR_OPS:
            raise SpecError(f"expected one of {' '.join(NUM_OPS + ('~',))} after {value}",
                            text, a)
        k, lit, a = take()
        if k == "num":
            return Compare(value, op, int(lit, 0))
        if k == "str":
            return Compare(value, op, _unquote(lit))
        raise SpecError("expected a number or a quoted string", text, a)

    if not tokens:
        raise SpecError("empty condition", text, 0)
    root = expr()
    if pos != len(tokens):
        raise SpecError("unexpected text after the condition", text, tokens[pos][2])
    return Condition(text, root)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out = []
    at = 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        m = _TOKEN.match(text, at)
        if m is None or m.end() == at:
            skip = len(text[at:]) - len(text[at:].lstrip())
            raise SpecError("not part of a condition", text, at + skip)
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind), m.start(kind)))
        at = m.end()
    return out


def _unquote(lit: str) -> str:
    return re.sub(r"\\(.)", r"\1", lit[1:-1])


def _find(text: str, name: str) -> int:
    m = re.search(rf"\b{re.escape(name)}\b", text)
    return m.start() if m else 0


def _walk(node: Node, visit: Callable[[Compare], object]) -> None:
    if isinstance(node, Compare):
        visit(node)
    elif isinstance(node, Not):
        _walk(node.operand, visit)
    else:
        _walk(node.left, visit)
        _walk(node.right, visit)


def _getter(field: str) -> Callable[[Event], object]:
    if field in TASK_FIELDS:
        return lambda ev: getattr(ev, field)
    return lambda ev: ev.args.get(field)


def _compile(node: Node) -> Callable[[Event], bool]:
    if isinstance(node, Not):
        inner = _compile(node.operand)
        return lambda ev: not inner(ev)
    if isinstance(node, Logic):
        left, right = _compile(node.left), _compile(node.right)
        if node.op == "&&":
            return lambda ev: left(ev) and right(ev)
        return lambda ev: left(ev) or right(ev)
    get, op, want = _getter(node.field), node.op, node.value
    if isinstance(want, str):
        if op == "~":
            pattern = re.compile(fnmatch.translate(want), re.S)
            return lambda ev: isinstance(v := get(ev), str) and pattern.match(v) is not None
        if op == "==":
            return lambda ev: get(ev) == want
        return lambda ev: get(ev) != want
    tests: dict[str, Callable[[int], bool]] = {
        "==": lambda v: v == want, "!=": lambda v: v != want, "<": lambda v: v < want,
        "<=": lambda v: v <= want, ">": lambda v: v > want, ">=": lambda v: v >= want,
        "&": lambda v: bool(v & want),
    }
    test = tests[op]
    return lambda ev: isinstance(v := get(ev), int) and test(v)


def _render(node: Node) -> str:
    if isinstance(node, Not):
        return f"!({_render(node.operand)})"
    if isinstance(node, Logic):
        return f"({_render(node.left)}) {node.op} ({_render(node.right)})"
    name = _KERNEL_NAMES.get(node.field, node.field)
    if isinstance(node.value, str):
        # A kernel string runs from its quote to the next one, escapes and all.
        quote = '"' if '"' not in node.value else "'"
        if quote in node.value:
            raise ValueError("no kernel spelling")
        return f"{name} {node.op} {quote}{node.value}{quote}"
    return f"{name} {node.op} {node.value}"
