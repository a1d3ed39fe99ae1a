"""Rust values that one fetch does not hold (tests/fixtures/dwarf_values.rs,
rustc at -O and at opt-level 0): `&str` and `String` as their text (exactly
their length, escaped, at most 200 bytes), a slice and a `Vec` as lists,
enums with data by their active variant (a tagged `Shape`, `Option<i64>`,
and niche-optimized `Option<&T>`, `Option<Box<T>>` and `Option<String>`,
variants holding a struct or a string); on both engines,
and against gdb (with Rust's pretty-printers) stopped at the same address
of the same build."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import RustCompiler, need
from gdb_support import gdb_batch

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.resolve.resolver import Resolver

GDB_PIE_BASE = 0x555555554000
"""Where gdb loads a PIE program (it runs it with address randomization off)."""
LONG = "0123456789" * 30

PROBES = {
    "dwarf_values::texts": {"s": "s", "long": "long", "owned": "*owned"},
    "dwarf_values::lists": {"sl": "sl", "v": "*v", "fl": "fl"},
    "dwarf_values::shapes": {"a": "*a", "b": "*b", "c": "*c", "empty": "empty"},
    "dwarf_values::options": {"n": "*n", "none": "*none", "p": "p", "q": "q", "bx": "*bx"},
    "dwarf_values::nested": {"pt": "*pt", "nm": "*name", "os": "*owned", "gone": "*gone"},
    "dwarf_values::records": {"pts": "*pts", "nopts": "*nopts", "rc": "*rc", "arc": "*arc"},
    "dwarf_values::tuples": {"tups": "*tups", "pairs": "*pairs"},
}
"""Each function, and its arguments by name and expression (gdb's too)."""
TEXT = {
    "s": '"hello"', "owned": '"tab\\there \\"q\\" \u00e9\\000end"', "empty": '""',
    "long": f'"{LONG[:200]}"...', "sl": "{1,-2,3}", "v": "{7,8,9,10}", "fl": "{1.5,-0.25}",
    "a": "Circle{r: 1.5}", "b": "Rect{w: 2, h: -3}", "c": "Empty",
    "n": "Some(5)", "none": "None", "p": "Some(0x…)", "q": "None", "bx": "Some(0x…)",
    "pt": "Some(Point {x: 5, y: -6})", "nm": 'Some("hi")', "os": 'Some("mine")', "gone": "None",
    "pts": "{Point {x: 1, y: -2},Point {x: 3, y: 4}}", "nopts": "{}",
    "tups": "{Tup (5, -6)}", "pairs": "{(1, 2)}",
    "rc": 'Rc(strong=2, weak=0) = {value = "shared", strong = 2, weak = 0}',
    "arc": 'Arc(strong=1, weak=1) = {value = "atomic", strong = 1, weak = 1}',
}
"""What each prints, pointers aside."""
JSON = {
    "s": "hello", "owned": 'tab\there "q" \u00e9\0end', "empty": "",
    "long": {"truncated": LONG[:200], "length": 300},
    "sl": [1, -2, 3], "v": [7, 8, 9, 10], "fl": [1.5, -0.25], "a": {"Circle": {"r": 1.5}},
    "b": {"Rect": {"w": 2, "h": -3}}, "c": "Empty", "n": {"Some": 5}, "none": "None",
    "q": "None", "pt": {"Some": {"x": 5, "y": -6}}, "nm": {"Some": "hi"}, "os": {"Some": "mine"},
    "gone": "None", "pts": [{"x": 1, "y": -2}, {"x": 3, "y": 4}], "nopts": [],
    "tups": [[5, -6]], "pairs": [[1, 2]],
    "rc": {"value": "shared", "strong": 2, "weak": 0},
    "arc": {"value": "atomic", "strong": 1, "weak": 1},
}
OPTIMIZED_OUT = {"owned", "v", "n", "none", "bx", "nm", "pts", "nopts", "rc", "arc", "tups",
                 "pairs"}
"""What rustc -O's DWARF gives no place for at the functions' entries (gdb agrees)."""


@pytest.fixture(scope="module", params=["-O", "opt-level=0"])
def build(request: pytest.FixtureRequest, compile_rust: RustCompiler) -> tuple[Path, bool]:
    """The fixture built by rustc optimized or not, and whether it is optimized."""
    if request.param == "-O":
        return compile_rust("dwarf_values.rs"), True
    return compile_rust("dwarf_values.rs", "-C", "opt-level=0"), False


def _probe(exe: Path, func: str) -> str:
    return f"{exe}:{func} " + " ".join(f"{k}={e}" for k, e in PROBES[func].items())


def _trace(engine: str, exe: Path, *more: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    status = main(["trace", "-e", engine, *more, *[_probe(exe, f) for f in PROBES],
                   "--", str(exe)], out=out, err=err)
    assert status == 0, err.getvalue()
    return out.getvalue()


def _json(engine: str, exe: Path) -> dict[str, dict[str, Any]]:
    events = [json.loads(ln) for ln in _trace(engine, exe, "--json").splitlines()
              if '"probe"' in ln]
    return {e["probe"].split("/", 1)[1]: e["args"] for e in events}


def _text(engine: str, exe: Path) -> dict[str, str]:
    """Each argument's text on the trace lines (split at the names we gave)."""
    got: dict[str, str] = {}
    for line in _trace(engine, exe).splitlines():
        func = next((f for f in PROBES if f" {f}: " in line), None)
        if func is None:
            continue
        names = "|".join(PROBES[func])
        parts = re.split(rf" ({names})=", line.split(f" {func}: ", 1)[1])
        got.update(zip(parts[1::2], parts[2::2]))
    return got


def _pointers(text: str) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x…", text)


@pytest.mark.root
def test_ptrace_engine_values(build: tuple[Path, bool]) -> None:
    exe, optimized = build
    gone = OPTIMIZED_OUT if optimized else set()
    text = _text("ptrace", exe)
    assert {k: _pointers(v) for k, v in text.items()} == {
        k: "<optimized out>" if k in gone else v for k, v in TEXT.items()}
    got = {k: v for args in _json("ptrace", exe).values() for k, v in args.items()}
    assert {k: v for k, v in got.items() if k in JSON} == {
        k: None if k in gone else v for k, v in JSON.items()}
    assert set(got) == set(TEXT), "a value's parts are not arguments of their own"
    assert got["p"]["Some"] > 0


@pytest.mark.kernel
def test_kernel_engine_values_equal_ptrace(build: tuple[Path, bool], tracefs: Path) -> None:
    exe, _ = build
    kernel, ptrace = _json("kernel", exe), _json("ptrace", exe)
    assert len(kernel) == len(PROBES)
    # a pointer's value differs between the runs (ASLR); what it is does not
    for values in (kernel, ptrace):
        for args in values.values():
            for k in ("p", "bx"):
                if isinstance(args.get(k), dict):
                    args[k]["Some"] = bool(args[k]["Some"])
    assert kernel == ptrace
    assert _text("kernel", exe).keys() == TEXT.keys()


# ------------------------------------------------------------ gdb as the oracle

def _gdb_normal(text: str) -> str:
    """gdb's print of a value (by Rust's pretty-printers) as our trace text
    writes it: a variant without its type's path, a pointer without the
    symbol it points to, a list as `{a,b}` without its size."""
    text = re.sub(r" <[^>]*>", "", text)
    text = re.sub(r"^[\w:]+(?:<.*?>)?::(\w+)(?=[({]|$)", r"\1", text)
    text = re.sub(r"\b(?:\w+::)+(?=\w)", "", text)  # a struct's path inside
    m = re.match(r"^(?:Vec|&\[\w+\])\(size=\d+\)(?: = \{(.*)\})?$", text)
    if m:  # elements as each prints, between them "," (as the kernel's arrays)
        return "{" + _top_level_commas(m.group(1) or "") + "}"
    return _pointers(text)


def _top_level_commas(text: str) -> str:
    """`text` with each `, ` between elements (outside any `{}` or `()`) as `,`."""
    out, depth, i = [], 0, 0
    while i < len(text):
        c = text[i]
        depth += (c in "({") - (c in ")}")
        if text.startswith(", ", i) and depth == 0:
            out.append(",")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _rust_printers() -> list[str]:
    """gdb options that load Rust's pretty-printers (String, Vec) from rustc's sysroot."""
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True,
                             check=True, timeout=60).stdout.strip()
    etc = Path(sysroot, "lib/rustlib/etc")
    need((etc / "gdb_load_rust_pretty_printers.py").exists(), "Rust's gdb pretty-printers")
    return ["-iex", f"python import sys; sys.path.insert(0, {str(etc)!r})",
            "-iex", f"source {etc / 'gdb_load_rust_pretty_printers.py'}"]


def _select_frame(func: str) -> str:
    """A gdb command selecting the frame of `func` (not of what it inlines there)."""
    code = (f"f = gdb.newest_frame()\nwhile f.name() != {func!r}: f = f.older()\n"
            "f.select()")
    return f"python exec({code!r})"


@pytest.mark.root
def test_gdb_prints_the_same(build: tuple[Path, bool]) -> None:
    exe, optimized = build
    need(shutil.which("gdb") is not None, "gdb")
    ours = _text("ptrace", exe)
    for func, exprs in PROBES.items():
        if optimized and func == "dwarf_values::options":
            # gdb 13 fails an assertion printing an Option<&T> held in a register
            exprs = {k: e for k, e in exprs.items() if k not in ("p", "q")}
        (resolved,) = Resolver().resolve_all(parse_specs([_probe(exe, func)]))
        assert resolved.link_addr is not None
        cmds = ["set pagination off", "set print elements 200",
                f"break *{GDB_PIE_BASE + resolved.link_addr:#x}", "run",
                # -O inlines callees at the entry: read in the function's own frame
                _select_frame(func), *[f"print {e}" for e in exprs.values()]]
        # one pipe: gdb's errors (optimized out) in order with its values
        out = gdb_batch(exe, cmds, options=_rust_printers(), merged=True)
        values = re.findall(r"^(?:\$\d+ = (.*)|(value has been optimized out))$", out, re.M)
        assert len(values) == len(exprs), out
        for (name, expr), (value, gone) in zip(exprs.items(), values):
            want = "<optimized out>" if gone else _gdb_normal(value)
            mine = ours[name]
            first = re.match(r'(?:Rc|Arc)\(.*\{value = "(.)', mine)
            if first and re.search(r"\{value = \d+, ", want):
                # gdb's printer shows an Rc<str>'s value as its first byte
                mine = re.sub(r'value = ".*?", ', f"value = {ord(first.group(1))}, ", mine)
            assert _pointers(mine) == want, (func, expr, ours[name], value)


@pytest.mark.root
def test_chrome_json_shows_each_value_whole(compile_rust: RustCompiler) -> None:
    """Outputs that take plain values get a string's text and an enum's
    variant as one argument, not the fetches they are made of."""
    exe = compile_rust("dwarf_values.rs", "-C", "opt-level=0")
    out = io.StringIO()
    assert main(["trace", "-e", "ptrace", "--format", "chrome-json",
                 _probe(exe, "dwarf_values::texts"), _probe(exe, "dwarf_values::shapes"),
                 "--", str(exe)], out=out) == 0
    doc = json.loads(out.getvalue())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    args = {k: v for e in events if e.get("cat", "").startswith("uprobes/")
            for k, v in e["args"].items()}
    assert args == {"s": "hello", "long": LONG[:200], "owned": JSON["owned"],
                    "a": "Circle{r: 1.5}", "b": "Rect{w: 2, h: -3}", "c": "Empty",
                    "empty": ""}


def test_a_list_of_structs_it_cannot_print_is_one_line_naming_the_member(
        compile_rust: RustCompiler) -> None:
    """A Vec of structs prints when their members are numbers; one with a
    nested struct or a String is refused in one line that names the member
    (it said `has no fetch type (index its elements)`, and a Vec cannot be
    indexed)."""
    exe = compile_rust("dwarf_vec_nested.rs", "-C", "opt-level=0")
    for expr, words in (("*o", "Outer's member inner is Inner, a struct"),
                        ("*n", "Named's member name is String, a struct")):
        err = io.StringIO()
        assert main(["resolve", f"{exe}:dwarf_vec_nested::look {expr}"], out=io.StringIO(),
                    err=err) == 2
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("uprobes: error: "), lines
        assert "prints elements that are numbers or structs of numbers only" in lines[0] \
            and words in lines[0], lines[0]
