"""gdb, the tests' oracle for DWARF values: one batch run's output."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path


def gdb_batch(exe: Path, cmds: Sequence[str], *, options: Sequence[str] = (),
              merged: bool = False, timeout: float = 120) -> str:
    """What `gdb -batch` running `cmds` (each an -ex) on `exe` prints on its
    stdout, with its stderr in the same pipe if `merged` (its errors in order
    with its values). A byte that is not UTF-8 (a program's own output, a char gdb
    thinks printable) is kept as an escape, not a UnicodeDecodeError."""
    argv = ["gdb", "-nx", "-batch", *options, *[a for c in cmds for a in ("-ex", c)], str(exe)]
    run = subprocess.run(argv, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                         text=True, errors="backslashreplace", timeout=timeout,
                         env={**os.environ, "LC_ALL": "C.UTF-8"})
    return run.stdout
