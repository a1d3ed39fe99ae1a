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
import mmap
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from uprobes.errors import SpecError
from uprobes.lang.ast import FetchType


class Event(Protocol):
    """What a condition reads of a hit: the task (`TASK_FIELDS`) and the
    fetchargs by name (an engine's `Event` is one)."""

    @property
    def pid(self) -> int: ...
    @property
    def tid(self) -> int: ...
    @property
    def comm(self) -> str: ...
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
    """`operands` joined by `op` ("&&" or "||"), two or more of them, none
    itself a Logic of the same `op`: a chain of any length is one node, so
    it costs no depth to walk (make one with `join`)."""

    op: str
    operands: tuple[Node, ...]


Node = Compare | Not | Logic

# How deep parentheses may nest. Every walk of a condition recurses once
# per level, so this bounds the stack; a chain of && or || costs no level.
MAX_DEPTH = 100


def join(op: str, nodes: Sequence[Node]) -> Node:
    """`nodes` joined by `op`, flattened: a Logic of the same `op` among
    them gives its operands in its place."""
    flat: list[Node] = []
    for n in nodes:
        flat.extend(n.operands if isinstance(n, Logic) and n.op == op else (n,))
    return flat[0] if len(flat) == 1 else Logic(op, tuple(flat))


def negate(node: Node) -> Node:
    """`!node`, with a double negation cancelled."""
    return node.operand if isinstance(node, Not) else Not(node)


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
        it (`why_not_kernel` says why). Then it is tested per hit in Python."""
        return self._kernel()[0]

    def why_not_kernel(self) -> str:
        """Why `kernel_filter()` is None, in a few words ("" when it is not)."""
        return self._kernel()[1]

    def _kernel(self) -> tuple[str | None, str]:
        if "pid" in self.fields:
            return None, "the kernel's event filter has no field for the process id (pid)"
        try:
            text = _render(self.root)
        except ValueError:
            return None, ("a string holds both quote characters "
                          "(the kernel's strings have no escapes)")
        # Both ways in (the tracefs `filter` file and PERF_EVENT_IOC_SET_FILTER)
        # take less than a page, the ending newline or NUL counted.
        size = len(os.fsencode(text))  # a name from the command line as its bytes
        if size + 1 >= mmap.PAGESIZE:
            return None, (f"the filter is {size:,} bytes in the kernel's spelling "
                          f"and the kernel takes at most {mmap.PAGESIZE - 2:,}")
        return text, ""


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
    absorbing = node.op == "||"  # True absorbs an ||, False an &&
    rest: list[Node] = []
    for operand in node.operands:
        bound = bind(operand, field, value)
        if bound is absorbing:
            return absorbing
        if not isinstance(bound, bool):
            rest.append(bound)
    return join(node.op, rest) if rest else not absorbing


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
    kept = [widened(operand) for operand in node.operands]
    sayable = [k for k in kept if k is not None]
    if node.op == "||" and len(sayable) < len(kept):
        return None
    return join(node.op, sayable) if sayable else None


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

    def expr(depth: int) -> Node:
        nodes = [conj(depth)]
        while (tok := peek()) is not None and tok[1] == "||":
            take()
            nodes.append(conj(depth))
        return join("||", nodes)

    def conj(depth: int) -> Node:
        nodes = [unary(depth)]
        while (tok := peek()) is not None and tok[1] == "&&":
            take()
            nodes.append(unary(depth))
        return join("&&", nodes)

    def unary(depth: int) -> Node:
        kind, value, at = take()
        if kind == "op" and value == "!":
            # A run of `!` is read here, not by recursion: its length costs no depth.
            odd = True
            while (tok := peek()) is not None and tok[1] == "!":
                take()
                odd = not odd
            node = unary(depth)
            return negate(node) if odd else node
        if kind == "op" and value == "(":
            if depth == MAX_DEPTH:
                # No caret line: the text of a condition this deep is long.
                raise SpecError(f"the condition nests parentheses deeper than {MAX_DEPTH} "
                                f"levels (at character {at + 1}); join with && and || instead")
            node = expr(depth + 1)
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
    root = expr(0)
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
        for operand in node.operands:
            _walk(operand, visit)


def _getter(field: str) -> Callable[[Event], object]:
    if field in TASK_FIELDS:
        return lambda ev: getattr(ev, field)
    return lambda ev: ev.args.get(field)


def _compile(node: Node) -> Callable[[Event], bool]:
    if isinstance(node, Not):
        inner = _compile(node.operand)
        return lambda ev: not inner(ev)
    if isinstance(node, Logic):
        tests = tuple(_compile(operand) for operand in node.operands)
        if node.op == "&&":
            return lambda ev: all(t(ev) for t in tests)
        return lambda ev: any(t(ev) for t in tests)
    get, op, want = _getter(node.field), node.op, node.value
    if isinstance(want, str):
        if op == "~":
            pattern = re.compile(fnmatch.translate(want), re.S)
            return lambda ev: isinstance(v := get(ev), str) and pattern.match(v) is not None
        if op == "==":
            return lambda ev: get(ev) == want
        return lambda ev: get(ev) != want
    compares: dict[str, Callable[[int], bool]] = {
        "==": lambda v: v == want, "!=": lambda v: v != want, "<": lambda v: v < want,
        "<=": lambda v: v <= want, ">": lambda v: v > want, ">=": lambda v: v >= want,
        "&": lambda v: bool(v & want),
    }
    test = compares[op]
    return lambda ev: isinstance(v := get(ev), int) and test(v)


def _render(node: Node) -> str:
    if isinstance(node, Not):
        return f"!({_render(node.operand)})"
    if isinstance(node, Logic):
        return f" {node.op} ".join(f"({_render(operand)})" for operand in node.operands)
    name = _KERNEL_NAMES.get(node.field, node.field)
    if isinstance(node.value, str):
        # A kernel string runs from its quote to the next one, escapes and all.
        quote = '"' if '"' not in node.value else "'"
        if quote in node.value:
            raise ValueError("no kernel spelling")
        return f"{name} {node.op} {quote}{node.value}{quote}"
    return f"{name} {node.op} {node.value}"
