"""Names of our tracefs groups: `uprobes_<pid>` of the run that made them.

Two runs never collide, and a dead run's leftovers are found by the pid in
the name (`uprobes cleanup`). We never touch a group not named this way.
"""

from __future__ import annotations

import os
import re

PREFIX = "uprobes_"
_GROUP = re.compile(r"^uprobes_(\d+)$")


def run_group(pid: int | None = None) -> str:
    """The group of this run (or of run `pid`)."""
    return f"{PREFIX}{os.getpid() if pid is None else pid}"


def owner_pid(group: str) -> int | None:
    """The pid of the run that made `group`, or None if it is not one of ours."""
    m = _GROUP.match(group)
    return int(m.group(1)) if m else None


def is_dead_run(group: str) -> bool:
    """One of our groups whose run is gone."""
    pid = owner_pid(group)
    return pid is not None and not os.path.exists(f"/proc/{pid}")
