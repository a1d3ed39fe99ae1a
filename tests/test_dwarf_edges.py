"""Rust values whose DWARF is awkward (tests/fixtures/dwarf_edges.rs, rustc at
-O and at opt-level 0), each call against gdb stopped at the same address:
an enum passed in two registers (its fields in the second piece), parameters
passed by reference (`DW_OP_breg5`: probed at the entry at -O, after the
prologue at opt-level 0, where rustc gives them a location list), a negative
discriminant that DWARF holds in one byte, a function on one line whose
next line-table row is an inlined callee's, enums of many variants (a field
they share fetched once; too many fields for the kernel refused in one line),
`Box<str>` as its text and `Box<[u16]>` as a list."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Compiler, RustCompiler, need
from gdb_support import gdb_batch
from test_dwarf_values import GDB_PIE_BASE, _gdb_normal, _rust_printers, _select_frame

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.resolve.resolver import Resolver

PROBES = {"o64": "x", "ou32": "x y", "of": "x", "sh": "s", "ei32": "*x", "res": "x",
          "ownstr": "s", "ovec": "v", "same": "*m", "apart": "*m",
          "boxed": "*a *b"}
"""Each function and what it prints."""
CALLS = {"o64": ["x=Some(5)", "x=None"], "ou32": ["x=Some(5) y=Some(250)", "x=None y=None"],
         "of": ["x=Some(1.25)", "x=None"],
         "sh": ["s=Circle{r: 0.5}", "s=Sq(2.5, 7)", "s=Nothing"],
         "ei32": ["x_deref=Neg(4)", "x_deref=Pos(500)", "x_deref=Zero"],
         "res": ["x=Ok(9)", 'x=Err("bad")'], "ownstr": ['s="owned"'], "ovec": ["v={1,2,3,4,5}"],
         "same": ['m_deref=S3("three")'], "apart": ["m_deref=A2([4, 5])"],
         "boxed": ['a_deref="boxed" b_deref={1,2}']}
"""What `main` passes each, call by call (gdb at the same address agrees,
and so must a probe where gdb, there, would print `<optimized out>`)."""
SSE = {"of"}
"""What the kernel engine cannot read (an f64 in an SSE register)."""
TOO_BIG = {"apart"}
"""What no kernel event holds: 40 variants, each field a fetch of its own."""
UNOPTIMIZED = {"same", "apart", "boxed"}
"""What is probed at opt-level 0 only (at -O rustc's DWARF keeps these
parameters nowhere at the entry: gdb says `<optimized out>` too)."""
REGISTERS = {"o64": [("x", "$rdi & 1", "$rsi")],
             "ou32": [("x", "$rdi & 1", "$rsi & 0xffffffff"), ("y", "$rdx & 1", "$rcx & 0xff")],
             "of": [("x", "$rdi & 1", "$xmm0.v2_double[0]")]}
"""At -O, where each Option is (its discriminant, its value): in two
registers, as rustc's DWARF says (`DW_OP_reg5; DW_OP_piece 4; DW_OP_reg4...`),
read from the registers since gdb 13 fails an assertion printing them."""


@pytest.fixture(scope="module", params=["-O", "opt-level=0"])
def build(request: pytest.FixtureRequest, compile_rust: RustCompiler) -> tuple[Path, bool]:
    """The fixture built by rustc optimized or not, and whether it is optimized."""
    if request.param == "-O":
        return compile_rust("dwarf_edges.rs"), True
    return compile_rust("dwarf_edges.rs", "-C", "opt-level=0"), False


def _spec(exe: Path, func: str) -> str:
    return f"{exe}:dwarf_edges::{func} {PROBES[func]}"


def _trace(engine: str, exe: Path, funcs: list[str]) -> dict[str, list[str]]:
    """Each function's hits, as the text after its name on the trace lines."""
    out, err = io.StringIO(), io.StringIO()
    status = main(["trace", "-e", engine, *[_spec(exe, f) for f in funcs], "--", str(exe)],
                  out=out, err=err)
    assert status == 0, err.getvalue()
    got: dict[str, list[str]] = {f: [] for f in funcs}
    for line in out.getvalue().splitlines():
        m = re.search(r" dwarf_edges::(\w+): \(0x[0-9a-f]+\) (.*)$", line)
        if m:
            got[m.group(1)].append(m.group(2))
    return got


def _gdb(exe: Path, optimized: bool, funcs: list[str], tmp: Path) -> dict[str, list[str]]:
    """What gdb prints at each hit of the addresses our probes are at."""
    script = ["set pagination off", "set print elements 200"]
    for func in funcs:
        exprs = PROBES[func]
        (resolved,) = Resolver().resolve_all(parse_specs([_spec(exe, func)]))
        assert resolved.link_addr is not None
        prints = [e for _, d, v in REGISTERS[func] for e in (d, v)] \
            if optimized and func in REGISTERS else exprs.split()
        if func == "ei32":  # gdb 13 finds no variant for the discriminant rustc writes as 251
            prints += ["*(x as *const i32)", "*((x as *const u8) + 4)"]
        script += [f"break *{GDB_PIE_BASE + resolved.link_addr:#x}", "commands", "silent",
                   _select_frame(f"dwarf_edges::{func}"), f'echo @@{func}\\n',
                   *[f"print {e}" for e in prints], "continue", "end"]
    (tmp / "gdb.cmds").write_text("\n".join([*script, "run", ""]))
    out = gdb_batch(exe, [], options=[*_rust_printers(), "-x", str(tmp / "gdb.cmds")],
                    merged=True, timeout=180)
    got: dict[str, list[str]] = {f: [] for f in funcs}
    for hit in out.split("@@")[1:]:
        func = hit.split("\n", 1)[0]
        values = re.findall(r"^\$\d+ = (.*)$", hit, re.M)
        if optimized and func in REGISTERS:
            got[func].append(" ".join(
                f"{n}=Some({v})" if d == "1" else f"{n}=None"
                for (n, _, _), d, v in zip(REGISTERS[func], values[::2], values[1::2])))
            continue
        if func == "ei32" and values[1:] == ["-5", values[2]]:
            values = [f"Neg({values[2]})"]
        names = [n.lstrip("*") + ("_deref" if n.startswith("*") else "")
                 for n in PROBES[func].split()]
        got[func].append(" ".join(f"{n}={_gdb_normal(_boxed(v))}"
                                  for n, v in zip(names, values)))
    return got


def _boxed(value: str) -> str:
    """gdb's `Box<str> [98, 111]` as text, a `Box<[u16]> [1, 2]` as a list."""
    m = re.match(r"^alloc::boxed::Box<(str|\[\w+\]), [\w:]+> \[(.*)\]$", value)
    if m is None:
        return value
    items = [int(x) for x in m.group(2).split(", ")] if m.group(2) else []
    if m.group(1) == "str":
        return '"' + bytes(items).decode() + '"'
    return "{" + ",".join(map(str, items)) + "}"


@pytest.mark.root
def test_every_call_prints_as_gdb_does(build: tuple[Path, bool], tmp_path: Path) -> None:
    need(shutil.which("gdb") is not None, "gdb")
    exe, optimized = build
    funcs = [f for f in PROBES if not (optimized and f in UNOPTIMIZED)]
    ours = _trace("ptrace", exe, funcs)
    assert ours == {f: CALLS[f] for f in funcs}
    assert ours == _gdb(exe, optimized, funcs, tmp_path)


@pytest.mark.root  # rustc here is rustup's under /root/.cargo, which nobody cannot run
def test_optimized_code_is_probed_at_its_entry(compile_rust: RustCompiler) -> None:
    """A parameter that a register points to (`DW_OP_breg5`) is there at the
    entry: no prologue is skipped, which could land past a branch."""
    exe = compile_rust("dwarf_edges.rs")
    symbols = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    entry = int(re.search(r"^([0-9a-f]+) t _ZN11dwarf_edges2sh17h", symbols, re.M).group(1),
                16)
    (resolved,) = Resolver().resolve_all(parse_specs([_spec(exe, "sh")]))
    assert resolved.link_addr == entry


@pytest.mark.kernel
def test_kernel_engine_equals_ptrace(build: tuple[Path, bool], tracefs: Path) -> None:
    exe, optimized = build
    funcs = [f for f in PROBES if f not in SSE | TOO_BIG and not (optimized and f in UNOPTIMIZED)]
    assert _trace("kernel", exe, funcs) == _trace("ptrace", exe, funcs)


@pytest.mark.kernel
def test_a_probe_too_big_for_the_kernel_is_refused_in_one_line(
        compile_rust: RustCompiler, tracefs: Path) -> None:
    exe = compile_rust("dwarf_edges.rs", "-C", "opt-level=0")
    out, err = io.StringIO(), io.StringIO()
    assert main(["trace", "-e", "kernel", _spec(exe, "apart"), "--", str(exe)],
                out=out, err=err) == 1
    (line,) = [ln for ln in err.getvalue().splitlines() if "note:" not in ln]
    assert line.startswith("uprobes: error: uprobes/dwarf_edges::apart: its 41 fetches ")
    assert line.endswith("; -e ptrace reads them")


@pytest.mark.root
def test_auto_takes_ptrace_for_a_probe_too_big_for_the_kernel(
        compile_rust: RustCompiler, capsys: pytest.CaptureFixture[str]) -> None:
    """`-e auto` on a probe the kernel refuses as too big (40 variants of
    arrays apart: 6572 bytes of fields with the name, where a kernel event takes 3072)
    takes the ptrace engine, with a note saying why, and prints the value."""
    exe = compile_rust("dwarf_edges.rs", "-C", "opt-level=0")
    assert _trace("auto", exe, ["apart"]) == {"apart": CALLS["apart"]}
    err = capsys.readouterr().err
    assert "uprobes/dwarf_edges::apart: its fetches take 6572 bytes of one event, more than " \
           "the kernel's 3072: -e auto takes the ptrace engine" in err, err


@pytest.mark.kernel
def test_count_auto_counts_a_probe_too_big_to_record_in_the_kernel(
        compile_rust: RustCompiler, tracefs: Path) -> None:
    """A count fetches only what its filter tests, so `count -e auto` on
    `apart` (too big for one kernel event's record) counts in the kernel,
    system-wide (it was refused: the ptrace engine needs -p PID or -- CMD)."""
    exe = compile_rust("dwarf_edges.rs", "-C", "opt-level=0")
    out, err = io.StringIO(), io.StringIO()
    assert main(["count", "-e", "auto", "--duration", "0.1", _spec(exe, "apart")],
                out=out, err=err) == 0, err.getvalue()
    assert "ptrace" not in err.getvalue(), err.getvalue()


@pytest.mark.kernel
def test_auto_measures_the_line_the_kernel_engine_writes(compile_c: Compiler,
                                                         tracefs: Path) -> None:
    """A probe whose uprobe_events line is just short of the kernel's 4094
    bytes in the group `uprobes`, but not in the group the kernel engine
    writes (`uprobes_PID`, with ` __uprobes_comm=$comm` added): `-e auto`
    takes the ptrace engine for it, with the note (it took the kernel,
    which refused the line)."""
    from uprobes.engines.kernel.probe_line import kernel_line
    exe = compile_c("dwarf_faults.c", "-O2")
    (one,) = Resolver().resolve_all(parse_specs([f"{exe}:look a=%di:u64"]))
    start = len(kernel_line(one)) - len(" a=%di:u64")
    names, left = [], 4094 - 6 - start  # each ` NAME=%di:u64`: len(NAME) + 9 bytes
    while left > 80:
        names.append(f"a{len(names):03d}".ljust(31, "x"))
        left -= 40
    for part in (left // 2, left - left // 2):
        names.append(f"a{len(names):03d}".ljust(part - 9, "x"))
    spec = f"{exe}:look " + " ".join(f"{n}=%di:u64" for n in names)
    (probe,) = Resolver().resolve_all(parse_specs([spec]))
    assert 4094 - 12 <= len(kernel_line(probe)) < 4094
    out, err = io.StringIO(), io.StringIO()
    assert main(["trace", "-e", "auto", spec, "--", str(exe)], out=out, err=err) == 0, \
        err.getvalue()
