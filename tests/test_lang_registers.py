"""Register spellings: the kernel's (`%di`), x86's (`%rdi`, `%edi`, `%dil`), and bad ones.

`%rdi` is the same fetch as `%di`; `%edi` is `%di` read as 32 bits (x32
unless a type no wider is given). Checked in the parser, through `resolve`,
and by tracing a fixture with known arguments on both engines, where the
x86 spellings must give the values the kernel's names give.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler

from uprobes.commands import main
from uprobes.errors import SpecError
from uprobes.lang import parse, render
from uprobes.lang.fetchargs import REGISTER_ALIASES, SUBREGISTERS


def rendered_args(args: str) -> str:
    return render(parse(f"p /bin/true:0x10 {args}")).split(" ", 2)[2]


@pytest.mark.parametrize("written,kernel", [
    ("a=%rdi", "a=%di"), ("a=%rip", "a=%ip"), ("a=%rflags:x32", "a=%flags:x32"),
    ("a=%rsp:s64", "a=%sp:s64"), ("a=+8(%rbp):string", "a=+8(%bp):string"),
    ("a=+0(+8(%rax)):u16", "a=+0(+8(%ax)):u16"),
    ("a=%eax", "a=%ax:x32"), ("a=%eax:s32", "a=%ax:s32"), ("a=%eax:u8", "a=%ax:u8"),
    ("a=%r8d", "a=%r8:x32"), ("a=%r15w", "a=%r15:x16"), ("a=%r9b:s8", "a=%r9:s8"),
    ("a=%sil", "a=%si:x8"), ("a=%al:char", "a=%ax:char"), ("a=%edi:b4@4/32", "a=%di:b4@4/32"),
    ("a=%eflags", "a=%flags:x32"),
])
def test_x86_spellings_are_the_kernels_fetches(written: str, kernel: str) -> None:
    assert rendered_args(written) == kernel
    assert rendered_args(kernel) == kernel  # and what we render is a kernel line


def test_every_alias_names_a_kernel_register() -> None:
    from uprobes.lang.fetchargs import REGISTERS
    assert set(REGISTER_ALIASES.values()) <= REGISTERS
    assert {reg for reg, _bits in SUBREGISTERS.values()} <= REGISTERS
    assert not (set(REGISTER_ALIASES) | set(SUBREGISTERS)) & REGISTERS  # never ambiguous


@pytest.mark.parametrize("args,message,detail,caret", [
    ("a=%zz", "Invalid register name", "%zz is not a register a probe can read", 2),
    ("a=%fs", "Invalid register name", "%fs is not a register", 2),
    ("a=%RDI", "Invalid register name", "lower case (%rdi)", 2),
    ("a=%ah", "Invalid register name", "%ah is bits 8-15 of %ax: write %ax:b8@8/64", 2),
    ("a=%eax:u64", "Type is wider than the register", "%eax is the low 32 bits of %ax", 7),
    ("a=%r8w:b4@0/32", "Type is wider than the register", "read it as :u16 or narrower", 7),
    ("a=+0(%edi):u8", "Part of a register cannot be dereferenced", "%di (or %rdi)", 5),
    ("a=%eax:string", "String accepts only memory argument", "", 7),
])
def test_bad_registers_say_what_is_wrong(args: str, message: str, detail: str,
                                         caret: int) -> None:
    line = f"p /bin/true:0x10 {args}"
    with pytest.raises(SpecError) as info:
        parse(line)
    err = info.value
    assert (err.message, err.pos) == (message, line.index(args) + caret)
    assert detail in err.detail
    first = err.lines()[0]
    assert first.startswith(message) and "\n" not in first


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def test_resolve_shows_the_kernel_names() -> None:
    status, out, _ = cli("resolve", "libc:malloc size=%rdi:u64 low=%edi")
    assert status == 0
    assert out.rstrip().endswith(" size=%di:u64 low=%di:x32")
    status, _, err = cli("resolve", "libc:malloc size=%rdx8:u64")
    assert status == 2
    lines = err.splitlines()
    assert lines[0] == ("uprobes: error: Invalid register name: %rdx8 is not a register a probe "
                        "can read on x86-64; use %ax %bx %cx %dx %si %di %bp %sp %r8-%r15 %ip "
                        "%flags %cs %ss %orig_ax, or %rax-style names")
    assert len(lines) == 3 and lines[2].index("^") == lines[1].index("%rdx8")


def traced(engine: str, exe: Path, *specs: str) -> list[dict[str, Any]]:
    status, out, err = cli("trace", "--json", "-e", engine, *specs, "--", "setarch", "-R",
                           str(exe), "3")  # no ASLR: %ip repeats
    assert status == 0, err
    *events, summary = [json.loads(line) for line in out.splitlines()
                        if line.startswith("{")]
    assert summary["summary"]["lost"] == 0
    return [{"probe": e["probe"], "args": e["args"]} for e in events]


@pytest.mark.kernel
def test_both_engines_read_the_x86_spellings(tracefs: Path, compile_c: Compiler) -> None:
    """target.c calls add(i, 100) and greet("world", 2) three times: the x86 spellings
    fetch what the kernel's names fetch, on the kernel engine and on ours."""
    exe = compile_c("target.c", "-fPIE", "-pie")
    x86 = [f"{exe}:add a=%rdi:s64 b=%rsi:s64 b32=%esi:s32 b8=%sil:u8 ip=%rip",
           f"{exe}:greet s=+0(%rdi):string n=%esi:u32 n16=%si:u16"]
    kernel = [f"{exe}:add a=%di:s64 b=%si:s64 b32=%si:s32 b8=%si:u8 ip=%ip",
              f"{exe}:greet s=+0(%di):string n=%si:u32 n16=%si:u16"]
    results = {(engine, names): traced(engine, exe, *specs)
               for engine in ("kernel", "ptrace")
               for names, specs in (("x86", x86), ("kernel", kernel))}
    want = results["kernel", "kernel"]
    adds = [e["args"] for e in want if e["probe"].endswith("/add")]
    assert [(a["a"], a["b"], a["b32"], a["b8"]) for a in adds] == [
        (0, 100, 100, 100), (1, 100, 100, 100), (2, 100, 100, 100)]
    greets = [e["args"] for e in want if e["probe"].endswith("/greet")]
    assert greets == [{"s": "world", "n": 2, "n16": 2}] * 3
    for key, events in results.items():
        assert events == want, key
