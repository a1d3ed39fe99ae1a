"""Property tests: parse never raises anything but SpecError, never hangs, and
parse(render(spec)) == spec for generated valid specs."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from uprobes.errors import SpecError
from uprobes.lang import messages as msg
from uprobes.lang import parse, render
from uprobes.lang.ast import (
    Arg,
    Bitfield,
    Comm,
    Deref,
    FetchArg,
    FetchExpr,
    FetchType,
    FileOffset,
    FileTarget,
    Immediate,
    ImmString,
    Memory,
    ProbeKind,
    ProbeSpec,
    Register,
    RetVal,
    Spec,
    StackEntry,
    StackPointer,
    UsdtTarget,
    VdsoTarget,
)
from uprobes.lang.fetchargs import REGISTERS

ALPHABET = "pr:/%@$+-u()[]\\\"=.,#_ abcxdisp0123456789\t*?"
PIECES = ["p", "r", ":", "/bin/true", ":0x10", "%ax", "%di", "$stack", "$comm", "$retval", "$arg1",
          "+0(", ")", "@+0x10", "@0x10", ":u8", ":string", "[4]", ":b3@2/32", "=", "a", " ", "\\5",
          "\\\"x\"", "usdt:", ":vdso:", "%return", "(0x8)", "libc:malloc", "::", "+u8(", "-8(", "#"]


def _check(text: str) -> None:
    try:
        spec = parse(text)
    except SpecError as exc:
        assert not exc.message.startswith(msg.INTERNAL), exc.message
        assert isinstance(exc.pos, int) and exc.pos >= 0
        return
    assert isinstance(render(spec), str)


# no deadline: an example's time on a loaded machine says nothing about the parser
@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=80))
def test_random_text(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_random_unicode(text: str) -> None:
    _check(text)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=25))
def test_near_valid(pieces: list[str]) -> None:
    _check("".join(pieces))


# ---- generated valid specs
NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
PATH = st.from_regex(r"/[a-z0-9_./-]{1,20}", fullmatch=True).filter(lambda p: "::" not in p)
SYMBOL = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.@*?]{0,15}(::[A-Za-z_][A-Za-z0-9_]{0,8})?",
                       fullmatch=True)
U64 = st.integers(0, 2**64 - 1)
S64 = st.integers(-(2**63), 2**63 - 1)


def leaves(is_return: bool) -> st.SearchStrategy[FetchExpr]:
    options = [st.sampled_from(sorted(REGISTERS)).map(Register), U64.map(Memory),
               S64.map(FileOffset), st.integers(0, 2**32).map(StackEntry),
               st.just(StackPointer()), st.integers(1, 2048).map(Arg), S64.map(Immediate)]
    if is_return:
        options.append(st.just(RetVal()))
    return st.one_of(*options)


def exprs(is_return: bool) -> st.SearchStrategy[FetchExpr]:
    return st.recursive(leaves(is_return), lambda inner: st.builds(
        Deref, st.integers(-(2**31), 2**31), inner, st.booleans()), max_leaves=4)


@st.composite
def fetchargs(draw: st.DrawFn, is_return: bool) -> tuple[FetchExpr, FetchType]:
    kind = draw(st.sampled_from(["int", "comm", "imm", "str", "bits", "array"]))
    if kind == "comm":
        return Comm(), FetchType("string", explicit=draw(st.booleans()))
    if kind == "imm":
        text = draw(st.from_regex(r'[a-z0-9_]{0,10}', fullmatch=True))
        return ImmString(text), FetchType("string", explicit=draw(st.booleans()))
    expr = draw(exprs(is_return))
    if kind == "str":
        expr = Deref(0, expr, draw(st.booleans()))
        return expr, FetchType(draw(st.sampled_from(["string", "ustring"])))
    if kind == "bits":
        c = draw(st.sampled_from([8, 16, 32, 64]))
        w = draw(st.integers(1, c))
        return expr, FetchType("bitfield", Bitfield(w, draw(st.integers(0, c - w)), c))
    if kind == "array":
        return Deref(0, expr), FetchType(draw(st.sampled_from(["u8", "s16", "x32", "char"])),
                                         array=draw(st.integers(1, 64)))
    base = draw(st.sampled_from(["u8", "u16", "u32", "u64", "s8", "s32", "x8", "x64", "char"]))
    explicit = draw(st.booleans())
    return expr, FetchType(base if explicit else "x64", explicit=explicit)


@st.composite
def specs(draw: st.DrawFn) -> ProbeSpec:
    kind = draw(st.sampled_from(ProbeKind))
    target_kind = draw(st.sampled_from(["off", "sym", "usdt", "vdso"]))
    if target_kind == "usdt":
        kind = ProbeKind.ENTRY
        target: object = UsdtTarget(draw(PATH), draw(NAME), draw(NAME))
    elif target_kind == "vdso":
        target = draw(st.one_of(st.builds(VdsoTarget, offset=U64),
                                st.builds(VdsoTarget, symbol=SYMBOL, symbol_offset=U64)))
    elif target_kind == "off":
        target = FileTarget(draw(PATH), offset=draw(U64), ref_ctr_offset=draw(st.none() | U64))
    else:
        target = FileTarget(draw(PATH), symbol=draw(SYMBOL), symbol_offset=draw(U64),
                            ref_ctr_offset=draw(st.none() | U64))
    names = draw(st.lists(NAME, max_size=6, unique=True).filter(
        lambda ns: not any(n.startswith(("common_", "__probe")) for n in ns)))
    args = []
    for name in names:
        expr, ftype = draw(fetchargs(kind is ProbeKind.RETURN))
        args.append(FetchArg(name, expr, ftype))
    group = draw(st.none() | NAME)
    event = (draw(st.none() | NAME) if group is not None
             else draw(NAME) if draw(st.booleans()) else None)
    return ProbeSpec(kind, target, tuple(args), group, event)  # type: ignore[arg-type]


def _bare(spec: Spec) -> Spec:
    assert isinstance(spec, ProbeSpec)
    return dataclasses.replace(spec, text="", args=tuple(dataclasses.replace(a, text="")
                                                         for a in spec.args))


@settings(max_examples=800, deadline=None)
@given(specs())
def test_render_round_trip(spec: ProbeSpec) -> None:
    line = render(spec)
    try:
        parsed = parse(line)
    except SpecError as exc:
        # Only the kernel's own limits may refuse a generated spec.
        assert exc.message in (msg.ARG_TOO_LONG, msg.TOO_MANY_OPS), (line, exc.lines())
        return
    assert _bare(parsed) == _bare(spec), line
