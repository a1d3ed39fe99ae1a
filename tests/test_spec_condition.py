"""`--if` conditions: parsed, checked against a probe's fields, tested per
event in Python, and rendered as filters the live kernel accepts."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import Compiler
from uprobes.commands.resolve import parse_specs
from uprobes.errors import KernelError, SpecError
from uprobes.resolve.resolver import Resolver
from uprobes.spec.ast import FetchType
from uprobes.spec.condition import Condition, parse_condition, widened
from uprobes.sys.tracefs import ProbeGroup, Tracefs

TYPES = {"size": FetchType("u64"), "delta": FetchType("s32"), "name": FetchType("string"),
         "flags": FetchType("x32"), "vec": FetchType("u8", array=4)}


def ev(**args: object) -> SimpleNamespace:
    return SimpleNamespace(pid=100, tid=101, comm="worker", args=args)


@pytest.mark.parametrize("text,event,expected", [
    ("size > 4096", ev(size=8192), True),
    ("size > 4096", ev(size=4096), False),
    ("size >= 4096 && delta < 0", ev(size=4096, delta=-1), True),
    ("size >= 4096 && delta < 0", ev(size=4096, delta=0), False),
    ("size == 1 || name == \"x\"", ev(size=2, name="x"), True),
    ("!(size == 1)", ev(size=1), False),
    ("flags & 0x4", ev(flags=6), True),
    ("flags & 0x4", ev(flags=3), False),
    ("name ~ \"lib*.so*\"", ev(name="libc.so.6"), True),
    ("name ~ \"lib?.so\"", ev(name="libcc.so"), False),
    ("name != 'a\\'b'", ev(name="a'b"), False),
    ("comm == \"worker\" && tid == 101 && pid == 100", ev(), True),
    ("name == \"x\"", ev(name=None), False),  # a faulted string matches nothing
    ("delta == -5", ev(delta=-5), True),
    ("a == 1 || b == 2 && c == 3", SimpleNamespace(pid=0, tid=0, comm="", args={"a": 1, "b": 0, "c": 0}), True),
])
def test_predicate(text: str, event: SimpleNamespace, expected: bool) -> None:
    assert parse_condition(text).predicate()(event) is expected


@pytest.mark.parametrize("text,message,pos", [
    ("", "empty condition", 0),
    ("size >", "ends too early", 6),
    ("size = 3", "not part of a condition", 5),
    ("size 3", "expected one of", 5),
    ("size > 3 &&", "ends too early", 11),
    ("(size > 3", "ends too early", 9),
    ("size > 3 size", "unexpected text", 9),
    ("size > $x", "not part of a condition", 7),
    ("> 3", "expected a field name", 0),
    ("size > abc", "expected a number or a quoted string", 7),
])
def test_syntax_errors_point_at_the_problem(text: str, message: str, pos: int) -> None:
    with pytest.raises(SpecError) as e:
        parse_condition(text)
    assert message in e.value.message and e.value.pos == pos


@pytest.mark.parametrize("text,message", [
    ("nope == 1", "has no field 'nope'"),
    ("name > 3", "is a string"),
    ("size ~ \"x\"", "is a number"),
    ("size == \"x\"", "is a number"),
    ("comm == 3", "is a string"),
    ("vec == 1", "is an array"),
])
def test_fields_are_checked_against_the_probe(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_condition(text).check_fields("uprobes/f", TYPES)


def test_what_the_kernel_cannot_say_is_left_to_python() -> None:
    assert parse_condition("pid == 3 && size > 1").kernel_filter() is None
    assert parse_condition("""name == 'both " and \\' quotes'""").kernel_filter() is None
    assert parse_condition("tid == 3 && comm ~ \"py*\"").kernel_filter() == \
        '(common_pid == 3) && (__uprobes_comm ~ "py*")'


@pytest.mark.parametrize("text,kernel", [
    ("pid == 3 && size > 1", "size > 1"),
    ("size > 1 && (pid == 3 || tid == 4)", "size > 1"),
    ("pid == 3 || size > 1", None),
    ("!(pid == 3 && size > 1)", None),
    ("!(size > 1) && pid != 3", "!(size > 1)"),
    ("""name == 'both " and \\' quotes' && tid == 7""", "common_pid == 7"),
    ("(pid == 1 && size < 5) || (tid == 2 && pid == 9)", "(size < 5) || (common_pid == 2)"),
])
def test_widened_keeps_what_the_kernel_can_say_and_holds_wherever_the_condition_does(
        text: str, kernel: str | None) -> None:
    cond = parse_condition(text)
    root = widened(cond.root)
    assert (None if root is None else Condition("", root).kernel_filter()) == kernel
    if root is None:
        return
    holds, wide = cond.predicate(), Condition("", root).predicate()
    for pid, tid, size, name in itertools.product((1, 3, 9), (2, 4, 7), (0, 1, 2, 5, 9),
                                                  ("x", 'both " and \' quotes')):
        e = SimpleNamespace(pid=pid, tid=tid, comm="c", args={"size": size, "name": name})
        assert wide(e) or not holds(e), e


@pytest.mark.parametrize("text", [
    "a > 4096", "a >= 1 && b < -3", "!(a == 1) || b != 2", "a & 0x10",
    "s == \"hello\"", "s ~ \"he*o\"", "s != 'say \"hi\"'", "tid == 1 && comm == \"sh\"",
])
def test_the_kernel_accepts_the_filters_we_render(text: str, tracefs: Path,
                                                  compile_c: Compiler, group: str) -> None:
    exe = compile_c("target.c")
    offset = Resolver().resolve_all(parse_specs([f"{exe}:add"]))[0].file_offset
    tfs = Tracefs(tracefs)
    with ProbeGroup(tfs, group) as g:
        g.add(f"p:{group}/f {exe}:{offset:#x} a=%di:s64 b=%si:s32 s=+0(%di):string "
              "__uprobes_comm=$comm")
        rendered = parse_condition(text).kernel_filter()
        assert rendered is not None
        try:
            tfs.set_filter(group, "f", rendered)
        except KernelError as e:  # pragma: no cover - the failure message says why
            pytest.fail(f"kernel refused {rendered!r}: {e}")
        tfs.set_filter(group, "f", "0")
