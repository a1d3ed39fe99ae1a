"""The vDSO as an ELF image, read out of a process's memory.

The vDSO has no file, so no inode: the kernel's uprobes cannot name it. Its
image is the same for every process on one kernel (only its address
differs), so without a pid we read our own.
"""

from __future__ import annotations

import os

from uprobes.elf.image import ElfImage
from uprobes.errors import ProcessError
from uprobes.sys import procfs


def vdso_region(pid: int | None = None) -> tuple[int, int]:
    """[start, end) run-time addresses of process `pid`'s vDSO (ours when None)."""
    maps = [m for m in procfs.maps(pid if pid is not None else os.getpid()) if m.path == "[vdso]"]
    if not maps:
        raise ProcessError(f"process {'self' if pid is None else pid} has no vDSO mapped")
    return maps[0].start, maps[-1].end


def vdso_bytes(pid: int | None = None) -> bytes:
    """The vDSO image of process `pid` (ours when None): a whole ELF file,
    section headers included, as the kernel built it."""
    who = "self" if pid is None else str(pid)
    start, end = vdso_region(pid)
    try:
        with open(f"/proc/{who}/mem", "rb", buffering=0) as mem:
            mem.seek(start)
            return mem.read(end - start)
    except OSError as e:
        raise ProcessError(f"cannot read the vDSO of process {who}: {e.strerror}") from None


def read_vdso(pid: int | None = None) -> ElfImage:
    return ElfImage.from_bytes(vdso_bytes(pid), "[vdso]")
