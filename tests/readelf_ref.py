"""readelf as the reference for where functions are: no uprobes code involved."""

from __future__ import annotations

import subprocess
from pathlib import Path


def readelf_func(exe: Path, name: str) -> tuple[int, int]:
    """(file offset, size) of function `name`, from readelf's symbols and segments."""
    syms = subprocess.run(["readelf", "-Ws", "--wide", str(exe)], capture_output=True,
                          text=True, check=True).stdout
    value = size = None
    for line in syms.splitlines():
        f = line.split()
        if len(f) >= 8 and f[7] == name and f[3] == "FUNC":
            value, size = int(f[1], 16), int(f[2], 0)
    assert value is not None and size is not None
    segs = subprocess.run(["readelf", "-lW", str(exe)], capture_output=True, text=True,
                          check=True).stdout
    for line in segs.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            off, vaddr, filesz = int(f[1], 16), int(f[2], 16), int(f[4], 16)
            if vaddr <= value < vaddr + filesz:
                return value - vaddr + off, size
    raise AssertionError("no segment")
