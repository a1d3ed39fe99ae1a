"""Arguments by name from a Rust build's DWARF (tests/fixtures/dwarf_args.rs,
rustc at -O and at opt-level 0): parameters and struct fields by name
through references, on both engines, checked against the values the fixture
passes and against gdb stopped at the same address of the same build."""

from __future__ import annotations

import io
import json
import re
import shutil
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

VISIT = ("dwarf_args::visit s.id s.color s.ok s.weight s.inner s.vals s.name.length "
         "s.vals[2] n flags")
PROBES = [VISIT, "dwarf_args::scalars $params", "dwarf_args::kinds $params",
          "dwarf_args::floats $params", "dwarf_args::Item::weigh self.id self.weight by"]
EXPECTED = {
    "dwarf_args::visit": {"s_id": 1, "s_color": "Green", "s_ok": True, "s_weight": 1.5,
                          "s_inner_x": 42, "s_inner_y": -2, "s_vals": [-1, -2, -3, -4],
                          "s_name_length": 5, "s_vals_2": -3, "n": 7, "flags": 17},
    "dwarf_args::scalars": {"c": -5, "uc": 250, "sh": -300, "us": 65000, "i": -70000,
                            "u": 4000000000, "l": -5000000000, "ul": 18000000000000000000},
    "dwarf_args::kinds": {"col": "Blue", "b": True, "ch": 122, "inner_x": 7, "inner_y": 8},
    "dwarf_args::floats": {"f": 2.5, "d": -0.125, "k": 3},
    "dwarf_args::Item::weigh": {"self_id": 1, "self_weight": 1.5, "by": 2.0},
}
KERNEL_PROBES = [VISIT, "dwarf_args::scalars $params", "dwarf_args::kinds $params",
                 "dwarf_args::Item::weigh self.id self.weight"]
"""PROBES less the floats that are in xmm registers at -O, which the kernel's
fetchargs cannot read."""


@pytest.fixture(scope="module", params=["-O", "opt-level=0"])
def build(request: pytest.FixtureRequest, compile_rust: RustCompiler) -> tuple[Path, bool]:
    """The fixture built by rustc optimized or not, and whether it is optimized."""
    if request.param == "-O":
        return compile_rust("dwarf_args.rs"), True
    return compile_rust("dwarf_args.rs", "-C", "opt-level=0"), False


def _trace(engine: str, exe: Path, probes: list[str]) -> dict[str, dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["trace", "-e", engine, "--json", *[f"{exe}:{p}" for p in probes],
                   "--", str(exe)], out=out, err=err)
    assert status == 0, err.getvalue()
    events = [json.loads(ln) for ln in out.getvalue().splitlines() if '"probe"' in ln]
    return {e["probe"].split("/", 1)[1]: e["args"] for e in events}


@pytest.mark.root
def test_ptrace_engine_values(build: tuple[Path, bool],
                              capsys: pytest.CaptureFixture[str]) -> None:
    exe, optimized = build
    got = _trace("ptrace", exe, PROBES)
    notes = capsys.readouterr().err
    assert got == EXPECTED
    # rustc records no -O in its DWARF: optimized code is probed at its entry, where its
    # locations are right; unoptimized code after its prologue, named as the source does
    assert ("probed after its prologue" in notes) is not optimized, notes
    if not optimized:
        assert "uprobes: note: dwarf_args::visit: probed after its prologue, at " \
               "dwarf_args::visit+0x" in notes


@pytest.mark.kernel
def test_kernel_engine_values_equal_ptrace(build: tuple[Path, bool], tracefs: Path) -> None:
    exe, optimized = build
    probes = KERNEL_PROBES if optimized else PROBES
    kernel = _trace("kernel", exe, probes)
    ptrace = _trace("ptrace", exe, probes)
    assert kernel == ptrace
    assert len(kernel) == len(probes)
    for probe, args in kernel.items():
        assert args == {k: v for k, v in EXPECTED[probe].items() if k in args}, probe


def test_no_parameters_is_probed_at_its_entry(build: tuple[Path, bool]) -> None:
    """A function without parameters gives no location to tell -O from -O0
    by, and no prologue stores one: it is probed at its entry, where a probe
    without variables goes too, not after a prologue it was taken to have."""
    exe = build[0]
    (plain,) = Resolver().resolve_all(parse_specs([f"{exe}:dwarf_args::tick"]))
    err = io.StringIO()
    out = io.StringIO()
    assert main(["resolve", f"{exe}:dwarf_args::tick $params"], out=out, err=err) == 0
    assert "prologue" not in err.getvalue(), err.getvalue()
    (named,) = Resolver().resolve_all(parse_specs([f"{exe}:dwarf_args::tick $params"]))
    assert named.file_offset == plain.file_offset, (hex(named.file_offset),
                                                    hex(plain.file_offset))


@pytest.mark.root
def test_an_enum_with_data_reads_as_its_variant(compile_rust: RustCompiler) -> None:
    """`Option<&Item>` holds one of two variants, chosen at run time (here
    niche-optimized: None is a null pointer): read as the one it holds,
    alone and as a member of a struct printed whole."""
    exe = compile_rust("dwarf_args.rs")
    got = _trace("ptrace", exe, ["dwarf_args::visit s.next *s"])["dwarf_args::visit"]
    assert set(got["s_next"]) == {"Some"} and got["s_next"]["Some"] > 0
    assert got["s_deref_next"] == got["s_next"]
    assert got["s_deref_id"] == 1
    assert got["s_deref_name"] == "first"


@pytest.mark.root
def test_a_generic_functions_instances_by_name(compile_rust: RustCompiler) -> None:
    """A v0 build names each instance of a generic function; each has its own parameter type."""
    exe = compile_rust("dwarf_args.rs", "-C", "symbol-mangling-version=v0")
    got = _trace("ptrace", exe, ["dwarf_args::twice::<i64> v", "dwarf_args::twice::<u32> v"])
    assert got == {"dwarf_args::twice::<i64>": {"v": 21}, "dwarf_args::twice::<u32>": {"v": 4}}


# ------------------------------------------------------------ gdb as the oracle

def _gdb_normal(text: str) -> str:
    """gdb's Rust print of a value as our trace text writes it: an enum
    variant without its path, an array as the kernel's `{a,b}`."""
    text = re.sub(r"^[\w:]+::(\w+)$", r"\1", text)
    if text.startswith("["):
        return "{" + text[1:-1].replace(" ", "") + "}"
    return text


@pytest.mark.root
def test_gdb_prints_the_same(build: tuple[Path, bool]) -> None:
    exe, _ = build
    need(shutil.which("gdb") is not None, "gdb")
    cases = {
        "dwarf_args::visit": {"s_id": "s.id", "s_color": "s.color", "s_ok": "s.ok",
                              "s_weight": "s.weight", "s_inner_x": "s.inner.x",
                              "s_inner_y": "s.inner.y", "s_vals": "s.vals",
                              "s_name_length": "s.name.length", "n": "n", "flags": "flags"},
        "dwarf_args::scalars": {v: v for v in ("c", "uc", "sh", "us", "i", "u", "l", "ul")},
        "dwarf_args::kinds": {"col": "col", "b": "b", "ch": "ch", "inner_x": "inner.x",
                              "inner_y": "inner.y"},
        "dwarf_args::floats": {"f": "f", "d": "d", "k": "k"},
        "dwarf_args::Item::weigh": {"self_id": "self.id", "self_weight": "self.weight",
                                    "by": "by"},
    }
    for func, exprs in cases.items():
        probe = f"{exe}:{func} " + " ".join(f"{k}={v}" for k, v in exprs.items())
        (resolved,) = Resolver().resolve_all(parse_specs([probe]))
        assert resolved.link_addr is not None
        out = io.StringIO()
        assert main(["trace", "-e", "ptrace", probe, "--", str(exe)], out=out) == 0
        line = next(ln for ln in out.getvalue().splitlines() if f" {func}: " in ln)
        ours = dict(re.findall(r" (\w+)=(\{[^}]*\}|-?\d+ '[^']*'|\S+)", line))
        cmds = ["set pagination off", f"break *{GDB_PIE_BASE + resolved.link_addr:#x}", "run",
                *[f"print {e}" for e in exprs.values()]]
        gdb_out = gdb_batch(exe, cmds)
        values = re.findall(r"^\$\d+ = (.*)$", gdb_out, re.M)
        assert len(values) == len(exprs), gdb_out
        for (name, expr), value in zip(exprs.items(), values):
            assert ours[name] == _gdb_normal(value), (func, expr, ours[name], value)
