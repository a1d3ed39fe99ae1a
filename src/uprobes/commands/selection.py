"""Command-line options every tracing command shares: engine and what to trace."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from uprobes.engines.choose import ENGINES
from uprobes.errors import UsageError
from uprobes.model.filters import HitFilter
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve import retsites
from uprobes.resolve.abi import probe_info

if TYPE_CHECKING:
    from uprobes.session import Session



def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="probe specs")
    p.add_argument("-e", "--engine", choices=ENGINES, default="auto",
                   help="kernel: the kernel's uprobes; ptrace: our own; auto (default): "
                        "the kernel where it can serve")
    p.add_argument("-p", "--pid", type=int,
                   help="trace only this process (names resolve as it sees them)")
    p.add_argument("--force", action="store_true",
                   help="skip the executable-segment and instruction-boundary checks")
    add_uretprobe_argument(p)
    p.add_argument("--no-trapfree", action="store_true",
                   help="-e ptrace: an int3 trap per hit for every probe (by default a probe "
                        "that only counts, or fetches registers and the stack only, becomes a "
                        "jump to in-process code that counts or records the hit, where that "
                        "is safe: no stop per hit)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--json", action="store_true", help="JSON output")


def add_uretprobe_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uretprobe", action="store_true",
                   help="return probes use the kernel's uretprobe (it swaps the return "
                        "address: a C++ exception or longjmp through the function aborts the "
                        "program) instead of probes on the function's own rets")


def uretprobe_note(probes: Sequence[ResolvedProbe], err: TextIO) -> None:
    """Say, in one line, which return probes had to use the kernel's uretprobe."""
    note = retsites.uretprobe_note(probes)
    if note:
        err.write(f"uprobes: note: {note}\n")


def command_argv(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The command a run starts (`-- CMD ARGS...`), if any."""
    command = getattr(args, "argv_command", None)
    return tuple(command) if command else None


def check_selection(args: argparse.Namespace) -> None:
    """`-p PID` and `-- CMD` exclude each other; ptrace needs one of them."""
    if args.pid is not None and args.argv_command:
        raise UsageError("give either -p PID or -- CMD, not both")
    if args.engine == "ptrace" and args.pid is None and not args.argv_command:
        raise UsageError("the ptrace engine traces a process or a command: "
                         "give -p PID or -- CMD")


def add_duration_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="stop after SECONDS (default: when the command or process ends, or "
                        "on Ctrl-C). The probes are removed and the results printed; a "
                        "command given after -- is then ended as perf stat --timeout ends "
                        "its own, with SIGTERM (SIGKILL 5 s later if it still runs), and "
                        "its status is ours (143 after SIGTERM); a process given by -p "
                        "runs on, untouched")


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    """Filters on hits: which tasks, and a condition on fetched values."""
    p.add_argument("--if", dest="condition", metavar="COND",
                   help="only hits where COND holds: the kernel's filter language on the "
                        "probe's fetchargs, comm, pid and tid (e.g. 'size > 4096 && "
                        "comm == \"ls\"'; strings take == != and ~ globs)")
    p.add_argument("--comm", action="append", metavar="NAME",
                   help="only hits of tasks with this comm (repeatable)")
    p.add_argument("--tid", action="append", type=int, metavar="TID",
                   help="only hits of this thread (repeatable)")


def hit_filter(args: argparse.Namespace, probes: Sequence[ResolvedProbe]) -> HitFilter | None:
    """The filter `add_filter_arguments` asked for, checked against every probe."""
    flt = HitFilter.parse(args.condition, args.comm, args.tid)
    if flt is not None:
        flt.check([probe_info(p) for p in probes])
    return flt


def run_selected(session: Session, args: argparse.Namespace, doing: str,
                 ready: Callable[[], object] | None = None,
                 launched: Callable[[int], object] | None = None) -> int:
    """Run `session` on what the command line selected: the command after
    `--` (its exit status), `-p PID`, or every process (0). `ready` is
    called once the probes are in place; system-wide without one, a line
    says `uprobes: DOING system-wide; Ctrl-C to stop` then. `launched`:
    see `Session.spawn`."""
    if args.argv_command:
        return session.spawn(args.argv_command, duration=args.duration, ready=ready,
                             launched=launched)
    if args.pid is not None:
        session.attach(args.pid, duration=args.duration, ready=ready)
        return 0
    if ready is None:
        def ready() -> None:
            sys.stderr.write(f"uprobes: {doing} system-wide; Ctrl-C to stop\n")
            sys.stderr.flush()
    session.run(args.duration, ready=ready)
    return 0


def open_svg(path: str | None) -> TextIO | None:
    """The file a picture goes to (`--svg FILE`), opened before tracing so a
    path that cannot be written fails at once, not after the run."""
    if path is None:
        return None
    try:
        return open(path, "w")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from e
