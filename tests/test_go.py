"""Go binaries (gc toolchain): names from `.gopclntab` when the symbol table
is stripped, `$argN` in Go's register ABI, and return probes on the
functions' own `ret`s, which Go's stack growth (it copies the stack and
checks every return address on it) never notices. The fixture recurses 300
deep through 512-byte frames, so the runtime grows the stack several times
under the probes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES, need

from uprobes.commands import main
from uprobes.elf.golang import go_symbols, go_version
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable

ENGINES = ("kernel", "ptrace")
FUNCS = ("main.fib", "main.grow", "main.main")


def _go_build(out: Path, *flags: str) -> Path:
    need(shutil.which("go") is not None, "the Go toolchain (golang-go) is not installed")
    env = dict(os.environ, GOCACHE=str(out / "gocache"), GOPATH=str(out / "gopath"),
               GO111MODULE="off", HOME=str(out), CGO_ENABLED="0")
    exe = out / ("gofib" + ("-stripped" if flags else ""))
    subprocess.run(["go", "build", *flags, "-o", str(exe), str(FIXTURES / "go" / "gofib.go")],
                   check=True, capture_output=True, text=True, env=env, timeout=300)
    return exe


@pytest.fixture(scope="module")
def gofib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(with its symbol table, stripped with -ldflags=-s -w)."""
    out = tmp_path_factory.mktemp("go")
    return _go_build(out), _go_build(out, "-ldflags=-s -w")


def test_stripped_go_binary_named_from_gopclntab(gofib: tuple[Path, Path]) -> None:
    full, stripped = gofib
    assert ElfImage.open(stripped).section(".symtab") is None
    with_symtab = SymbolTable.load(ElfImage.open(full))
    from_pclntab = SymbolTable.load(ElfImage.open(stripped))
    assert from_pclntab.sources == ("gopclntab",)
    assert go_version(ElfImage.open(stripped)) >= (1, 17)  # type: ignore[operator]
    for name in FUNCS:
        (a,), (b,) = with_symtab.lookup(name), from_pclntab.lookup(name)
        assert b.link_addr == a.link_addr
        assert a.size <= b.size < a.size + 64  # the table's size runs to the next function
    # every function of the table is in .symtab, at the same address (a name
    # may be there twice: a function and its ABI wrapper; .symtab calls
    # assembly functions NAME.abi0)
    go = {(s.name, s.link_addr) for s in go_symbols(ElfImage.open(full))}
    symtab = {(s.name.removesuffix(".abi0"), s.link_addr) for s in with_symtab if s.is_function}
    assert len(go) > 1000 and len(go - symtab) < 0.01 * len(go), sorted(go - symtab)[:5]


def test_list_a_stripped_go_binary(gofib: tuple[Path, Path]) -> None:
    out = io.StringIO()
    assert main(["list", "--json", str(gofib[1]), "main.*"], out=out) == 0
    names = [f["name"] for f in json.loads(out.getvalue())["functions"]]
    assert sorted(names) == list(FUNCS)


def _trace(engine: str, exe: Path, *lines: str, capfd: pytest.CaptureFixture[str]
           ) -> list[dict[str, object]]:
    out = io.StringIO()
    status = main(["trace", "--json", "-e", engine, *lines, "--", str(exe)], out=out)
    assert status == 3  # the program's own exit status
    assert capfd.readouterr().out == "610 33630\n"  # and its own output
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert docs[-1]["summary"]["lost"] == 0  # type: ignore[index]
    return docs[:-1]


@pytest.mark.parametrize("engine", ENGINES)
def test_return_probes_through_stack_growth(tracefs: Path, gofib: tuple[Path, Path],
                                            engine: str, capfd: pytest.CaptureFixture[str]
                                            ) -> None:
    exe = gofib[1]
    docs = _trace(engine, exe, f"r {exe}:main.grow ret=%ax:s64", capfd=capfd)
    assert len(docs) == 301  # grow(300) .. grow(0): one return each
    rets = [d["args"]["ret"] for d in docs]  # type: ignore[index]
    assert rets[0] == 0 and rets[-1] == 33630  # innermost first; the outermost's is printed


@pytest.mark.parametrize("engine", ENGINES)
def test_arg_n_is_go_register_abi(tracefs: Path, gofib: tuple[Path, Path], engine: str,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    exe = gofib[1]
    docs = _trace(engine, exe, f"{exe}:main.grow depth=$arg1:s64", f"{exe}:main.fib n=$arg1:s64",
                  capfd=capfd)
    grow = [d["args"]["depth"] for d in docs if d["probe"] == "uprobes/main_grow"]  # type: ignore[index]
    fib = [d["args"]["n"] for d in docs if d["probe"] == "uprobes/main_fib"]  # type: ignore[index]
    # A call that grows the stack enters the function twice (the runtime
    # re-runs its prologue after the copy): every depth at least once, in order.
    assert sorted(set(grow)) == list(range(301)) and grow[0] == 300
    assert fib[0] == 15 and len(fib) >= 1973 and set(fib) == set(range(16))  # 2 fib(16) - 1 calls


def test_resolve_shows_the_registers(gofib: tuple[Path, Path]) -> None:
    out = io.StringIO()
    exe = gofib[1]
    assert main(["resolve", f"{exe}:main.fib n=$arg1 m=+8($arg2)",
                 f"{gofib[0]}:internal/cpu.cpuid.abi0 a=$arg1 b=$arg2"], out=out) == 0
    fib, cpuid = out.getvalue().splitlines()
    assert fib.split()[-2:] == ["n=%ax", "m=+8(%bx)"]
    assert cpuid.split()[-2:] == ["a=$stack1", "b=$stack2"]  # assembly: Go's stack ABI0
