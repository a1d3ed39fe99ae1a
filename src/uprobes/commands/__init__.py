"""The `uprobes` command line: one module per subcommand, one error exit.

Every subcommand module has `NAME`, `HELP`, `EXAMPLES` (run by the tests),
`add_arguments(parser)` and `run(args, out) -> int`. `main(argv)` is the
whole CLI, callable in-process; errors of ours become one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import NoReturn, TextIO

from uprobes.engines.signals import CommandSignals, StopRequested
from uprobes.errors import UprobesError, UsageError

PROG = "uprobes"


def _modules() -> list[ModuleType]:
    from uprobes.commands import (
        cleanup, count, demo, doctor, latency, list_cmd, resolve, stacks, top, trace, vdso,
    )

    return [demo, list_cmd, resolve, trace, count, stacks, latency, top, vdso, cleanup, doctor]


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors print our way."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Dynamic user-space probes for Linux.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           epilog="examples:\n" + "\n".join("  " + e for e in mod.EXAMPLES),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def _version() -> str:
    from uprobes import __version__
    return __version__


def print_error(err: UprobesError, stream: TextIO) -> None:
    lines = err.lines()
    stream.write(f"{PROG}: error: {lines[0]}\n")
    for extra in lines[1:]:
        stream.write(extra + "\n")


def main(argv: list[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input, 1 for failures)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with CommandSignals():
            return _main(argv, out)
    except UprobesError as e:
        print_error(e, err)
        return e.exit_status
    except SystemExit as e:  # --help and --version end here
        return e.code if isinstance(e.code, int) else 0
    except StopRequested as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _main(argv: list[str] | None, out: TextIO) -> int:
    """Parse and run one command."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `-- CMD ARGS...` is the command to start and trace; argparse never sees it.
    command: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    args.argv_command = command
    if args.command is None:
        parser.print_help(out)
        return 2
    return int(args.run(args, out))


def entry_point() -> int:
    # From here to the process's end, a stop signal never kills us with the
    # default action: main() decides what it means (CommandSignals), and
    # after main() it arrives too late to matter (we are exiting with the
    # traced command's status). A launched command gets the defaults back.
    import signal
    from uprobes.engines.signals import STOP_SIGNALS
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    status = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # Whoever read our output (`| head`) has gone: not an error of ours.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status
