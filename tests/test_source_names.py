"""C++ and Rust names as their source writes them: demangled against the
references (c++filt, rustfilt) on every symbol of real binaries, shown by
`list`, `resolve` and the traces, and probed by name, with or without a
parameter list, by glob, overloads and template instances told apart; on
tests/fixtures/cxx_names.cc and rust_names.rs (legacy and v0 manglings),
on both engines."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, RustCompiler

from uprobes.commands import main
from uprobes.elf.demangle import demangle, language
from uprobes.elf.image import ElfImage
from uprobes.elf.source_names import mangled_needle, source_name
from uprobes.elf.symbols import SymbolTable
from uprobes.lang.numbers import is_good_name

UPROBES = [sys.executable, "-m", "uprobes"]
LIBSTDCXX = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")
ROUNDS = 4
ENGINES = [pytest.param("kernel", marks=pytest.mark.kernel), "ptrace"]
COUNTER = "shapes::Counter"
METHODS = [f"{COUNTER}::add(long)", f"{COUNTER}::add(long, long)", f"{COUNTER}::add(double)",
           f"{COUNTER}::operator+=(long)", f"{COUNTER}::operator<(shapes::Counter const&) const"]


@pytest.fixture(scope="module")
def cxx(compile_c: Compiler) -> Path:
    return compile_c("cxx_names.cc")


@pytest.fixture(scope="module")
def rust(compile_rust: RustCompiler) -> dict[str, Path]:
    # legacy is rustc's default (naming it takes -Z unstable-options)
    return {"legacy": compile_rust("rust_names.rs"),
            "v0": compile_rust("rust_names.rs", "-C", "symbol-mangling-version=v0")}


def names_of(path: Path) -> list[str]:
    return sorted({s.name for s in SymbolTable.load(ElfImage.open(path), use_cache=False)})


def filtered(argv: list[str], names: list[str]) -> list[str]:
    """What a reference demangler prints for each name, one per line."""
    out = subprocess.run(argv, input="".join(n + "\n" for n in names), capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == len(names)
    return out


def uprobes(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UPROBES, *argv], capture_output=True, text=True, timeout=120)


def run_main(*argv: str) -> str:
    out = io.StringIO()
    assert main(list(argv), out=out) == 0
    return out.getvalue()


def offsets(path: Path) -> dict[str, int]:
    doc = json.loads(run_main("list", str(path), "--json"))
    return {f["demangled"] or f["name"]: f["file_offset"] for f in doc["functions"]}


# ---------------------------------------------------------------- the demanglers

@pytest.mark.parametrize("which", ["libstdc++", "fixture"])
def test_cxx_names_are_cxxfilts_on_every_symbol(which: str, cxx: Path) -> None:
    """Every C++ name of libstdc++ (thousands) and of the fixture, demangled
    as `c++filt -i` prints it; its base (no parameters, no return type) as
    `c++filt -i -p` does; its label is the demangled text less a return type."""
    path = LIBSTDCXX if which == "libstdc++" else cxx
    names = [n for n in names_of(path) if language(n) == "c++"]
    assert len(names) > (5000 if which == "libstdc++" else 8)
    full, base = filtered(["c++filt", "-i"], names), filtered(["c++filt", "-i", "-p"], names)
    wrong = []
    for name, want, want_base in zip(names, full, base):
        src = source_name(name)
        if (src is None or demangle(name) != want or src.base != want_base
                or not (want == src.label or want.endswith(" " + src.label))):
            wrong.append((name, want, src))
    assert wrong == []


@pytest.mark.parametrize("mangling", ["legacy", "v0"])
def test_rust_names_are_rustfilts_on_every_symbol(mangling: str, rust: dict[str, Path]) -> None:
    """Every Rust name of the fixture (its own and std's) as rustfilt
    (rustc-demangle) prints it; and as libiberty's own Rust demangler
    (`c++filt -s rust`) does, but for the `.0` LLVM leaves on some v0
    statics, which libiberty drops."""
    assert shutil.which("rustfilt"), "rustfilt is required (./bootstrap test installs it)"
    names = [n for n in names_of(rust[mangling]) if language(n) == "rust"]
    assert len(names) > 100
    ours_mangled = [n for n in names if "10rust_names" in n]
    assert ours_mangled and all(n.startswith("_R" if mangling == "v0" else "_ZN")
                                for n in ours_mangled)
    ours = [demangle(n) for n in names]
    assert [(n, d) for n, d, want in zip(names, ours, filtered(["rustfilt"], names))
            if d != want] == []
    libiberty = filtered(["c++filt", "-i", "-s", "rust"], names)
    assert [(n, d) for n, d, want in zip(names, ours, libiberty)
            if d != want and not (d is not None and re.fullmatch(rf"{re.escape(want)}\.\d+", d))
            ] == []


def test_a_lookup_demangles_only_what_can_match(cxx: Path, rust: dict[str, Path]) -> None:
    """A lookup before the index is built demangles only the names holding the
    name's last identifier as mangled; it finds what the whole index finds,
    for the label and the base of every function (every 7th of libstdc++)."""
    for path, step in ((cxx, 1), (rust["legacy"], 1), (rust["v0"], 1), (LIBSTDCXX, 7)):
        table = SymbolTable.load(ElfImage.open(path), use_cache=False)
        fresh, indexed = SymbolTable(list(table)), SymbolTable(list(table))
        indexed.lookup_source("x::y")  # builds its index
        names = sorted({n for s in table.functions()[::step] if (src := s.source_name)
                        for n in (src.label, src.base) if mangled_needle(n)})
        assert len(names) > 5
        for name in names:
            assert fresh.lookup_source(name) == indexed.lookup_source(name), name
        assert fresh._by_source is None


# ---------------------------------------------------------------- list and resolve

def test_list_shows_and_globs_demangled_names(cxx: Path) -> None:
    text = run_main("list", str(cxx))
    for name in [*METHODS, "shapes::twice<long>(long)", "shapes::twice<double>(double)",
                 "shapes::inner::inner_step(long)", "(anonymous namespace)::hidden(long)"]:
        assert re.search(rf"^{re.escape(name)}\s+0x", text, re.M), name
    assert "_ZN6shapes" not in text
    assert sorted(offsets_in(run_main("list", str(cxx), f"{COUNTER}::*"))) == sorted(METHODS)
    assert offsets_in(run_main("list", str(cxx), "*inner*")) == ["shapes::inner::inner_step(long)"]
    assert offsets_in(run_main("list", str(cxx), "_ZN6shapes5inner*")) == [
        "shapes::inner::inner_step(long)"]  # the mangled name still globs


def offsets_in(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^(\S.*?)\s+0x[0-9a-f]+\s+\d+$", text, re.M)]


@pytest.mark.parametrize(("spec", "label"), [
    (f"{COUNTER}::add(long, long)", f"{COUNTER}::add(long, long)"),
    (f"{COUNTER}::add(long,long)", f"{COUNTER}::add(long, long)"),
    (f"{COUNTER}::add(double)", f"{COUNTER}::add(double)"),
    (f"{COUNTER}::operator+=", f"{COUNTER}::operator+=(long)"),
    (f"{COUNTER}::operator<", f"{COUNTER}::operator<(shapes::Counter const&) const"),
    ("shapes::twice<long>", "shapes::twice<long>(long)"),
    ("shapes::inner::inner_step", "shapes::inner::inner_step(long)"),
    ("(anonymous namespace)::hidden", "(anonymous namespace)::hidden(long)"),
    ("_ZN6shapes7Counter3addEll", f"{COUNTER}::add(long, long)"),
])
def test_a_name_resolves_to_its_one_function(spec: str, label: str, cxx: Path) -> None:
    [doc] = [json.loads(line) for line in run_main("resolve", "--json", f"{cxx}:{spec}")
             .splitlines()]
    assert (doc["probe"], doc["file_offset"]) == (f"uprobes/{label}", offsets(cxx)[label])
    event = doc["kernel_line"].split()[0].split("/", 1)[1]
    assert is_good_name(event) and len(event) < 64  # the kernel's event name is a C identifier


@pytest.mark.parametrize(("spec", "candidates"), [
    (f"{COUNTER}::add", [f"{COUNTER}::add(long)", f"{COUNTER}::add(long, long)",
                         f"{COUNTER}::add(double)"]),
    ("shapes::twice", ["shapes::twice<long>(long)", "shapes::twice<double>(double)"]),
])
def test_an_ambiguous_name_is_one_line_listing_its_candidates(
        spec: str, candidates: list[str], cxx: Path) -> None:
    proc = uprobes("trace", f"{cxx}:{spec}", "--", str(cxx))
    assert proc.returncode == 2 and proc.stdout == ""
    at = offsets(cxx)
    listed = ", ".join(f"{c} at 0x{at[c]:x}" for c in sorted(candidates, key=at.__getitem__))
    assert proc.stderr == (
        f"uprobes: error: symbol '{spec}' is ambiguous in {cxx}: it names {len(candidates)} "
        f"functions: {listed}; name one with its parameters, its symbol or as {cxx}:0xOFFSET\n")


def test_source_names_with_lines_and_variables(cxx: Path, tmp_path: Path) -> None:
    """`FUNC:+N` and arguments by name take a C++ name as a symbol does."""
    [doc] = [json.loads(run_main("resolve", "--json", f"{cxx}:{COUNTER}::add(long, long):+0"))]
    assert doc["file_offset"] == offsets(cxx)[f"{COUNTER}::add(long, long)"]
    proc = uprobes("resolve", f"{cxx}:{COUNTER}::add:+0")
    assert proc.returncode == 2 and "it names 3 functions: " in proc.stderr
    proc, hits = trace_json("ptrace", cxx, tmp_path, f"{cxx}:{COUNTER}::add(long, long) k times")
    assert proc.returncode == 0, proc.stderr
    assert [h["args"] for h in hits] == [{"k": i, "times": 2} for i in range(ROUNDS)]


def test_a_name_not_there_suggests_near_ones(cxx: Path) -> None:
    proc = uprobes("resolve", f"{cxx}:shapes::Counter::ad")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"uprobes: error: symbol 'shapes::Counter::ad' not found in "
                                  f"{cxx} (did you mean: shapes::Counter::add")
    assert proc.stderr.count("\n") == 1


def test_rust_names_resolve_in_both_manglings(rust: dict[str, Path]) -> None:
    for mangling, exe in rust.items():
        step = json.loads(run_main("resolve", "--json",
                                   f"{exe}:rust_names::shapes::inner::inner_step"))
        assert step["probe"] == "uprobes/rust_names::shapes::inner::inner_step", mangling
        add = json.loads(run_main("resolve", "--json", f"{exe}:rust_names::shapes::Counter::add"))
        assert add["file_offset"] == offsets(exe)[
            "<rust_names::shapes::Counter>::add" if mangling == "v0"
            else "rust_names::shapes::Counter::add"]
        proc = uprobes("resolve", f"{exe}:rust_names::shapes::twice")
        assert proc.returncode == 2 and "it names 2 functions" in proc.stderr
    # v0 tells the two instances apart by name; legacy only by hash
    u32 = json.loads(run_main("resolve", "--json",
                              f"{rust['v0']}:rust_names::shapes::twice::<u32>"))
    assert u32["file_offset"] == offsets(rust["v0"])["rust_names::shapes::twice::<u32>"]
    proc = uprobes("resolve", f"{rust['legacy']}:rust_names::shapes::twice")
    assert re.search(r"twice \[_ZN10rust_names6shapes5twice17h[0-9a-f]{16}E\] at 0x", proc.stderr)


# ---------------------------------------------------------------- traces, both engines

def trace_json(engine: str, exe: Path, tmp_path: Path, *probes: str, extra: tuple[str, ...] = ()
               ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    out = tmp_path / f"{engine}.jsonl"
    proc = uprobes("trace", "-e", engine, "--json", "-o", str(out), *extra, *probes,
                   "--", str(exe), str(ROUNDS))
    docs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, [d for d in docs if "probe" in d]


@pytest.mark.parametrize("engine", ENGINES)
def test_cxx_probes_by_name_on_both_engines(engine: str, cxx: Path, tmp_path: Path) -> None:
    untraced = subprocess.run([str(cxx), str(ROUNDS)], capture_output=True, text=True)
    proc, hits = trace_json(engine, cxx, tmp_path, f"{cxx}:{COUNTER}::add(long) k=%si:s64",
                            f"{cxx}:{COUNTER}::add(long, long) t=%dx:s64",
                            f"r {cxx}:shapes::twice<long> v=$retval:s64",
                            f"{cxx}:(anonymous namespace)::hidden x=%di:s64", extra=("--stack",))
    assert (proc.returncode, proc.stdout) == (0, untraced.stdout), proc.stderr
    got = [(h["probe"], h["args"]) for h in hits]
    want = []
    for i in range(ROUNDS):
        want += [(f"uprobes/{COUNTER}::add(long)", {"k": i}),
                 (f"uprobes/{COUNTER}::add(long, long)", {"t": 2}),
                 ("uprobes/shapes::twice<long>(long)%return", {"v": 2 * i}),
                 ("uprobes/(anonymous namespace)::hidden(long)", {"x": i})]
    assert got == want
    # stacks name their frames the same way
    assert {h["stack"][0]["symbol"] for h in hits if h["kind"] == "p"} == {
        f"{COUNTER}::add(long)", f"{COUNTER}::add(long, long)",
        "(anonymous namespace)::hidden(long)"}


@pytest.mark.parametrize("engine", ENGINES)
def test_cxx_glob_counts_each_overload(engine: str, cxx: Path) -> None:
    proc = uprobes("count", "-e", engine, "--json", f"{cxx}:{COUNTER}::*", "--",
                   str(cxx), str(ROUNDS))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {f"uprobes/{m}": ROUNDS for m in METHODS}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mangling", ["legacy", "v0"])
def test_rust_probes_by_name_on_both_engines(engine: str, mangling: str, rust: dict[str, Path],
                                             tmp_path: Path) -> None:
    exe = rust[mangling]
    proc, hits = trace_json(engine, exe, tmp_path,
                            f"{exe}:rust_names::shapes::inner::inner_step x=%di:u64",
                            f"r {exe}:rust_names::shapes::Counter::add n=$retval:u64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"rounds={ROUNDS} ")
    add = ("<rust_names::shapes::Counter>::add" if mangling == "v0"
           else "rust_names::shapes::Counter::add")
    assert [(h["probe"], h["args"]) for h in hits] == [
        hit for i in range(ROUNDS) for hit in (
            (f"uprobes/{add}%return", {"n": sum(range(i + 1))}),
            ("uprobes/rust_names::shapes::inner::inner_step", {"x": i}))]


def test_chrome_and_perfetto_traces_name_slices_by_source_name(cxx: Path,
                                                               tmp_path: Path) -> None:
    probes = [f"{cxx}:shapes::inner::inner_step", f"r {cxx}:shapes::inner::inner_step"]
    out = tmp_path / "trace.json"
    proc = uprobes("trace", "-e", "ptrace", "--format", "chrome-json", "-o", str(out), *probes,
                   "--", str(cxx), str(ROUNDS))
    assert proc.returncode == 0, proc.stderr
    slices = [e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in slices] == ["shapes::inner::inner_step(long)"] * ROUNDS
    native = tmp_path / "trace.perfetto-trace"
    proc = uprobes("trace", "-e", "ptrace", "--format", "perfetto", "-o", str(native), *probes,
                   "--", str(cxx), str(ROUNDS))
    assert proc.returncode == 0, proc.stderr
    data = native.read_bytes()
    assert b"shapes::inner::inner_step(long)" in data and b"_ZN6shapes" not in data
