"""Whether a process has ended, asked of a pidfd: unlike its pid, a pidfd
never comes to mean another process that got the same number."""

from __future__ import annotations

import errno
import os
import select

from uprobes.errors import KernelError


def watch_process(pid: int) -> int:
    """A pidfd of process `pid`; -1 if it has already ended (and was reaped)."""
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return -1
        raise KernelError(f"pidfd_open({pid}): {e.strerror}", e.errno) from e


def has_ended(pidfd: int) -> bool:
    """Whether the process of `pidfd` (from `watch_process`) has exited: a
    pidfd turns readable then, zombie or reaped."""
    return pidfd < 0 or bool(select.select([pidfd], [], [], 0)[0])
