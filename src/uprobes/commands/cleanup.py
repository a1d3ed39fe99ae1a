"""`uprobes cleanup`: remove the tracefs groups that dead runs left behind.

A run names its group `uprobes_<pid>` (`uprobes.engines.kernel.groups`) and
removes it on every exit it lives through; SIGKILL is the one it cannot.
We remove only groups named that way whose process is gone: never a group
of another name, never a live run's.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import TextIO

from uprobes.engines.kernel.groups import PREFIX, is_dead_run, owner_pid
from uprobes.errors import KernelError
from uprobes.sys.tracefs import Tracefs

NAME = "cleanup"
HELP = "remove probes left in tracefs by uprobes runs that were killed"
EXAMPLES = [
    "uprobes cleanup --dry-run",
    "uprobes cleanup",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all-dead", action="store_true",
                   help="also count as dead a run whose pid now belongs to a process that "
                        "is not uprobes (the pid was reused)")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed")


def _pid_reused(group: str) -> bool:
    """The group's pid is alive but is not a uprobes run (by its command line)."""
    pid = owner_pid(group)
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"uprobes" not in cmdline and b"pytest" not in cmdline


def dead_groups(tracefs: Tracefs, *, all_dead: bool = False) -> list[str]:
    """Our groups whose run is gone (or, with `all_dead`, whose pid was reused)."""
    return [g for g in tracefs.groups_with_prefix(PREFIX)
            if is_dead_run(g) or (all_dead and _pid_reused(g))]


def run(args: argparse.Namespace, out: TextIO) -> int:
    tracefs = Tracefs()
    groups = dead_groups(tracefs, all_dead=args.all_dead)
    verb = "would remove" if args.dry_run else "removed"
    failed: list[str] = []
    for group in groups:
        events = tracefs.events_of_group(group)
        if not args.dry_run:
            try:
                tracefs.remove_group(group)
            except KernelError as e:
                hint = " (still in use: a process holds perf events on it)" \
                    if e.errno == errno.EBUSY else ""
                failed.append(f"{group}: {e}{hint}")
                continue
        out.write(f"{verb} {group} ({len(events)} events of dead run {owner_pid(group)})\n")
    if not groups:
        out.write("nothing to clean up: no uprobes groups of dead runs in "
                  f"{tracefs.root / 'uprobe_events'}\n")
    if failed:
        raise KernelError("could not remove " + "; ".join(failed))
    return 0
