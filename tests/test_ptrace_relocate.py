"""Displaced instructions (uprobes.engines.tracee.relocate), checked by running them.

tests/fixtures/reloc.c has one function per instruction kind, each starting
with that kind.  A minimal tracer here (uprobes.sys.ptrace and
uprobes.sys.procmem) puts an int3 on every one, and on each hit does what
the engine's hit path does: emulate, or send the thread through the slot.
The program's output must be that of an untraced run, and every hit
counted.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Compiler, need

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.tracee.relocate import SLOT_SIZE, SlotPlan, UnsupportedInstruction, plan
from uprobes.resolve.paths import find_library
from uprobes.sys import ptrace
from uprobes.sys.procmem import ProcessMemory

_REG_NAMES = [name for name, _ in ptrace.UserRegs._fields_]


@dataclass
class Run:
    output: list[str]
    status: int
    hits: Counter[str] = field(default_factory=Counter)
    refused: dict[str, str] = field(default_factory=dict)
    plans: dict[str, SlotPlan] = field(default_factory=dict)


def _start(exe: Path) -> tuple[subprocess.Popen[str], dict[str, int], dict[str, int]]:
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    syms: dict[str, int] = {}
    areas: dict[str, int] = {}
    for line in proc.stdout:
        words = line.split()
        if words == ["ready"]:
            break
        if words[0] == "sym":
            syms[words[1]] = int(words[2], 16)
        else:
            areas[words[0]] = int(words[1], 16)
    return proc, syms, areas


def _calls(output: list[str]) -> dict[str, int]:
    return {ln.split()[1]: int(ln.split()[2]) for ln in output if ln.startswith("calls ")}


def run_untraced(exe: Path) -> Run:
    proc, _, _ = _start(exe)
    out, _ = proc.communicate("go\n", timeout=120)
    return Run(out.splitlines(), proc.returncode)


def run_traced(exe: Path, area: str, force_slot: bool = False, boost: bool = True) -> Run:
    """Probe every function's first instruction; on each hit emulate (unless
    `force_slot` and the plan has slot code: the emulation-fault fallback),
    run the boosted slot, or single-step the slot, as the engine's hit path does."""
    proc, syms, areas = _start(exe)
    run = Run([], -1)
    by_addr: dict[int, tuple[str, SlotPlan]] = {}
    ptrace.seize(proc.pid, 0)
    try:
        ptrace.interrupt(proc.pid)
        assert ptrace.stop_event(ptrace.wait_task(proc.pid)) == ptrace.EVENT_STOP
        mem = ProcessMemory(proc.pid)
        for i, (name, addr) in enumerate(syms.items()):
            original = mem.read(addr, 16)
            try:
                p = plan(original, addr, areas[area] + i * SLOT_SIZE, boost)
            except UnsupportedInstruction as err:
                run.refused[name] = str(err)
                continue
            mem.write(p.slot_addr, p.code)
            mem.write(addr, b"\xcc")
            by_addr[addr] = (name, p)
            run.plans[name] = p
        ptrace.cont(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
        regs = ptrace.UserRegs()
        while True:
            status = ptrace.wait_task(proc.pid)
            if ptrace.exited(status):
                run.status = ptrace.exit_code(status)
                break
            sig = ptrace.stop_signal(status)
            if sig != signal.SIGTRAP or ptrace.stop_event(status):
                ptrace.cont(proc.pid, 0 if ptrace.stop_event(status) else sig)
                continue
            ptrace.getregs(proc.pid, regs)
            name, p = by_addr[regs.rip - 1]
            run.hits[name] += 1
            regs.rip -= 1
            if force_slot and p.code:
                regs.rip = p.slot_addr
            elif not p.emulate(regs, mem):
                regs.rip = p.slot_addr
                if not p.boosted:
                    ptrace.setregs(proc.pid, regs)
                    ptrace.singlestep(proc.pid)
                    assert ptrace.stop_signal(ptrace.wait_task(proc.pid)) == signal.SIGTRAP
                    ptrace.getregs(proc.pid, regs)
                    p.after_step(regs)
                    assert p.original_rip(p.slot_addr) == p.insn_addr
                    assert regs.rip == p.insn_addr + p.insn_len, name
            ptrace.setregs(proc.pid, regs)
            ptrace.cont(proc.pid)
        mem.close()
    finally:
        if proc.poll() is None and run.status == -1:
            proc.kill()
    assert proc.stdout is not None
    run.output = proc.stdout.read().splitlines()
    proc.stdout.close()
    return run


@pytest.fixture(scope="module")
def reloc_exe(compile_c: Compiler) -> Path:
    return compile_c("reloc.c")


@pytest.fixture(scope="module")
def untraced(reloc_exe: Path) -> Run:
    run = run_untraced(reloc_exe)
    assert run.status == 0
    return run


def _need_ptrace() -> None:
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    need(not scope.exists() or scope.read_text().strip() in "01" or os.geteuid() == 0,
         "ptrace_scope forbids attaching to our own child")


@pytest.mark.parametrize("force_slot, boost", [(False, True), (True, True), (False, False)],
                         ids=["emulate", "slot-fallback", "unboosted"])
def test_every_kind_runs_like_the_original(reloc_exe: Path, untraced: Run,
                                           force_slot: bool, boost: bool) -> None:
    _need_ptrace()
    run = run_traced(reloc_exe, "slot_area", force_slot, boost)
    assert run.refused == {}
    # Every plan has runnable slot code (for the emulated ones: what an orphaned
    # int3 runs once the tracer is gone); "slot-fallback" runs all of it.
    assert [n for n, p in run.plans.items() if not p.code] == []
    assert run.status == 0
    assert run.output == untraced.output
    assert dict(run.hits) == _calls(untraced.output)
    kinds = {name: p.kind for name, p in run.plans.items()}
    emulated = {n for n, k in kinds.items() if k == "emulated"}
    assert emulated == {
        "f_call", "f_call_ra", "f_call_reg", "f_call_mem", "f_call_rsp8", "f_jmp_mem",
        "f_jmp_reg", "f_jmp8", "f_jmp32", "f_jg32", "f_loop", "f_jrcxz", "f_ret", "f_ret8",
        "f_push", "f_push_r12", "f_push_rsp", "f_push_imm8", "f_push_imm32", "f_nop", "f_nopl",
        "f_endbr", "f_prologue"} | {n for n in kinds if n.startswith("j")}
    rest = "boosted" if boost else "stepped"
    assert {n: k for n, k in kinds.items() if n not in emulated} == {
        n: "boosted" if n == "f_rep" else rest for n in kinds if n not in emulated}


def test_far_slot_uses_a_scratch_register_or_refuses(reloc_exe: Path, untraced: Run) -> None:
    """A slot more than 2 GiB away: RIP-relative operands go through a scratch
    register saved below the red zone; what cannot be done so is refused."""
    _need_ptrace()
    run = run_traced(reloc_exe, "far_area")
    far = run.plans["f_load"].slot_addr - run.plans["f_load"].insn_addr
    need(abs(far) >= 1 << 31, "the fixture's mmap landed within 2 GiB of its text")
    assert set(run.refused) == {"f_call_mem", "f_jmp_mem", "f_push_mem"}
    assert "cannot reach its RIP-relative operand" in run.refused["f_call_mem"]
    assert run.status == 0
    assert run.output == untraced.output
    expected = _calls(untraced.output)
    assert dict(run.hits) == {n: c for n, c in expected.items() if n not in run.refused}
    for name in ("f_load", "f_lea", "f_store", "f_cmp_imm", "f_mul", "f_xadd", "f_movsd"):
        assert run.plans[name].boosted and len(run.plans[name].code) > 30  # the scratch form
    # Every slot run from 2 GiB away (branches then leave by an absolute jmp).
    slots = run_traced(reloc_exe, "far_area", force_slot=True)
    assert (slots.output, slots.status, slots.hits) == (run.output, 0, run.hits)


def _regs(**values: int) -> SimpleNamespace:
    regs = SimpleNamespace(**{name: 0 for name in _REG_NAMES})
    for name, value in values.items():
        setattr(regs, name, value)
    return regs


def test_emulation_that_faults_changes_nothing(running_process: subprocess.Popen[str]) -> None:
    """A push/call/ret whose stack access faults (here: an unmapped stack) leaves the
    registers alone and says so, so the engine runs the real instruction in the slot."""
    with ProcessMemory(running_process.pid) as mem:
        for code in ("55", "e800100000", "c3", "ff1500100000"):
            p = plan(bytes.fromhex(code) + bytes(12), 0x400000, 0x401000)
            regs = _regs(rip=0x400001, rsp=0x10)
            before = vars(regs).copy()
            assert p.emulate(regs, mem) is False
            assert vars(regs) == before
            assert p.boosted and p.code


@pytest.mark.parametrize("code, reason", [
    ("cc", "it is a breakpoint already"),
    ("0f05", "system call"),
    ("0f0b", "faults by design"),
    ("f4", "faults in user space"),
    ("cd80", "int n"),
    ("9d", "popf"),
    ("cb", "far return"),
    ("8ed0", "mov/pop ss"),
    ("e4 60", "port-I/O"),
    ("0f20c0", "privileged"),
    ("66e800000000", "operand-size prefix"),
    ("66c3", "operand-size prefix"),
    ("c7f800000000", "transactional"),
    ("06", "do not decode"),
    ("488b05", "do not decode"),           # truncated: the disp32 is missing
])
def test_refusals_say_why(code: str, reason: str) -> None:
    with pytest.raises(UnsupportedInstruction, match=reason):
        plan(bytes.fromhex(code.replace(" ", "")), 0x400000, 0x401000)


def test_original_rip_maps_slot_start_and_jump_back() -> None:
    p = plan(bytes.fromhex("488b0500100000") + bytes(9), 0x400000, 0x401000)
    assert p.original_rip(0x401000) == 0x400000
    assert p.original_rip(0x401007) == 0x400007       # at the jmp back
    assert p.original_rip(0x401003) is None           # inside the instruction
    regs = _regs(rip=0x401007)
    p.after_step(regs)
    assert regs.rip == 0x400007
    assert p.text == "mov rax,[rip+0x1000]" and p.insn_len == 7


def test_libc_function_entries() -> None:
    """Plan every distinct function entry of libc (slot 1 MiB below it); print the
    statistics the module docstring quotes."""
    path = find_library("c")
    assert path is not None
    base = 0x7F0000000000
    kinds: Counter[str] = Counter()
    with ElfImage.open(path) as image:
        entries = sorted({s.link_addr for s in SymbolTable.load(image).functions()})
        for link_addr in entries:
            file_offset = image.link_to_file_offset(link_addr)
            if not image.is_executable_file_offset(file_offset):
                kinds["not code"] += 1
                continue
            try:
                p = plan(image.read_file(file_offset, 16), base + link_addr, base - (1 << 20))
            except UnsupportedInstruction:
                kinds["refused"] += 1
                continue
            kinds[p.kind] += 1
            assert len(p.code) <= SLOT_SIZE
    print(f"\nlibc {path}: {len(entries)} function entries: " +
          ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    assert kinds["stepped"] == 0
    assert kinds["emulated"] + kinds["boosted"] >= 0.99 * len(entries)
