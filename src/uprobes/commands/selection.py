"""Command-line options every tracing command shares: engine and what to trace."""

from __future__ import annotations

import argparse

from uprobes.errors import UsageError

ENGINES = ("auto", "kernel", "ptrace")


def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="probe specs")
    p.add_argument("-e", "--engine", choices=ENGINES, default="auto",
                   help="kernel: the kernel's uprobes; ptrace: our own; auto (default): "
                        "the kernel where it can serve")
    p.add_argument("-p", "--pid", type=int,
                   help="trace only this process (names resolve as it sees them)")
    p.add_argument("--force", action="store_true",
                   help="skip the executable-segment and instruction-boundary checks")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--json", action="store_true", help="JSON output")


def check_selection(args: argparse.Namespace) -> None:
    """`-p PID` and `-- CMD` exclude each other; the engine must be one we have."""
    if args.pid is not None and args.argv_command:
        raise UsageError("give either -p PID or -- CMD, not both")
    if args.engine == "ptrace":
        raise UsageError("the ptrace engine is not built yet; use -e kernel")
