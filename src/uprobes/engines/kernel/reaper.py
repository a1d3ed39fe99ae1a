"""The reaper: our tracefs probes go away even when uprobes is SIGKILLed.

Probes made through tracefs outlive the process that made them (perf-PMU
and BPF-link probes are fd-owned; tracefs ones are not), and tools that die
leave them behind, up to filling `uprobe_events`. So the first time a run
makes its group, it starts a watcher (uprobes.engines.reaper: exec'd, so
it holds none of our perf fds) that waits for EOF on a pipe only we hold,
then removes what is left of our group (retrying while the kernel still
closes our perf events: EBUSY) and exits. After a normal exit there is
nothing left and it exits at once.

Run as `python -m uprobes.engines.kernel.reaper GROUP TRACEFS_ROOT`.
"""

from __future__ import annotations

import sys
import time

from uprobes.engines.reaper import read_until_eof, start_watcher

_started: set[str] = set()
_pipes: list[int] = []
GIVE_UP_S = 24 * 3600.0  # a traced command's inherited events can hold them that long


def ensure_reaper(group: str, tracefs_root: str) -> None:
    """Start the watcher of `group` unless this process already has one."""
    if group in _started:
        return
    w = start_watcher("uprobes.engines.kernel.reaper", group, tracefs_root)
    if w is None:
        return  # no watcher: `uprobes cleanup` remains the way after a SIGKILL
    _pipes.append(w)  # held open, never written, until this process ends
    _started.add(group)


def is_watched(group: str) -> bool:
    """Whether this process started the watcher of `group`."""
    return group in _started


def _reap(group: str, tracefs_root: str) -> int:
    read_until_eof()  # nothing is ever written: wait for EOF
    # Imported only now: the watcher costs nothing but a blocked read meanwhile.
    from uprobes.errors import KernelError
    from uprobes.sys.tracefs import Tracefs

    tracefs = Tracefs(tracefs_root)
    deadline = time.monotonic() + GIVE_UP_S
    delay = 0.01
    while True:
        try:
            tracefs.remove_group(group)
            return 0
        except KernelError:
            if time.monotonic() >= deadline:
                return 1
            time.sleep(delay)  # perf events on them are still being closed
            delay = min(delay * 2, 1.0)


if __name__ == "__main__":
    sys.exit(_reap(sys.argv[1], sys.argv[2]))
