"""The `uprobes` command line: one module per subcommand, one error exit.

Every subcommand module has `NAME`, `HELP`, `EXAMPLES` (run by the tests),
`add_arguments(parser)` and `run(args, out) -> int`. `main(argv)` is the
whole CLI, callable in-process; errors of ours become one line on stderr.

Start-up time is felt on every run, and the command modules pull in the
engines, the ELF layer and the decoder.  So `COMMANDS` names each command
and its help line without importing it, and a run imports only the module
of the command it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import NamedTuple, NoReturn, TextIO

from uprobes.engines.signals import CommandSignals, StopRequested
from uprobes.errors import UprobesError, UsageError

PROG = "uprobes"


class Command(NamedTuple):
    """A subcommand as the top-level parser shows it; `module` holds the rest."""

    name: str
    module: str
    help: str


COMMANDS = (
    Command("demo", "demo",
            "compile the bundled example program, then list, trace and count its functions"),
    Command("list", "list_cmd",
            "list the functions and USDT probes of a program, a library, a process or the vDSO; "
            "py:PID: a running Python's functions"),
    Command("resolve", "resolve",
            "resolve probe specs to files, inodes and offsets, and show the kernel's line "
            "for each"),
    Command("trace", "trace", "print each hit of the probes with the values they fetch"),
    Command("count", "count",
            "count hits per probe (system-wide, in a process, or in a command it starts)"),
    Command("stacks", "stacks",
            "count the distinct user stacks that reach each probe (flame-graph input with "
            "--folded)"),
    Command("latency", "latency", "histogram of how long each call of the functions takes"),
    Command("top", "top", "live table of hits per second, per probe and process"),
    Command("record", "record",
            "keep every hit of the probes in a directory, for replay and report later"),
    Command("replay", "replay",
            "print a recording's hits as trace prints them (text, JSON, Perfetto)"),
    Command("report", "report", "a recording's hit counts per probe and call latency per "
            "function"),
    Command("agent", "agent",
            "keep probes in place and serve their counts and call latencies to Prometheus "
            "(/metrics); SIGHUP reloads --config"),
    Command("vdso", "vdso",
            "list the vDSO's functions (versions, aliases) and write its image to a file"),
    Command("cleanup", "cleanup", "remove probes left in tracefs by uprobes runs that were killed"),
    Command("doctor", "doctor",
            "report what the kernel offers uprobes here (tracefs, uprobe PMU, privileges)"),
)


def load(command: Command) -> ModuleType:
    """The module that implements `command`."""
    return importlib.import_module(f"uprobes.commands.{command.module}")


def _modules() -> list[ModuleType]:
    """Every command module (imports them all: for tests and documentation, not for runs)."""
    return [load(c) for c in COMMANDS]


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors print our way."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of the commands named in `commands` (all if None).

    The others are listed with their help line only, so `uprobes --help` and
    a run of one command import nothing else.
    """
    wanted = None if commands is None else set(commands)
    parser = _Parser(prog=PROG, description="Dynamic user-space probes for Linux.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS:
        if wanted is not None and cmd.name not in wanted:
            sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
            continue
        mod = load(cmd)
        p = sub.add_parser(cmd.name, help=cmd.help, description=mod.HELP,
                           epilog="examples:\n" + "\n".join("  " + e for e in mod.EXAMPLES),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (the top level
    has only `--help` and `--version`, which take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    # `-- CMD ARGS...` is the command to start and trace; argparse never sees it.
    command: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    chosen = _chosen(argv)
    parser = build_parser([chosen] if chosen else [])
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
