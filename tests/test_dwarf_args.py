"""Arguments by name from DWARF (`s->name`, `$params`, `arr[3]`, `*p`) on
both engines, checked against the values the fixture passes and against gdb
stopped at the same address of the same build, at -O0 and -O2."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, need
from gdb_support import gdb_batch

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.elf.image import ElfImage
from uprobes.resolve.resolver import Resolver

VISIT = ("visit s->name s->tag s->in s->next->vals s->flags s->level s->color s->ok "
         "s->weight s->next->in.y counter n flags *s->next")
PROBES = [VISIT, "kinds $params", "scalars $params", "floats $params"]
KERNEL_PROBES = [VISIT, "kinds $params", "scalars $params", "floats k"]

EXPECTED = {
    "visit": {"s_name": "first", "s_tag": "one", "s_in_x": 42, "s_in_y": -2,
              "s_next_vals": [10, 20, 30, 40], "s_flags": 3, "s_level": 9,
              "s_color": "GREEN", "s_ok": True, "s_weight": 1.5, "s_next_in_y": 300,
              "counter": 40, "n": 7, "flags": 17, "s_next_deref_id": 2,
              "s_next_deref_name": "second", "s_next_deref_color": "BLUE",
              "s_next_deref_flags": 5, "s_next_deref_level": 17, "s_next_deref_in_x": -7},
    "kinds": {"col": "BLUE", "b": True, "ch": 122, "str": "hello", "in_x": 7, "in_y": 8},
    "scalars": {"c": -5, "uc": 250, "sh": -300, "us": 65000, "i": -70000, "u": 4000000000,
                "l": -5000000000, "ul": 18000000000000000000},
    "floats": {"f": 2.5, "d": -0.125, "k": 3},
}


@pytest.fixture(scope="module", params=["-O0", "-O2", "-O2 -gdwarf-4", "-O0 -gz"])
def build(request: pytest.FixtureRequest, compile_c: Compiler) -> tuple[Path, bool]:
    """The fixture built with the flags asked for (DWARF 5 by default, 4, and
    compressed sections), and whether it is optimized."""
    flags = request.param.split()
    return compile_c("dwarf_args.c", *flags), flags[0] != "-O0"


def _trace(engine: str, exe: Path, probes: list[str] = PROBES) -> dict[str, dict[str, Any]]:
    out = io.StringIO()
    status = main(["trace", "-e", engine, "--json", *[f"{exe}:{p}" for p in probes],
                   "--", str(exe)], out=out)
    assert status == 0
    events = [json.loads(ln) for ln in out.getvalue().splitlines() if '"probe"' in ln]
    return {e["probe"].split("/")[1]: e["args"] for e in events}


def _check(got: dict[str, dict[str, Any]], optimized: bool, kernel: bool = False) -> None:
    for probe, want in EXPECTED.items():
        for name, value in want.items():
            if kernel and optimized and probe == "floats" and name in ("f", "d"):
                continue  # in SSE registers at -O2: see test_kernel_refuses_sse_registers
            assert got[probe][name] == value, (probe, name, got[probe])


@pytest.mark.root
def test_ptrace_engine_values(build: tuple[Path, bool]) -> None:
    _check(_trace("ptrace", build[0]), build[1])


@pytest.mark.kernel
def test_kernel_engine_values_equal_ptrace(build: tuple[Path, bool], tracefs: Path) -> None:
    exe, optimized = build
    probes = KERNEL_PROBES if optimized else PROBES
    kernel, ptrace = _trace("kernel", exe, probes), _trace("ptrace", exe, probes)
    for probe in EXPECTED:
        kernel[probe].pop("ip", None), ptrace[probe].pop("ip", None)  # a stack address: ASLR
        assert kernel[probe] == ptrace[probe], probe
    _check(kernel, optimized, kernel=True)


@pytest.mark.kernel
def test_kernel_refuses_sse_registers(compile_c: Compiler, tracefs: Path) -> None:
    """A float in xmm0 (at -O2) is one line from the kernel engine, and -e auto
    takes the ptrace engine, which reads it."""
    exe = compile_c("dwarf_args.c", "-O2")
    err = io.StringIO()
    assert main(["trace", "-e", "kernel", f"{exe}:floats f", "--", str(exe)],
                out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1 and "f is in an SSE register" in err.getvalue()
    got = _trace("auto", exe, ["floats $params"])
    assert got["floats"] == EXPECTED["floats"]


def test_errors_name_what_is_there(compile_c: Compiler, tmp_path: Path) -> None:
    exe = compile_c("dwarf_args.c", "-O2")
    cases = {
        f"{exe}:visit nope": "no variable 'nope' at visit+0x0 (in scope: s, n, flags",
        f"{exe}:visit s->nam": "struct item has no member 'nam' (did you mean: name?)",
        f"{exe}:visit s.id": "'.id' on a pointer (struct item *): write ->id",
        f"{exe}:visit s->vals[7]": "index 7 is past the end of long int [4]",
        f"{exe}:floats f": "f is in register xmm0: the kernel's uprobe fetchargs read the "
                           "general registers only",
        f"r {exe}:visit s": "a return probe stops after the function's frame is gone",
    }
    for line, words in cases.items():
        err = io.StringIO()
        status = main(["resolve", line], out=io.StringIO(), err=err)
        assert status == 2 and words in err.getvalue(), (line, err.getvalue())
    bare = tmp_path / "nodebug"
    subprocess.run(["strip", "-g", "-o", str(bare), str(exe)], check=True)
    err = io.StringIO()
    assert main(["resolve", f"{bare}:visit s"], out=io.StringIO(), err=err) == 2
    assert "has no DWARF debug info; looked for /usr/lib/debug/.build-id/" in err.getvalue()


def test_package_named_for_a_system_library() -> None:
    libz = Path("/lib/x86_64-linux-gnu/libz.so.1")
    need(libz.exists() and shutil.which("dpkg-query") is not None, "Debian's libz")
    image = ElfImage.open(str(libz))
    bid = image.build_id or ""
    need(not Path(f"/usr/lib/debug/.build-id/{bid[:2]}/{bid[2:]}.debug").exists(),
         "zlib's debug symbols are installed")
    err = io.StringIO()
    assert main(["resolve", "libz:deflate strm"], out=io.StringIO(), err=err) == 2
    assert "zlib1g-dbgsym" in err.getvalue(), err.getvalue()


def test_optimized_out_is_said(compile_c: Compiler) -> None:
    exe = compile_c("dwarf_args.c", "-O2")
    out = io.StringIO()
    assert main(["resolve", f"{exe}:main rounds"], out=out) == 0
    assert "rounds=\\0:u8" in out.getvalue()  # a marker fetch; rendered <optimized out>


# ------------------------------------------------------------ gdb as the oracle

def _gdb_values(exe: Path, func: str, offset: int, exprs: list[str]) -> dict[str, str]:
    cmds = ["set pagination off", "set print pretty off", "set print null-stop on",
            "starti", f"break *((char *)&{func} + {offset})", "continue"]
    cmds += [f"print {e}" for e in exprs]
    out = gdb_batch(exe, cmds)
    values = re.findall(r"^\$\d+ = (.*)$", out, re.M)
    assert len(values) == len(exprs), out
    return dict(zip(exprs, values))


def _gdb_normal(text: str) -> str:
    """gdb's print of a value as our trace text writes it: a char pointer's
    string without the pointer, arrays without spaces."""
    m = re.fullmatch(r'0x[0-9a-f]+ "(.*)"', text)
    if m:
        return f'"{m.group(1)}"'
    m = re.fullmatch(r'"(.*)"(?:, .*)?', text)
    if m:
        return f'"{m.group(1)}"'
    if text.startswith("{"):
        return text.replace(" ", "")
    return text


@pytest.mark.root
def test_gdb_prints_the_same(build: tuple[Path, bool]) -> None:
    exe = build[0]
    need(shutil.which("gdb") is not None, "gdb")
    exprs = {"s_name": "s->name", "s_tag": "s->tag", "s_in_x": "s->in.x", "s_in_y": "s->in.y",
             "s_next_vals": "s->next->vals", "s_flags": "s->flags", "s_level": "s->level",
             "s_color": "s->color", "s_ok": "s->ok", "s_weight": "s->weight", "n": "n",
             "flags": "flags", "counter": "counter"}
    probe = f"{exe}:visit " + " ".join(exprs.values())
    (resolved,) = Resolver().resolve_all(parse_specs([probe]))
    assert resolved.link_addr is not None and resolved.symbol == "visit"
    out = io.StringIO()
    assert main(["trace", "-e", "ptrace", probe, "--", str(exe)], out=out) == 0
    line = next(ln for ln in out.getvalue().splitlines() if " visit: " in ln)
    ours = dict(re.findall(r' (\w+)=("[^"]*"|\{[^}]*\}|\S+)', line))
    gdb = _gdb_values(exe, "visit", resolved.symbol_offset, list(exprs.values()))
    for name, expr in exprs.items():
        assert ours[name] == _gdb_normal(gdb[expr]), (name, ours[name], gdb[expr])
    for fn, names in (("scalars", ["c", "uc", "sh", "us", "i", "u", "l", "ul"]),
                      ("kinds", ["col", "b", "ch", "str", "in.x", "in.y"]),
                      ("floats", ["f", "d", "k"])):
        (resolved,) = Resolver().resolve_all(parse_specs([f"{exe}:{fn} $params"]))
        out = io.StringIO()
        assert main(["trace", "-e", "ptrace", f"{exe}:{fn} $params", "--", str(exe)],
                    out=out) == 0
        line = next(ln for ln in out.getvalue().splitlines() if f" {fn}: " in ln)
        ours = dict(re.findall(r" (\w+)=(\"[^\"]*\"|-?\d+ '[^']*'|\S+)", line))
        gdb = _gdb_values(exe, fn, resolved.symbol_offset, names)
        for expr in names:
            assert ours[expr.replace(".", "_")] == _gdb_normal(gdb[expr]), (fn, expr, ours, gdb)


# ------------------------------------------------------------ source lines, inline sites

def _fixture_line(text: str) -> int:
    lines = (Path(__file__).parent / "fixtures" / "dwarf_args.c").read_text().splitlines()
    return next(i for i, ln in enumerate(lines, 1) if text in ln)


def _events(engine: str, exe: Path, probes: list[str]) -> tuple[list[dict[str, Any]], str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["trace", "-e", engine, "--json", *[f"{exe}:{p}" for p in probes],
                   "--", str(exe)], out=out, err=err)
    assert status == 0, err.getvalue()
    return [json.loads(ln) for ln in out.getvalue().splitlines() if '"probe"' in ln], \
        err.getvalue()


@pytest.mark.root
@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_inline_sites_and_source_lines(compile_c: Compiler, engine: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """clamp() exists only inlined (twice, at -O0 too: always_inline): a probe
    on it stops at both sites; its line by number and as clamp:+4 too, with
    its parameters as each copy has them."""
    if engine == "kernel":
        need(Path("/sys/kernel/tracing/uprobe_events").exists(), "tracefs")
    exe = compile_c("dwarf_args.c", "-O0")
    line = _fixture_line("return v > hi ? hi : v;")
    start = _fixture_line("int clamp(int v, int lo, int hi)")
    events, _ = _events(engine, exe, ["clamp v lo hi", f"clamp:+{line - start} v hi",
                                      f"dwarf_args.c:{line} v2=v hi2=hi"])
    notes = capsys.readouterr().err
    assert "clamp is inlined: probed at its 2 inline sites" in notes
    assert f"dwarf_args.c:{line} (clamp:+{line - start}) starts at 2 addresses, 2 of them " \
           "in inlined code" in notes
    entry = [e["args"] for e in events if "lo" in e["args"]]
    assert entry == [{"v": 42, "lo": 0, "hi": 10}, {"v": -9, "lo": -5, "hi": 5}]
    by_line = [e["args"] for e in events if "v2" not in e["args"] and "lo" not in e["args"]]
    assert by_line == [{"v": 42, "hi": 10}, {"v": -5, "hi": 5}]
    by_number = [e["args"] for e in events if "v2" in e["args"]]
    assert by_number == [{"v2": 42, "hi2": 10}, {"v2": -5, "hi2": 5}]


@pytest.mark.root
def test_gdb_stops_at_the_same_line_sites(compile_c: Compiler) -> None:
    need(shutil.which("gdb") is not None, "gdb")
    exe = compile_c("dwarf_args.c", "-O0")
    line = _fixture_line("return v > hi ? hi : v;")
    cmds = ["set pagination off", f"break dwarf_args.c:{line}", "run", "print v", "print hi",
            "continue", "print v", "print hi"]
    gdb = gdb_batch(exe, cmds)
    assert "2 locations" in gdb, gdb
    values = [int(v) for v in re.findall(r"^\$\d+ = (-?\d+)$", gdb, re.M)]
    events, _ = _events("ptrace", exe, [f"dwarf_args.c:{line} v hi"])
    assert [x for e in events for x in (e["args"]["v"], e["args"]["hi"])] == values


# ------------------------------------------------------------ debug info where it lives

@pytest.mark.root
def test_debug_info_by_gnu_debuglink(compile_c: Compiler, tmp_path: Path) -> None:
    """The DWARF moved to a separate file named by .gnu_debuglink (objcopy, as
    packagers do) is found and read: the same values as with it in the file."""
    exe = compile_c("dwarf_args.c", "-O2")
    stripped, debug = tmp_path / "app", tmp_path / "app.debug"
    subprocess.run(["objcopy", "--only-keep-debug", "--compress-debug-sections",
                    str(exe), str(debug)], check=True)
    subprocess.run(["objcopy", "--strip-debug", "--remove-section=.note.gnu.build-id",
                    f"--add-gnu-debuglink={debug}", str(exe), str(stripped)], check=True,
                   cwd=tmp_path)
    got = _trace("ptrace", stripped, [VISIT])
    assert {k: got["visit"][k] for k in EXPECTED["visit"]} == EXPECTED["visit"]
    data = debug.read_bytes()
    debug.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # its CRC no longer matches
    err = io.StringIO()
    assert main(["resolve", f"{stripped}:visit s->name"], out=io.StringIO(), err=err) == 2
    assert "has no DWARF debug info" in err.getvalue()


def test_libc_from_its_debug_package() -> None:
    """Debian's libc6-dbg puts libc's DWARF (5, compressed) under
    /usr/lib/debug/.build-id: a parameter of malloc and getaddrinfo's strings."""
    image = ElfImage.open("/lib/x86_64-linux-gnu/libc.so.6")
    bid = image.build_id or ""
    need(Path(f"/usr/lib/debug/.build-id/{bid[:2]}/{bid[2:]}.debug").exists(), "libc6-dbg")
    out = io.StringIO()
    assert main(["resolve", "libc:malloc bytes", "libc:getaddrinfo name service"],
                out=out) == 0
    assert "bytes=%di:u64" in out.getvalue()
    assert "name=+0(%di):string service=+0(%si):string" in out.getvalue()


# ------------------------------------------------------------ C++

GDB_PIE_BASE = 0x555555554000
"""Where gdb loads a PIE program (it runs it with address randomization off)."""
POKE = "_ZN6Widget4pokeERiRKS_"


@pytest.mark.root
@pytest.mark.parametrize("level", ["-O0", "-O2"])
def test_cpp_members_bases_references_as_gdb(compile_c: Compiler, level: str) -> None:
    """A method: `this->` members, a member of its base class, a reference
    read as what it refers to (gdb's `(int &) @0x...: 4` is 4)."""
    need(shutil.which("gdb") is not None and shutil.which("g++") is not None, "gdb and g++")
    exe = compile_c("dwarf_args.cc", level, name=f"dwarf_args_cc{level}")
    exprs = {"count": "count", "other_id": "other.id", "other_name": "other.name",
             "this_name": "this->name", "this_weight": "this->weight",
             "this_tags": "this->tags", "this_id": "this->id", "other_weight": "other.weight"}
    probe = f"{exe}:{POKE} " + " ".join(f"{k}={v}" for k, v in exprs.items())
    (resolved,) = Resolver().resolve_all(parse_specs([probe]))
    assert resolved.link_addr is not None
    out = io.StringIO()
    assert main(["trace", "-e", "ptrace", probe, "--", str(exe)], out=out) == 0
    line = next(ln for ln in out.getvalue().splitlines() if " count=" in ln)
    ours = dict(re.findall(r' (\w+)=("[^"]*"|\{[^}]*\}|\S+)', line))
    assert ours["count"] == "4" and ours["other_id"] == "9" and ours["this_id"] == "7"
    (by_name,) = Resolver().resolve_all(parse_specs([f"{exe}:Widget::poke other.id"]))
    assert by_name.file_offset == resolved.file_offset  # the demangled name: the same place
    cmds = ["set pagination off", "set print null-stop on",
            f"break *{GDB_PIE_BASE + resolved.link_addr:#x}", "run",
            *[f"print {e}" for e in exprs.values()]]
    gdb_out = gdb_batch(exe, cmds)
    values = re.findall(r"^\$\d+ = (.*)$", gdb_out, re.M)
    assert len(values) == len(exprs), gdb_out
    for (name, expr), value in zip(exprs.items(), values):
        value = re.sub(r"^\([^)]*&\) @0x[0-9a-f]+: ", "", value)  # a reference: its value
        assert ours[name] == _gdb_normal(value), (expr, ours[name], value)


@pytest.mark.root
def test_vars_are_the_scopes_variables(build: tuple[Path, bool]) -> None:
    """`$vars` at a line: the function's parameters and the locals whose
    scope holds the address, in source order; what has no value there says so."""
    exe, optimized = build
    line = _fixture_line("for (struct item *p = s; p; p = p->next)")
    events, _ = _events("ptrace", exe, [f"dwarf_args.c:{line} $vars"])
    assert [list(e["args"]) for e in events] == [["s", "n", "flags", "total", "p"]] * 3
    first = events[0]["args"]
    assert (first["flags"], first["total"]) == (17, 7)
    assert first["n"] in (7, None)  # None: optimized out at that address
    assert [e["args"]["total"] for e in events[1:]] == [23, 62]


@pytest.mark.root
def test_unsupported_location_is_said_never_guessed(compile_c: Compiler,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A clone's parameter that lives in its caller (DW_OP_GNU_parameter_ref) is
    an error naming the operation; in $params it prints so, and a constant
    parameter (DW_AT_const_value) prints its value."""
    exe = compile_c("dwarf_clone.c", "-O2")
    err = io.StringIO()
    assert main(["resolve", f"{exe}:weigh* s->id"], out=io.StringIO(), err=err) == 2
    need("no function matches" not in err.getvalue(), "gcc made no clone of weigh")
    assert "s->id: DW_OP_GNU_parameter_ref; its value cannot be fetched here" in err.getvalue()
    out = io.StringIO()
    assert main(["trace", "-e", "ptrace", f"{exe}:weigh* $params", "--", str(exe)],
                out=out) == 1  # the fixture's exit status: 15 & 1
    assert " s=<unsupported: DW_OP_GNU_parameter_ref>" in out.getvalue()
    assert " k=3" in out.getvalue()


def test_string_of_any_pointer(compile_c: Compiler) -> None:
    """`p:string` reads the string a pointer of any type points to (perf probe's
    `:string`), not the pointer's own bytes."""
    exe = compile_c("dwarf_args.c", "-O2")
    out = io.StringIO()
    assert main(["resolve", f"{exe}:kinds ip:string col:x64"], out=out) == 0
    assert "ip=+0(%r8):string col=%di:x64" in out.getvalue(), out.getvalue()


# ------------------------------------------------------------ $retval by the function's type

RETURNS = ["visit", "scalars", "floats", "name_of", "color_of", "ok_of", "negated", "low_byte",
           "next_of", "halved"]  # in the order main() calls them
IN_XMM0 = ("floats", "halved")
"""They return a double and a float, in xmm0: the ptrace engine's only."""


def _gdb_returns(exe: Path, funcs: list[str]) -> dict[str, str]:
    """What gdb's `finish` says each function returned ("Value returned is $1 = ...")."""
    cmds = ["set pagination off", "set print pretty off", "starti"]
    for fn in funcs:
        cmds += [f"break {fn}", "continue", "finish", "delete"]
    out = gdb_batch(exe, cmds)
    values = re.findall(r"^Value returned is \$\d+ = (.*)$", out, re.M)
    assert len(values) == len(funcs), out
    return dict(zip(funcs, values))


@pytest.mark.root
def test_retval_by_the_functions_type_as_gdb(build: tuple[Path, bool]) -> None:
    """`r FUNC $retval` with DWARF prints the return value by the function's
    type, as gdb's `finish` does (the string of a `char *`, an enum's name,
    bool, a short's sign, a pointer in hex, a float and a double from xmm0),
    the same on both engines where the kernel can read them; `$retval:x64`
    keeps the raw register, and a void function's `$retval` stays as written."""
    exe = build[0]
    need(shutil.which("gdb") is not None, "gdb")
    gdb = _gdb_returns(exe, RETURNS)
    specs = [f"r {exe}:{fn} rv=$retval" for fn in RETURNS]
    out = io.StringIO()
    assert main(["trace", "-e", "ptrace", *specs, "--", str(exe)], out=out) == 0
    ours = {m[0]: m[1] for m in re.findall(r" (\w+)__return: \(.*\) rv=(.*)$", out.getvalue(),
                                          re.M)}
    for fn in RETURNS:
        if fn == "next_of":  # a stack address: another under gdb (its environment, no ASLR)
            assert re.fullmatch(r"\(struct item \*\) 0x[0-9a-f]+", gdb[fn]), gdb[fn]
            assert re.fullmatch(r"0x[0-9a-f]+", ours[fn]), ours[fn]
            continue
        assert ours[fn] == _gdb_normal(gdb[fn]), (fn, ours[fn], gdb[fn])
    out = io.StringIO()
    general = [s for fn, s in zip(RETURNS, specs) if fn not in IN_XMM0]
    assert main(["trace", "-e", "kernel", *general, "--", str(exe)], out=out) == 0
    on_kernel = {m[0]: m[1] for m in re.findall(r" (\w+)__return: \(.*\) rv=(.*)$",
                                               out.getvalue(), re.M)}
    assert on_kernel == {fn: v for fn, v in ours.items() if fn not in IN_XMM0} | {
        "next_of": on_kernel["next_of"]}  # (another run's stack)
    err = io.StringIO()  # the kernel cannot read xmm0: one line, never rax's stale bits
    assert main(["trace", "-e", "kernel", f"r {exe}:floats rv=$retval", "--", str(exe)],
                out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1 and "rv is in an SSE register" in err.getvalue()
    (raw,) = Resolver().resolve_all(parse_specs([f"r {exe}:negated rv=$retval:x64"]))
    assert raw.args[0].type.view is None and raw.args[0].type.base == "x64"
    (void,) = Resolver().resolve_all(parse_specs([f"r {exe}:nothing rv=$retval"]))
    assert void.args[0].type.base == "x64" and not void.args[0].type.explicit


@pytest.mark.parametrize("fn,type_name", [("cf", "complex float"), ("pf", "struct pair"),
                                          ("qf", "struct quad"), ("ld", "long double")])
def test_retval_not_in_rax_is_refused(compile_c: Compiler, fn: str, type_name: str) -> None:
    """A complex float, a struct of floats (xmm0/xmm1) or a long double (st0)
    is not in rax: `$retval` refuses it in one line naming the type rather
    than print rax's unrelated bits as its value; `$retval:x64` still reads rax."""
    exe = compile_c("dwarf_returns.c", "-O2")
    err = io.StringIO()
    assert main(["resolve", f"r {exe}:{fn} $retval"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1, err.getvalue()
    assert err.getvalue().startswith("uprobes: error: ") and type_name in err.getvalue()
    assert main(["resolve", f"r {exe}:{fn} $retval:x64"], out=io.StringIO()) == 0
    out = io.StringIO()
    assert main(["resolve", f"r {exe}:plain $retval"], out=out) == 0
    assert "=%ax:s64" in out.getvalue(), out.getvalue()


# ------------------------------------------------------------ corrupt debug info

def _corrupted(exe: Path, section: str, start: int, length: int, dst: Path) -> Path:
    """A copy of `exe` with `length` bytes of `section`'s stored bytes
    inverted from `start` (past a compressed section's header)."""
    from elftools.elf.elffile import ELFFile

    with exe.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(section)
        offset, size = sec["sh_offset"], sec["sh_size"]
    assert start + length <= size
    data = bytearray(exe.read_bytes())
    for i in range(offset + start, offset + start + length):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    dst.chmod(0o755)
    return dst


@pytest.mark.parametrize("flags,section,start,length", [
    ("-gz=zlib", ".debug_info", 64, 64),     # inside the zlib stream: it stops inflating
    ("-O0", ".debug_abbrev", 8, 64),         # abbreviation codes the DIEs name are gone
    ("-O2", ".debug_abbrev", 64, 256),
    ("-O0", ".debug_info", 32, 64),          # DIEs with codes no table has
])
def test_corrupt_debug_info_is_one_line(compile_c: Compiler, tmp_path: Path, flags: str,
                                        section: str, start: int, length: int) -> None:
    """Debug info that does not parse (a compressed section that does not
    inflate, abbreviations or DIEs overwritten) is one `uprobes: error:` line
    naming the file, exit 2 as for other unreadable files, never a traceback."""
    bad = _corrupted(compile_c("dwarf_args.c", flags), section, start, length,
                     tmp_path / "corrupt")
    err = io.StringIO()
    assert main(["resolve", f"{bad}:visit $params"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1, err.getvalue()
    assert err.getvalue().startswith(f"uprobes: error: {bad}: cannot read its DWARF"), \
        err.getvalue()


@pytest.mark.kernel
def test_count_auto_notes_why_it_takes_ptrace(compile_c: Compiler, tracefs: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`count -e auto --if` on a float in xmm0 takes the ptrace engine, with
    the note `trace` gives (it switched without one) and the right count."""
    exe = compile_c("dwarf_args.c", "-O2")
    out, err = io.StringIO(), io.StringIO()
    assert main(["count", "-e", "auto", "--json", "--if", "f > 1", f"{exe}:floats f", "--",
                 str(exe)], out=out, err=err) == 0, err.getvalue()
    said = err.getvalue() + capsys.readouterr().err
    assert "an SSE register (a float), which the kernel's fetchargs cannot: -e auto takes " \
           "the ptrace engine" in said, said


@pytest.mark.root
def test_chrome_json_and_perfetto_show_values_by_their_type(compile_c: Compiler,
                                                            tmp_path: Path) -> None:
    """Outputs that take plain values (Chrome's JSON, Perfetto) get a float
    and an enum as the trace line prints them, not the raw bits of the
    double or the enum's number (as they were)."""
    exe = compile_c("dwarf_args.c", "-O2")
    probes = [f"{exe}:floats f d k", f"{exe}:kinds col b ch str"]
    out = io.StringIO()
    assert main(["trace", "-e", "ptrace", "--format", "chrome-json", *probes, "--", str(exe)],
                out=out) == 0
    doc = json.loads(out.getvalue())
    args = {e["name"]: e["args"] for e in doc["traceEvents"] if e["ph"] == "i"}
    assert args == {"floats": {"f": "2.5", "d": "-0.125", "k": 3},
                    "kinds": {"col": "BLUE", "b": 1, "ch": 122, "str": "hello"}}
    pf = tmp_path / "t.perfetto-trace"
    assert main(["trace", "-e", "ptrace", "--format", "perfetto", "-o", str(pf), *probes,
                 "--", str(exe)], out=io.StringIO()) == 0
    data = pf.read_bytes()
    assert b"-0.125" in data and b"BLUE" in data
