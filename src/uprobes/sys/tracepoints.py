"""The kernel's tracepoints by name, and the system call table they number.

A tracepoint is `group:event` (`sched:sched_switch`,
`syscalls:sys_enter_openat`), as `available_events` lists them; its
`format` file (sys/event_format.py) says how its records are laid out and
its id is perf's `config` for PERF_TYPE_TRACEPOINT. An unknown name is
answered with the nearest names this kernel has.

`raw_syscalls:sys_enter` carries a system call's number, not its name;
the names come from the kernel headers' table for this architecture
(`asm/unistd_64.h`), read once; a number missing from it is `syscall_N`.
"""

from __future__ import annotations

import difflib
import errno
import platform
import re
from functools import cache
from pathlib import Path

from uprobes.errors import KernelError, UsageError
from uprobes.sys.event_format import EventFormat
from uprobes.sys.tracefs import Tracefs

_UNISTD = {
    "x86_64": ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"),
    "aarch64": ("/usr/include/aarch64-linux-gnu/asm/unistd.h", "/usr/include/asm-generic/unistd.h"),
}
# Calls newer than the headers that may be installed: the kernel's own
# return-probe trampoline (v6.11) and optimized uprobes make these.
_NEWER = {"x86_64": {335: "uretprobe", 336: "uprobe"}}
_DEFINE_RE = re.compile(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$", re.M)


def split_name(name: str) -> tuple[str, str]:
    """`group:event` (or `group/event`, as tracefs paths have it) -> (group, event)."""
    group, sep, event = name.replace("/", ":").partition(":")
    if not sep or not group or not event or ":" in event:
        raise UsageError(f"tracepoint {name!r} must be GROUP:EVENT (see "
                         "/sys/kernel/tracing/available_events)")
    return group, event


def near_names(name: str, available: list[str], n: int = 3) -> list[str]:
    """The `n` names of `available` nearest to `name` (the event part weighs most)."""
    event = name.replace("/", ":").rpartition(":")[2]
    by_event = difflib.get_close_matches(event, [a.partition(":")[2] for a in available], n,
                                         cutoff=0.6)
    whole = difflib.get_close_matches(name, available, n, cutoff=0.6)
    ordered = whole + [a for a in available if a.partition(":")[2] in by_event]
    return list(dict.fromkeys(ordered))[:n]


def find(tracefs: Tracefs, name: str, why: str = "") -> EventFormat:
    """The format of tracepoint `name`; an unknown one is a UsageError that
    names the nearest the kernel has (`why`: what asked for it, if not the user)."""
    group, event = split_name(name)
    try:
        return tracefs.event_format(group, event)
    except KernelError as e:
        if e.errno != errno.ENOENT:
            raise
    wanted = f" (for {why})" if why else ""
    near = near_names(f"{group}:{event}", tracefs.available_events())
    hint = f"; did you mean {', '.join(near)}?" if near else \
        "; `cat /sys/kernel/tracing/available_events` lists them"
    raise UsageError(f"this kernel has no tracepoint {group}:{event}{wanted}{hint}")


@cache
def syscall_names() -> dict[int, str]:
    """System call number -> name for this architecture (empty when the
    kernel headers are not installed: names are then `syscall_N`)."""
    machine = platform.machine()
    names = dict(_NEWER.get(machine, {}))
    for path in _UNISTD.get(machine, ()):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        names.update((int(nr), name) for name, nr in _DEFINE_RE.findall(text))
        break
    return names


def syscall_name(nr: int) -> str:
    """The name of system call `nr` (`syscall_N` when the table lacks it)."""
    return syscall_names().get(nr) or f"syscall_{nr}"
