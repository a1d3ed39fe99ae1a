"""Names of our tracefs groups: `uprobes_<pid>` of the run that made them.

Two runs never collide, and a dead run's leftovers are found by the pid in
the name (the reaper and `uprobes cleanup`). We never touch a group not
named this way.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time

from uprobes.engines.kernel.reaper import ensure_reaper, is_watched
from uprobes.errors import KernelError, UsageError
from uprobes.sys.tracefs import ProbeGroup, Tracefs

PREFIX = "uprobes_"
_GROUP = re.compile(r"^uprobes_(\d+)$")

MAX_EVENTS = 128
"""Most kernel events one run places. The kernel tears an event down when
its last perf event closes, with a set of grace periods
(uprobe_unregister_sync(), tracepoint_synchronize_unregister()) under
event_mutex: one event after another, whoever closes them (we, or the
kernel for a killed run, which waits in D state meanwhile). Probe points
share events (`records.shared_events`), so a glob over a whole library
needs a few dozen; the bound keeps placing and removing a run's probes to
seconds (tens of milliseconds an event), not the hours thousands of events
would take."""


def check_event_count(events: int, probes: int) -> None:
    """UsageError, before anything is placed, when `probes` need more than
    MAX_EVENTS kernel events."""
    if events > MAX_EVENTS:
        raise UsageError(
            f"these {probes:,} probes need {events:,} kernel events (probes at the same "
            f"place in their pages share none) and the kernel engine places at most "
            f"{MAX_EVENTS} per run (removing each costs the kernel a set of grace periods, "
            f"one event at a time): probe fewer places")


def run_group(pid: int | None = None) -> str:
    """The group of this run (or of run `pid`)."""
    return f"{PREFIX}{os.getpid() if pid is None else pid}"


def open_run_group(tracefs: Tracefs) -> ProbeGroup:
    """This run's group, with the reaper watching over it (see `reaper`)."""
    name = run_group()
    ensure_reaper(name, str(tracefs.root))
    return ProbeGroup(tracefs, name)


def remove_run_group(group: ProbeGroup, patience_s: float = 1.0) -> None:
    """Remove every event of `group`, after its perf events are closed.

    The kernel may still hold an event for a moment after our last fd on it
    is closed (inherited events of the traced tasks are torn down after
    ours): EBUSY is retried for `patience_s`. If it is still busy then, the
    reaper removes the rest once the kernel lets go, and a note says so.
    """
    delay = 0.005
    deadline = time.monotonic() + patience_s
    while True:
        try:
            group.remove_all(leftovers=True)
            return
        except KernelError as e:
            if e.errno != errno.EBUSY:
                raise
            if time.monotonic() >= deadline:
                if not is_watched(group.name):
                    raise
                sys.stderr.write(f"uprobes: note: the kernel still holds probes of {group.name}; "
                                 "they are removed as soon as it lets go\n")
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def owner_pid(group: str) -> int | None:
    """The pid of the run that made `group`, or None if it is not one of ours."""
    m = _GROUP.match(group)
    return int(m.group(1)) if m else None


def is_dead_run(group: str) -> bool:
    """One of our groups whose run is gone."""
    pid = owner_pid(group)
    return pid is not None and not os.path.exists(f"/proc/{pid}")
