"""Stack walks over real stacks: the kernel captures registers and the top of
the stack at a probe (fetchargs), and the unwinder must give the known chain,
through code with and without frame pointers, and through libc's own frames."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Compiler

import uprobes
from uprobes.unwind.space import AddressSpaces
from uprobes.unwind.stack import StackCopy, unwind

# DWARF numbers of the registers the kernel fetches (System V psABI).
_REGS = {"ax": 0, "dx": 1, "cx": 2, "bx": 3, "si": 4, "di": 5, "bp": 6, "sp": 7,
         "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14,
         "r15": 15, "ip": 16}
_CAPTURE = " ".join(f"r_{n}=%{n}:x64" for n in _REGS) + " stk=+0(%sp):x64[64]"


def _walk(exe: Path, probe: str) -> list[str]:
    """Run `exe`, capture registers and stack at `probe`, and name the walk's frames."""
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        hits: list[uprobes.Event] = []
        s = uprobes.Session()

        def hit(ev: uprobes.Event) -> None:
            hits.append(ev)
            s.stop()
        s.probe(f"{exe}:{probe} {_CAPTURE}", hit)

        def go() -> None:
            proc.stdin.write("go\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        s.attach(proc.pid, duration=60, ready=go)  # the hit stops it: the bound is for no hit
        proc.stdout.readline()  # its result: the calls are made
        assert hits, "no hit"
        ev = hits[0]
        regs = {num: int(ev.args[f"r_{name}"]) for name, num in _REGS.items()}  # type: ignore[arg-type]
        words = ev.args["stk"]
        assert isinstance(words, list)
        stack = StackCopy(regs[7], b"".join(int(w).to_bytes(8, "little") for w in words))
        spaces = AddressSpaces()
        addrs = unwind(regs, stack, spaces.rule_finder(proc.pid))
        return [spaces.frame(proc.pid, a, return_address=i > 0).symbol or hex(a)
                for i, a in enumerate(addrs)]
    finally:
        if proc.poll() is None:
            proc.stdin.write("done\n")
            proc.stdin.flush()
            proc.wait(timeout=120)


@pytest.mark.parametrize("flags", [("-O2", "-fomit-frame-pointer"),
                                   ("-O0", "-fno-omit-frame-pointer")])
def test_walks_our_own_frames(tracefs: Path, compile_c: Compiler, flags: tuple[str, ...]) -> None:
    exe = compile_c("stacks.c", *flags)
    names = _walk(exe, "leaf")
    assert names[:4] == ["leaf", "mid", "outer", "main"]
    assert "__libc_start_main@@GLIBC_2.34" in names or "__libc_start_main" in names or \
        any(n.startswith("__libc_start") for n in names[4:]), names


def test_walks_through_libc_frames_without_frame_pointers(tracefs: Path,
                                                          compile_c: Compiler) -> None:
    exe = compile_c("stacks.c", "-O2", "-fomit-frame-pointer")
    names = _walk(exe, "by_value")
    assert names[0] == "by_value"
    assert "main" in names, names
    between = names[1:names.index("main")]
    assert any("qsort" in n for n in between), names  # libc's qsort (and its helpers)
