"""The vDSO, as docs/targets.md shows it: probes on the vDSO's functions in a program
that calls them through libc, traced by the ptrace engine with arguments and
return values, counted exactly; refused by the kernel engine in one line; and
chosen by `-e auto` as the engine that can. Every figure is compared with
the fixture's own account (it prints how many calls it made)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler

from uprobes.commands import main

UPROBES = [sys.executable, "-m", "uprobes"]
ROUNDS = 5
CLOCK_IDS = [0, 1, 7]  # CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME, as the fixture calls them
EINVAL = 22
PROBES = [":vdso:clock_gettime clk=%di:s32", "r :vdso:clock_gettime ret=$retval:s32"]


@pytest.fixture(scope="module")
def exe(compile_c: Compiler) -> Path:
    return compile_c("vdso_calls.c")


@pytest.fixture(scope="module")
def untraced(exe: Path) -> str:
    out = subprocess.run([str(exe), str(ROUNDS)], capture_output=True, text=True, check=True)
    assert out.stdout == f"clock_gettime={3 * ROUNDS + 1} invalid=-1 bad=0 time_ok=1\n"
    return out.stdout


def vdso_offsets() -> dict[str, int]:
    out = io.StringIO()
    assert main(["vdso", "--json"], out=out) == 0
    return {f["name"]: f["file_offset"] for f in json.loads(out.getvalue())["functions"]}


def trace(engine: str, exe: Path, tmp_path: Path, *probes: str
          ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    out = tmp_path / f"{engine}.jsonl"
    proc = subprocess.run([*UPROBES, "trace", "-e", engine, "--json", "-o", str(out), *probes,
                           "--", str(exe), str(ROUNDS)],
                          capture_output=True, text=True, timeout=60)
    docs = [json.loads(ln) for ln in out.read_text().splitlines()] if out.exists() else []
    return proc, [d for d in docs if "probe" in d]


@pytest.mark.parametrize("engine", ["ptrace", "auto"])
def test_clock_gettime_calls_ids_and_returns(engine: str, exe: Path, untraced: str,
                                             tmp_path: Path) -> None:
    """Each call with its clock id, each return with its value, in order; the
    invalid id's -EINVAL comes from the vDSO itself (libc turns it into -1).
    `auto` must pick the ptrace engine: the kernel would refuse the probe."""
    proc, events = trace(engine, exe, tmp_path, *PROBES)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == untraced
    got = [(e["kind"], e["args"]) for e in events]
    want = []
    for clk in CLOCK_IDS * ROUNDS + [-1]:
        want += [("p", {"clk": clk}), ("r", {"ret": -EINVAL if clk == -1 else 0})]
    assert got == want
    entries = {e["ip"] for e in events if e["kind"] == "p"}
    assert len(entries) == 1 and {e["func"] for e in events if e["kind"] == "r"} == entries
    # The vDSO is mapped page-aligned at a per-process address: the hit's page
    # offset is clock_gettime's offset in the image.
    [ip] = entries
    assert (ip - vdso_offsets()["clock_gettime"]) % 4096 == 0


def test_the_other_vdso_functions(exe: Path, tmp_path: Path) -> None:
    proc, events = trace("ptrace", exe, tmp_path, ":vdso:gettimeofday", ":vdso:time",
                         ":vdso:getcpu", "r :vdso:getcpu ret=$retval:s32")
    assert proc.returncode == 0, proc.stderr
    assert [(e["probe"], e["args"]) for e in events] == [
        ("uprobes/gettimeofday", {}), ("uprobes/time", {}), ("uprobes/getcpu", {}),
        ("uprobes/getcpu__return", {"ret": 0})]


def test_count_is_exact(exe: Path, untraced: str) -> None:
    proc = subprocess.run([*UPROBES, "count", "-e", "ptrace", "--json", ":vdso:clock_gettime",
                           ":vdso:time", "--", str(exe), str(ROUNDS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(untraced)
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "uprobes/clock_gettime": 3 * ROUNDS + 1, "uprobes/time": 1}


@pytest.mark.parametrize("command", ["trace", "count"])
def test_kernel_engine_refuses_in_one_line(command: str, exe: Path) -> None:
    proc = subprocess.run([*UPROBES, command, "-e", "kernel", *PROBES, "--", str(exe)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""  # the program never ran
    assert proc.stderr == (
        "uprobes: error: uprobes/clock_gettime: the kernel's uprobes cannot probe the vDSO "
        "(it has no file, so no inode to name); -e ptrace can\n")


def test_the_image_named_by_abi_as_vdsofs_does(exe: Path, untraced: str, tmp_path: Path) -> None:
    """`:vdso:/64:0xOFF` is the 64-bit image's offset, the form the vdsofs
    proposal writes (`p:clock_gettime :vdso:/64:0x8d0`); `/64:SYMBOL` too."""
    off = vdso_offsets()["clock_gettime"]
    proc, events = trace("ptrace", exe, tmp_path, f":vdso:/64:{off:#x} clk=%di:s32",
                         "r :vdso:/64:clock_gettime ret=$retval:s32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == untraced
    assert [e["args"] for e in events if e["kind"] == "p"] == [
        {"clk": clk} for clk in CLOCK_IDS * ROUNDS + [-1]]
    assert len([e for e in events if e["kind"] == "r"]) == 3 * ROUNDS + 1


@pytest.mark.parametrize("image", ["32", "x32"])
def test_an_image_not_mapped_is_one_line_naming_those_there(image: str) -> None:
    from uprobes.sys.features import vdso_images

    have = vdso_images()
    assert have[:1] == ("64",)
    proc = subprocess.run([*UPROBES, "resolve", f":vdso:/{image}:0x10"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    if image in have:  # the kernel has it, but uprobes (a 64-bit process) maps /64
        assert proc.stderr == (f"uprobes: error: vDSO image /{image} is not the one uprobes "
                               "reads without -p (/64): give -p PID of a process of that ABI\n")
    else:
        names = ", ".join(f"/{i}" for i in have)
        assert proc.stderr == (f"uprobes: error: this machine's kernel maps no vDSO image "
                               f"/{image} (it has {names})\n")
