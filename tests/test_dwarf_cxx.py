"""C++ arguments by name from DWARF, named by demangled names: the instances
of a function template and overloads told apart, a template's name alone
listing its instances and globbed, std::string and std::string_view read as
their text (all their size() bytes, a NUL among them); on both
engines, against the values tests/fixtures/dwarf_args.cc passes and against
gdb stopped at the same address of the same build, at -O0 and -O2."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, need
from gdb_support import gdb_batch

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.resolve.resolver import Resolver

GDB_PIE_BASE = 0x555555554000
"""Where gdb loads a PIE program (it runs it with address randomization off)."""
STRING = "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >"
GREET = f"greet({STRING} const&, {STRING}, int)"

CASES: dict[str, dict[str, Any]] = {
    "larger<long>": {"p.first": 3, "p.second": 8, "bias": 1},
    "larger<double>": {"p.first": 2.5, "p.second": -1.0, "bias": 2},
    "area(long)": {"side": 6},
    "area(double, double)": {"w": 1.5, "h": 4.0},
    "greet": {"who": "wo\0rld", "title": "Doctor\0of Philosophy", "times": 2},
    "viewed": {"v": "view\0x"},
}
"""Each function as a probe names it, and the value of each expression there."""
LABELS = {"larger<long>": "larger<long>(Pair<long> const&, int)",
          "larger<double>": "larger<double>(Pair<double> const&, int)",
          "area(long)": "area(long)", "area(double, double)": "area(double, double)",
          "greet": GREET, "viewed": "viewed(std::basic_string_view<char, std::char_traits<char> >)"}
IN_SSE = ("area(double, double)",)
"""At -O2 its doubles are in xmm registers, which the kernel's fetchargs cannot read."""


@pytest.fixture(scope="module", params=["-O0", "-O2"])
def build(request: pytest.FixtureRequest, compile_c: Compiler) -> tuple[Path, str]:
    need(shutil.which("g++") is not None, "g++")
    level = request.param
    return compile_c("dwarf_args.cc", level, name=f"dwarf_args_cc{level}"), level


def _probe(exe: Path, func: str) -> str:
    return f"{exe}:{func} " + " ".join(f"{_arg(e)}={e}" for e in CASES[func])


def _arg(expr: str) -> str:
    return expr.replace(".", "_")


def _trace(engine: str, exe: Path, funcs: list[str]) -> dict[str, dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["trace", "-e", engine, "--json", *[_probe(exe, f) for f in funcs],
                   "--", str(exe)], out=out, err=err)
    assert status == 0, err.getvalue()
    events = [json.loads(ln) for ln in out.getvalue().splitlines() if '"probe"' in ln]
    return {e["probe"].split("/", 1)[1]: e["args"] for e in events}


@pytest.mark.root
def test_instances_and_overloads_by_name(build: tuple[Path, str]) -> None:
    """Each template instance and overload is probed by its own name, its
    parameters read by their own types (a long, a double), a std::string
    (by reference, and by value) as its text."""
    exe, _ = build
    got = _trace("ptrace", exe, list(CASES))
    assert got == {LABELS[f]: {_arg(e): v for e, v in want.items()}
                   for f, want in CASES.items()}


@pytest.mark.kernel
def test_kernel_engine_values_equal_ptrace(build: tuple[Path, str], tracefs: Path) -> None:
    exe, level = build
    funcs = [f for f in CASES if level == "-O0" or f not in IN_SSE]
    kernel = _trace("kernel", exe, funcs)
    assert kernel == _trace("ptrace", exe, funcs)
    assert len(kernel) == len(funcs)


def test_a_template_alone_lists_its_instances_and_globs(compile_c: Compiler) -> None:
    exe = compile_c("dwarf_args.cc", "-O2", name="dwarf_args_cc-O2")
    err = io.StringIO()
    assert main(["resolve", f"{exe}:larger p.first"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1
    assert "it names 2 functions: larger<long>(Pair<long> const&, int) at 0x" in err.getvalue()
    assert ", larger<double>(Pair<double> const&, int) at 0x" in err.getvalue()
    out = io.StringIO()
    assert main(["trace", "-e", "ptrace", "--json", f"{exe}:larger* $params", "--", str(exe)],
                out=out) == 0
    events = [json.loads(ln) for ln in out.getvalue().splitlines() if '"probe"' in ln]
    assert {e["probe"]: e["args"] for e in events} == {
        "uprobes/larger<long>(Pair<long> const&, int)": {"p_first": 3, "p_second": 8,
                                                         "bias": 1},
        "uprobes/larger<double>(Pair<double> const&, int)": {"p_first": 2.5,
                                                             "p_second": -1.0, "bias": 2}}


# ------------------------------------------------------------ gdb as the oracle

def _gdb_normal(text: str) -> str:
    """gdb's print of a value as our trace text writes it: a reference as
    what it refers to."""
    return re.sub(r"^\([^)]*&\) @0x[0-9a-f]+: ", "", text)


@pytest.mark.root
def test_gdb_prints_the_same(build: tuple[Path, str]) -> None:
    """gdb stopped at each probe's address prints what we print (a
    std::string by libstdc++'s printer: its text, past a NUL to its size);
    at -O0 gdb's `break FUNC`
    is where the probe is, after the prologue (a one-line function's too)."""
    exe, level = build
    need(shutil.which("gdb") is not None, "gdb")
    addrs = []
    for func, exprs in CASES.items():
        (resolved,) = Resolver().resolve_all(parse_specs([_probe(exe, func)]))
        assert resolved.link_addr is not None
        addrs.append(GDB_PIE_BASE + resolved.link_addr)
        out = io.StringIO()
        assert main(["trace", "-e", "ptrace", _probe(exe, func), "--", str(exe)], out=out) == 0
        line = next(ln for ln in out.getvalue().splitlines() if f"{LABELS[func]}: " in ln)
        ours = dict(re.findall(r' (\w+)=("[^"]*"|\S+)', line.split(LABELS[func], 1)[1]))
        values = _gdb(exe, [f"break *{addrs[-1]:#x}", "run",
                            *[f"print {e}" for e in exprs]], r"^\$\d+ = (.*)$")
        assert len(values) == len(exprs)
        for expr, value in zip(exprs, values):
            assert ours[_arg(expr)] == _gdb_normal(value), (func, expr, value)
    if level == "-O0":
        at = _gdb(exe, ["set breakpoint pending off", *[f"break {f}" for f in CASES]],
                  r"^Breakpoint \d+ at (0x[0-9a-f]+)")
        assert [GDB_PIE_BASE + int(a, 16) for a in at] == addrs


def _gdb(exe: Path, cmds: list[str], pattern: str) -> list[str]:
    """What gdb running `cmds` on `exe` prints that `pattern` captures, line by line."""
    out = gdb_batch(exe, ["set pagination off", *cmds])
    found = re.findall(pattern, out, re.M)
    assert found, out
    return found
