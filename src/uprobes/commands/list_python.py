"""`uprobes list py:PID [PATTERN]`: the Python functions of a running
CPython 3.11 process, found in its interpreter (resolve/pycode.py)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from uprobes.errors import UsageError
from uprobes.render.json import write_json
from uprobes.render.table import write_table
from uprobes.resolve.pycode import CodeObjects, find_code_objects

_NAME_WIDTH = 64


def list_python(target: str, glob: str | None, pid_option: int | None, as_json: bool,
                out: TextIO) -> int:
    """List what `target` (py:PID, or py:PID:PATTERN) names, matching `glob`."""
    spec = target[len("py:"):]
    pid_text, _, inline = spec.partition(":")
    if not pid_text.isdigit() or int(pid_text) <= 0:
        raise UsageError(f"{target}: py: lists a running Python's functions: give its "
                         "process id (py:PID)")
    if pid_option is not None:
        raise UsageError(f"{target}: the process is the one after py:, without -p")
    if inline and glob:
        raise UsageError(f"{target}: give the pattern once (py:PID:PATTERN or py:PID PATTERN)")
    pattern = inline or glob or "*"
    found = find_code_objects(int(pid_text), pattern)
    if found.truncated:
        sys.stderr.write(f"uprobes: note: process {found.pid}: the walk stopped after "
                         f"{found.reads} reads of its memory; the list may be incomplete\n")
    if as_json:
        write_json(out, _doc(found, pattern))
        return 0
    codes = sorted(found.codes, key=lambda c: (c.name, c.filename, c.firstlineno))
    if not codes:
        out.write(f"process {found.pid}, Python {found.python}: no function matches "
                  f"{pattern!r}\n")
        return 0
    write_table(out, ["FUNCTION", "SOURCE"],
                [[c.name, f"{c.filename}:{c.firstlineno}"] for c in codes],
                title=f"process {found.pid}, Python {found.python}: {len(codes)} functions",
                widest=_NAME_WIDTH)
    return 0


def _doc(found: CodeObjects, pattern: str) -> dict[str, Any]:
    return {
        "pid": found.pid, "python": found.python, "pattern": pattern,
        "modules": found.modules, "truncated": found.truncated,
        "functions": [{"name": c.name, "module": c.module, "qualname": c.qualname,
                       "file": c.filename, "line": c.firstlineno,
                       "code_addr": c.runtime_addr}
                      for c in sorted(found.codes, key=lambda c: (c.name, c.firstlineno))],
    }
