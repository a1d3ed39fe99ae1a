"""`uprobes agent`: keep probes in place and serve what they count.

Long-running and system-wide: each probe counts its hits per process
(labels probe, executable, comm, and fetched values asked for), an entry
and a return line of one function time its calls into a histogram, and
`--prometheus HOST:PORT` serves them at /metrics. `--config FILE` takes
the probes from a TOML file instead, which SIGHUP reads again
(docs/agent.md). SIGINT or SIGTERM remove every probe and end it.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import replace
from typing import TextIO

from uprobes.agent import config as agent_config
from uprobes.agent.config import AgentConfig, Pyroscope
from uprobes.agent.counting import check_counts_only
from uprobes.agent.metrics import DEFAULT_MAX_SERIES, Metrics
from uprobes.agent.otlp import OtlpSink
from uprobes.agent.probes import Executables
from uprobes.agent.prometheus import PrometheusEndpoint, exposition
from uprobes.agent.pyroscope import PyroscopeSink
from uprobes.agent.runner import serve
from uprobes.engines.choose import ENGINES
from uprobes.engines.signals import install_wake_handler
from uprobes.errors import UsageError

NAME = "agent"
HELP = ("keep probes in place and serve their counts and call latencies to Prometheus "
        "(/metrics); SIGHUP reloads --config")
EXAMPLES = [
    "uprobes agent --duration 2 'libc:malloc' 'r libc:malloc' & sleep 1; ls /usr; wait"
    "  # system-wide; what /metrics served is printed at the end",
    "uprobes agent --prometheus 127.0.0.1:9469 --duration 2 --label size "
    "'libc:malloc size=%di:u64' & sleep 1; ls /usr; wait  # system-wide, labelled by size",
    "uprobes agent --counts-only --duration 2 'libc:malloc' 'libc:free' & sleep 1; ls /usr; "
    "wait  # system-wide, counted by the kernel: no record per hit",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="probe lines (an entry and a return line of one function: "
                        "its call latencies too)")
    p.add_argument("--config", metavar="FILE",
                   help="probes and endpoints from a TOML file (instead of SPECs); "
                        "SIGHUP reads it again")
    p.add_argument("--prometheus", metavar="HOST:PORT",
                   help="serve the metrics at http://HOST:PORT/metrics")
    p.add_argument("--otlp", nargs="?", const="", metavar="URL",
                   help="push spans (each call of a function with an entry and a return "
                        "line) and the metrics over OTLP/HTTP to URL (e.g. "
                        "http://127.0.0.1:4318); without URL, to where the standard "
                        "OTEL_EXPORTER_OTLP_* variables say")
    p.add_argument("--pyroscope", metavar="URL",
                   help="count the user stacks that reach each entry line and push them, "
                        "folded, to a Pyroscope server's /ingest at URL (e.g. "
                        "http://127.0.0.1:4040)")
    p.add_argument("--pyroscope-interval", type=float, default=10.0, metavar="SECONDS",
                   help="how often stacks are pushed (default 10)")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="the value a probe fetches as NAME labels its series (repeatable; "
                        "bounded by --max-series)")
    p.add_argument("--max-series", type=int, default=DEFAULT_MAX_SERIES, metavar="N",
                   help=f"series per probe in each metric (default {DEFAULT_MAX_SERIES}); "
                        "hits past it are counted in uprobes_series_overflow_total")
    p.add_argument("--comm", action="append", default=[], metavar="NAME",
                   help="only hits of tasks with this comm (repeatable)")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="stop after SECONDS and print the last /metrics page to stdout "
                        "(default: run until SIGINT or SIGTERM)")
    p.add_argument("--counts-only", action="store_true",
                   help="the kernel counts each probe's hits and the agent reads the counters "
                        "at each export: its CPU no longer follows the hit rate, but the "
                        "series have no executable, comm or extra labels, and no latencies "
                        "(counts_only = true in a config)")
    p.add_argument("-e", "--engine", choices=ENGINES, default="auto",
                   help="kernel (system-wide), ptrace (calls timed inside each process "
                        "running a probed executable, followed as they start), or auto "
                        "(default: the kernel)")


def _config(args: argparse.Namespace) -> AgentConfig:
    if args.config:
        if args.specs or args.label or args.comm:
            raise UsageError("give the probes either in --config or on the command line")
        config = agent_config.load(args.config)
        if args.prometheus:
            config = replace(config, prometheus=agent_config.listen_address(args.prometheus))
        if args.otlp is not None:
            config = replace(config, otlp=args.otlp and agent_config.check_url(args.otlp))
        if args.pyroscope:
            raise UsageError("with --config, say [pyroscope] url and stacks = true in the file")
        return replace(config, counts_only=True) if args.counts_only else config
    if not args.specs:
        raise UsageError("give probe lines, or --config FILE")
    pyroscope = None
    if args.pyroscope:
        pyroscope = Pyroscope(args.pyroscope, interval_s=args.pyroscope_interval)
    config = agent_config.from_command_line(args.specs, args.label, args.comm, args.prometheus,
                                            args.max_series, args.engine, args.otlp, pyroscope)
    return replace(config, counts_only=args.counts_only)


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.argv_command:
        raise UsageError("the agent probes every process: it starts no command")
    config = _config(args)
    if config.engine == "ptrace" and config.counts_only:
        raise UsageError("counts-only is the kernel engine's: leave out -e ptrace or "
                         "--counts-only")
    if config.counts_only:
        check_counts_only(config)
    if config.prometheus is None and config.otlp is None and config.pyroscope is None \
            and args.duration is None:
        raise UsageError("give a sink: --prometheus HOST:PORT or --otlp [URL] (or "
                         "[prometheus] listen, [otlp] in the config)")
    if args.duration is not None and args.duration < 0:
        raise UsageError("--duration must be at least 0")
    metrics = Metrics(config.max_series)

    def note(text: str) -> None:
        sys.stderr.write(f"uprobes: note: {text}\n")
        sys.stderr.flush()

    def reload() -> AgentConfig:
        new = agent_config.load(args.config)
        new = replace(new, counts_only=new.counts_only or args.counts_only)
        if new.counts_only:
            check_counts_only(new)
        return new
    executables = Executables()
    install_wake_handler()  # the ptrace engine's tracers block in their threads
    with ExitStack() as stack:
        served = ""
        if config.prometheus is not None:
            endpoint = stack.enter_context(PrometheusEndpoint(metrics, config.prometheus))
            served = f"metrics at {endpoint.url}; "
        on_call = None
        if config.otlp is not None:
            otlp = stack.enter_context(OtlpSink(metrics, config.otlp or None, executables, note))
            on_call = otlp.call
            served += f"OTLP to {otlp.endpoint or 'OTEL_EXPORTER_OTLP_ENDPOINT'}; "
        on_stack = None
        if config.pyroscope is not None:
            pyro = config.pyroscope
            on_stack = stack.enter_context(PyroscopeSink(
                metrics, pyro.url, pyro.interval_s, pyro.app, note)).hit
            served += f"stacks to {pyro.url}; "

        def ready(config: AgentConfig) -> None:
            again = "SIGHUP reloads, " if args.config else ""
            sys.stderr.write(f"uprobes: agent: {len(config.probes)} probe lines in place, "
                             f"{served}{again}Ctrl-C stops\n")
            sys.stderr.flush()

        serve(config, metrics, reload if args.config else None, note, ready, args.duration,
              executables, on_call,
              on_stack)
    if args.duration is not None:
        out.write(exposition(metrics))
    return 0
