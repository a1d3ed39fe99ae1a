"""`--if` conditions: parsed, checked against a probe's fields, tested per
event in Python, and rendered as filters the live kernel accepts."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Compiler

from uprobes.commands.resolve import parse_specs
from uprobes.errors import KernelError, SpecError
from uprobes.lang.ast import FetchType
from uprobes.lang.condition import MAX_DEPTH, Condition, bind, parse_condition, widened
from uprobes.resolve.resolver import Resolver
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
    ("a == 1 || b == 2 && c == 3",
     SimpleNamespace(pid=0, tid=0, comm="", args={"a": 1, "b": 0, "c": 0}), True),
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


def chain(n: int, op: str = "&&") -> str:
    """`size != 1000000 && size != 1000001 ...`: n terms, each true of small sizes."""
    return f" {op} ".join(f"size != {1000000 + i}" for i in range(n))


def test_long_chains_and_runs_of_not_cost_no_depth() -> None:
    """A chain of 10,000 terms and a run of 1,001 `!`s parse, check, bind,
    widen and test per event (a walk per term would exhaust Python's stack)."""
    cond = parse_condition(chain(10_000) + " && pid == 3")
    cond.check_fields("uprobes/f", TYPES)
    assert cond.fields == {"size", "pid"}
    keep = cond.predicate()
    assert keep(SimpleNamespace(pid=3, tid=1, comm="c", args={"size": 5}))
    assert not keep(SimpleNamespace(pid=3, tid=1, comm="c", args={"size": 1009999}))
    assert not keep(SimpleNamespace(pid=4, tid=1, comm="c", args={"size": 5}))
    rest = bind(cond.root, "pid", 3)
    assert not isinstance(rest, bool)
    assert Condition("", rest).predicate()(ev(size=5))
    assert bind(cond.root, "pid", 4) is False
    assert widened(cond.root) == parse_condition(chain(10_000)).root
    either = parse_condition(chain(10_000, "||")).predicate()
    assert either(ev(size=1000000)) and not either(ev(size=None))
    for n, expected in ((1000, True), (1001, False)):
        run = parse_condition("!" * n + "size == 1")
        assert run.predicate()(ev(size=1)) is expected
        assert run.kernel_filter() == ("size == 1" if expected else "!(size == 1)")


def test_nesting_deeper_than_the_limit_is_one_line_and_the_limit_works() -> None:
    """Parentheses nest MAX_DEPTH deep; deeper is a SpecError of one line
    (no caret under a text of thousands of characters), not a RecursionError."""
    for text in ("(" * 1000 + "size == 1" + ")" * 1000,
                 "!(" * 1000 + "size == 1" + ")" * 1000,
                 "(size == 1 && " * 1000 + "size == 1" + ")" * 1000):
        with pytest.raises(SpecError) as e:
            parse_condition(text)
        assert len(e.value.lines()) == 1 and f"deeper than {MAX_DEPTH}" in e.value.lines()[0]
    deepest = parse_condition("!(size > 1 && " * MAX_DEPTH + "size < 9" + ")" * MAX_DEPTH)
    holds = deepest.predicate()
    # !(A && !(A && ... !(A && B))): with A true the negations alternate.
    assert holds(ev(size=5)) is (MAX_DEPTH % 2 == 0)
    assert holds(ev(size=0)) is True
    assert deepest.kernel_filter() is not None


def test_the_kernel_takes_the_longest_filter_we_hand_it(tracefs: Path, compile_c: Compiler,
                                                        group: str) -> None:
    """The longest filter text we render is one the kernel accepts; one term
    more is left to Python with the reason (the kernel takes under a page)."""
    n = 1
    while parse_condition(chain(n + 1)).kernel_filter() is not None:
        n += 1
    longest = parse_condition(chain(n)).kernel_filter()
    assert longest is not None and len(longest) > 3000
    assert "the kernel takes at most" in parse_condition(chain(n + 1)).why_not_kernel()
    exe = compile_c("target.c")
    offset = Resolver().resolve_all(parse_specs([f"{exe}:add"]))[0].file_offset
    tfs = Tracefs(tracefs)
    with ProbeGroup(tfs, group) as g:
        g.add(f"p:{group}/f {exe}:{offset:#x} size=%di:u64")
        tfs.set_filter(group, "f", longest)
        tfs.set_filter(group, "f", "0")


UPROBES = [sys.executable, "-m", "uprobes"]


@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_deep_and_long_conditions_on_the_command_line(engine: str, tracefs: Path,
                                                      compile_c: Compiler) -> None:
    """Too deep: one line, exit 2. 10,000 terms: each engine applies them
    (the kernel engine here, per hit, with a note why not in the kernel)."""
    exe = compile_c("target.c")
    spec = f"{exe}:add size=%di"
    deep = subprocess.run([*UPROBES, "trace", "-e", engine, "--if",
                           "(" * 1000 + "size == 1" + ")" * 1000, spec, "--", str(exe), "5"],
                          capture_output=True, text=True, timeout=120)
    assert deep.returncode == 2, deep.stderr[-2000:]
    assert deep.stderr.count("\n") == 1 and deep.stderr.startswith("uprobes: error: ")
    # add(i, 100) for i < 5: size == 3 once. (One argument holds at most
    # 128 KiB, hence the short terms.)
    long = " && ".join(["size < 9"] * 10_000) + " && size == 3"
    up = subprocess.run([*UPROBES, "trace", "-e", engine, "--if", long, spec, "--", str(exe), "5"],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr[-2000:]
    hits = [line for line in up.stdout.splitlines() if " add: " in line]
    assert len(hits) == 1 and hits[0].endswith("size=0x3"), up.stdout
    assert len(up.stderr) < 2000, up.stderr[:2000]
