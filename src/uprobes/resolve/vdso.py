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


def vdso_bytes(pid: int | None = None) -> bytes:
    """The vDSO image of process `pid` (ours when None)."""
    who = "self" if pid is None else str(pid)
    maps = [m for m in procfs.maps(pid if pid is not None else os.getpid()) if m.path == "[vdso]"]
    if not maps:
        raise ProcessError(f"process {who} has no vDSO mapped")
    start, end = maps[0].start, maps[-1].end
    try:
        with open(f"/proc/{who}/mem", "rb", buffering=0) as mem:
            mem.seek(start)
            return mem.read(end - start)
    except OSError as e:
        raise ProcessError(f"cannot read the vDSO of process {who}: {e.strerror}") from None


def read_vdso(pid: int | None = None) -> ElfImage:
    return ElfImage.from_bytes(vdso_bytes(pid), "[vdso]")
