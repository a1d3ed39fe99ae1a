"""Breakpoint sites: an int3 over a probed instruction, and its slot.

A `Site` is one probe (or an internal breakpoint, such as the dynamic
linker's rendezvous) at one run-time address of one address space. It is
placed the way the kernel's install_breakpoint() does it, from user space:
the original bytes come from the file (16, as copy_insn() reads), memory
must still hold them (an int3 there that the file lacks belongs to someone
else: a kernel uprobe, a debugger; we never stack on it), the slot is
written first, then the one-byte int3 through /proc/PID/mem (a private CoW
copy of the page, as the kernel makes). Removal restores the byte only
where our int3 still is (verify_opcode).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uprobes.engines.tracee.relocate import SlotPlan
from uprobes.errors import EngineError, UprobesError
from uprobes.model.registry import Probe
from uprobes.sys.procmem import MemoryFault, ProcessMemory

if TYPE_CHECKING:
    from uprobes.sys.procfs import Mapping

INT3 = 0xCC
INSN_MAX = 16


@dataclass(eq=False)
class Site:
    """An int3 we own. `probe` is None for internal breakpoints (`internal`
    names them). `file_base` is the run-time address of file offset 0 of
    the probed file in this process (what `@+OFF` is relative to)."""

    runtime_addr: int
    probe: Probe | None
    original: bytes
    plan: SlotPlan
    slot_addr: int
    file_base: int
    internal: str = ""
    ret_func: int | None = None  # a return probe on this `ret`: its function's entry
    ret_in_place: bool = False  # on a return that is no `ret` (a py: function's): seen before

    def in_slot(self, runtime_addr: int) -> bool:
        return self.slot_addr <= runtime_addr < self.slot_addr + max(len(self.plan.code), 1)


@dataclass(frozen=True)
class GuardTrap:
    """The int3 in a jump's code that stops only the calls a `py:` guard
    keeps (trapfree/pyguard.py): a hit of `probe` at `runtime_addr`, the
    probed instruction; the thread goes on right after the int3. `ret`: a
    return site that is no `ret` (seen before it, as `Site.ret_in_place`)."""

    probe: Probe
    runtime_addr: int
    file_base: int
    ret: bool


class PlacementRefused(EngineError):
    """This probe cannot go at this address in this process (the reason says why)."""


_file_bytes: dict[tuple[int, int, int, int, int, int], bytes] = {}


def original_bytes(path: str, dev: int, ino: int, file_offset: int) -> bytes:
    """INSN_MAX bytes of the file at `file_offset` (cached per version of the
    file and offset: an inode rewritten, or reused by another file, is read
    again, not taken for the bytes it held)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise PlacementRefused(f"{path} was replaced since it was resolved")
            key = (dev, ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, file_offset)
            data = _file_bytes.get(key)
            if data is None:
                data = _file_bytes[key] = os.pread(fd, INSN_MAX, file_offset)
        finally:
            os.close(fd)
    except OSError as e:
        raise PlacementRefused(f"cannot read {path}: {e.strerror}") from None
    return data


def check_memory(mem: ProcessMemory, runtime_addr: int, original: bytes, insn_len: int,
                 ours: dict[int, Site], what: str) -> None:
    """Memory at `runtime_addr` must still hold the original instruction
    (our own int3s of neighbouring probes aside)."""
    try:
        current = mem.read(runtime_addr, insn_len)
    except MemoryFault:
        raise PlacementRefused(f"{what}: {runtime_addr:#x} is not readable") from None
    for i in range(insn_len):
        if current[i] == original[i] or (i and runtime_addr + i in ours):
            continue
        if i == 0 and current[0] == INT3:
            raise PlacementRefused(f"{what}: another breakpoint is already at {runtime_addr:#x} "
                                   "(a kernel uprobe or a debugger)")
        raise PlacementRefused(f"{what}: the code at {runtime_addr:#x} differs from the file "
                               "(text relocation or self-modifying code)")


def insert(mem: ProcessMemory, site: Site) -> None:
    """Write the slot, then the int3."""
    if site.plan.code:
        mem.write(site.slot_addr, site.plan.code)
    mem.write(site.runtime_addr, bytes([INT3]))


def remove(mem: ProcessMemory, site: Site) -> None:
    """Put the original byte back where our int3 still is."""
    try:
        if mem.read(site.runtime_addr, 1)[0] == INT3:
            mem.write(site.runtime_addr, site.original[:1])
    except UprobesError:
        pass  # unmapped meanwhile, or the process is gone: nothing left to restore


def executable_file_mappings(maps: list[Mapping]) -> list[Mapping]:
    """Private executable mappings of files, and the vDSO (valid_vma with VM_EXEC)."""
    return [m for m in maps if m.executable and "p" in m.perms
            and (m.inode != 0 or m.path == "[vdso]")]
