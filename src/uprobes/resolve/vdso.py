"""The vDSO as an ELF image, read out of a process's memory.

The vDSO has no file, so no inode: the kernel's uprobes cannot name it. Its
image is the same for every process on one kernel (only its address
differs), so without a pid we read our own.
"""

from __future__ import annotations

import os
import struct

from uprobes.elf.image import ElfImage
from uprobes.errors import ProcessError, ResolveError
from uprobes.sys import procfs
from uprobes.sys.features import vdso_images

_EM_386, _EM_X86_64 = 3, 62


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


def read_vdso(pid: int | None = None, image: str | None = None) -> ElfImage:
    """Process `pid`'s vDSO (ours when None); with `image` (`64`, `32`,
    `x32`), a ResolveError unless that is the image it maps."""
    data = vdso_bytes(pid)
    if image is not None:
        mapped = image_abi(data)
        have = vdso_images()
        if image not in have:
            names = ", ".join(f"/{i}" for i in have) or "none"
            raise ResolveError(f"this machine's kernel maps no vDSO image /{image} "
                               f"(it has {names})")
        if mapped != image:
            who = "the one uprobes reads without -p" if pid is None else f"process {pid}'s"
            raise ResolveError(f"vDSO image /{image} is not {who} (/{mapped}): give -p PID "
                               f"of a process of that ABI")
    return ElfImage.from_bytes(data, "[vdso]")


def image_abi(data: bytes) -> str:
    """Which vDSO image an ELF image is, by its class and machine: `64`, `32`
    or `x32` (an x86-64 machine in a 32-bit ELF)."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        raise ProcessError("the vDSO does not start with an ELF header")
    elf_class = data[4]
    machine, = struct.unpack_from("<H", data, 18)
    if elf_class == 2 and machine == _EM_X86_64:
        return "64"
    if elf_class == 1:
        return "x32" if machine == _EM_X86_64 else "32"
    return f"{elf_class * 32}-bit machine {machine}"
