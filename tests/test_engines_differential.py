"""The kernel engine is the ptrace engine's oracle: the same fixture,
the same probe lines, `trace --json -e kernel` and `-e ptrace` must give the
same arguments and return values for every fetcharg kind and type (and the
same registers, captured as hidden arguments), timestamps, cpus and pids aside.

The fixture runs without address-space randomisation (setarch -R) so that
stack and heap addresses, and every value derived from them, repeat.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, without_clocks
from test_ptrace_fetch import drop_stale, specs_for

from uprobes.commands import main


def trace(engine: str, specs: list[str], exe: Path) -> tuple[list[dict[str, Any]], str]:
    out = io.StringIO()
    status = main(["trace", "--json", "-e", engine, *specs, "--", "setarch", "-R", str(exe)],
                  out=out)
    assert status == 0, engine
    *events, summary = [json.loads(line) for line in out.getvalue().splitlines()]
    assert without_clocks(summary) == {"summary": {"events": len(events), "lost": 0}}, engine
    return events, engine


LAYOUT_DEPENDENT = ("reg_r10", "reg_r11")
"""Scratch registers that still hold addresses inside ld.so and libc when the
probes hit; the ptrace engine's XOL mapping, made at exec, moves the later
library mappings (by 84 KiB here), so those addresses differ by that much."""


def comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What both engines must agree on: not pid, tid, cpu, timestamps, nor
    comm (a probe whose strings fill the record loses the kernel engine's
    hidden $comm, which then reads /proc)."""
    keep = ("probe", "kind", "ip", "func", "args")
    out = [{k: e[k] for k in keep if k in e} for e in events]
    for e in out:
        e["args"] = {k: v for k, v in e["args"].items() if k not in LAYOUT_DEPENDENT}
    return out


@pytest.mark.kernel
@pytest.mark.parametrize("pie", [False, True], ids=["no-pie", "pie"])
def test_kernel_and_ptrace_engines_agree(tracefs: Path, compile_c: Compiler, pie: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    exe = compile_c("fetch_oracle.c", "-pie" if pie else "-no-pie")
    monkeypatch.setenv("ORACLE_NO_STOP", "1")
    specs = specs_for(exe, pie)
    kernel, _ = trace("kernel", specs, exe)
    ptrace, _ = trace("ptrace", specs, exe)
    assert [(e["probe"], e["kind"]) for e in ptrace] == [(e["probe"], e["kind"]) for e in kernel]
    assert len(kernel) == 8
    faulty = kernel[1]["args"]["name"] is None and 1
    for i, (k, p) in enumerate(zip(kernel, ptrace)):
        drop_stale(k["args"], p["args"], i == faulty)  # the kernel's stale per-CPU buffer
    assert comparable(ptrace) == comparable(kernel)
