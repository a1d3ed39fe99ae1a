"""`uprobes trace`: print every hit of the probes, with the values they fetch.

Text is the kernel's own trace line per hit; `--json` one object per hit and
a last `{"summary": {"events": N, "lost": M}}` line. The summary also goes to
stderr (`uprobes: N events, M lost`): lost records are never silent.

`--stack` adds each hit's user stack, walked in user space from what was
captured at the hit (registers and the top of the stack: the kernel copies
them into the perf sample, the ptrace engine reads them while the thread
is stopped), by the DWARF CFI of `.eh_frame` or else frame pointers.
Events then go through `run(on_event)`, not the tuple fast path.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, BinaryIO, TextIO, cast

from uprobes.analysis.calls import past_entry, past_prologue
from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import (
    add_duration_argument,
    add_filter_arguments,
    add_selection_arguments,
    check_selection,
    command_argv,
    hit_filter,
    uretprobe_note,
)
from uprobes.engines.base import Request, open_tracer
from uprobes.engines.kernel.streams import DEFAULT_RING_PAGES, STACK_RING_PAGES
from uprobes.engines.kevents.decode import parse_kernel_option
from uprobes.engines.kevents.pump import Pump
from uprobes.engines.kevents.source import KernelEvents
from uprobes.engines.launch import Launched, finish, launch
from uprobes.errors import UsageError
from uprobes.model.event import ProbeInfo
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.render.chrome_json import ChromeJsonRenderer
from uprobes.render.jsonl import JsonLinesRenderer
from uprobes.render.perfetto import PerfettoRenderer
from uprobes.render.pyargs import PyArgsRenderer, shown_infos
from uprobes.render.timeline import Timeline
from uprobes.render.trace_text import TraceTextRenderer
from uprobes.resolve.resolver import Resolver
from uprobes.sys.clocks import ClockSnapshot
from uprobes.unwind.capture import DEFAULT_STACK_BYTES, check_stack_bytes

FORMATS = ("text", "jsonl", "perfetto", "chrome-json")
NAME = "trace"
HELP = "print each hit of the probes with the values they fetch"
EXAMPLES = [
    "uprobes trace 'libc:malloc size=%di:u64' -- /bin/ls /",
    "uprobes trace --json 'r libc:getenv value=+0($retval):string' -- /usr/bin/env -i /bin/true",
    "uprobes trace --json --uretprobe 'r libc:getenv value=+0($retval):string' -- "
    "/usr/bin/env -i /bin/true  # the kernel's uretprobe, not probes on getenv's rets "
    "(a C++ exception through it aborts the program)",
    "uprobes trace 'usdt:/usr/bin/python3.11:python:function__entry file=+0($arg1):string "
    "fn=+0($arg2):string line=$arg3:s32' -- /usr/bin/python3.11 -c $'def f(): pass\\nf()'",
    "uprobes trace --format perfetto -o /tmp/ls.perfetto-trace 'libc:malloc size=%di:u64' "
    "'r libc:malloc ptr=$retval:x64' -- /bin/ls /  # open it in ui.perfetto.dev",
    "uprobes trace --format chrome-json -o /tmp/ls.json 'libc:malloc' 'r libc:malloc' -- "
    "/bin/ls /  # Chrome's trace-event JSON, for chrome://tracing too",
    "uprobes trace --stack 'libc:malloc' -- /usr/bin/python3.11 -c 'import json'"
    "  # each hit with its user stack, one frame a line",
    "uprobes trace --if 'size > 65536' --comm python3.11 'libc:malloc size=%di:u64' -- "
    "/usr/bin/python3.11 -c pass  # filtered in the kernel: no record for the rest",
    "uprobes trace --kernel sched,syscalls 'libc:fflush' 'r libc:fflush' -- /bin/echo hi"
    "  # the system calls and CPU switches of the command between the hits, in time order",
    "uprobes trace --kernel 'syscalls:sys_enter_openat' 'libc:malloc' -- /bin/true"
    "  # any tracepoint by name (see /sys/kernel/tracing/available_events)",
    "uprobes trace --duration 8 'libc:getppid' & python3 -c 'import os, time; "
    "[(os.getppid(), time.sleep(0.1)) for _ in range(100)]'; wait"
    "  # system-wide, for 8 s once placed: calls made before then are not seen",
    "uprobes trace --python -e ptrace 'libc:getpid' -- /usr/bin/python3.11 -c "
    "'import os; os.getpid()'  # each hit's stack with its Python frames",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    add_filter_arguments(p)
    add_duration_argument(p)
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="text: the kernel's trace lines (default); jsonl: one JSON object "
                        "per hit (same as --json); perfetto: a native Perfetto trace "
                        "(protobuf) for ui.perfetto.dev, entry+return of a call as one "
                        "slice (with -o FILE.json: Chrome JSON, as before); chrome-json: "
                        "Chrome's trace-event JSON")
    p.add_argument("--kernel", metavar="EVENTS", default=None,
                   help="the kernel's events of the traced threads between the hits, in time "
                        "order: sched (off and on the CPU, with the state), syscalls (names, "
                        "arguments, return values), faults (user page faults), or any "
                        "tracepoint as GROUP:EVENT; comma-separated")
    p.add_argument("--stack", action="store_true",
                   help="print the user stack of each hit (symbol+offset and file, innermost "
                        "first), from DWARF CFI (.eh_frame) or frame pointers")
    p.add_argument("--python", action="store_true",
                   help="with --stack (implied): a CPython program's stacks show its Python "
                        "functions (qualified name, file:line) where the interpreter runs "
                        "them (ptrace engine; docs/python.md)")
    p.add_argument("--stack-bytes", type=int, default=DEFAULT_STACK_BYTES, metavar="N",
                   help=f"with --stack: bytes of stack copied at each hit from the stack "
                        f"pointer up, a multiple of 8 (default {DEFAULT_STACK_BYTES}); a "
                        f"deeper stack is cut where the copy ends")
    p.add_argument("--ring-pages", type=int, default=None, metavar="N",
                   help=f"data pages of each CPU's ring buffer, a power of two "
                        f"(default {DEFAULT_RING_PAGES}, {STACK_RING_PAGES} with --stack: a "
                        f"sample then holds the stack copy); more loses fewer records in "
                        f"bursts")


def run(args: argparse.Namespace, out: TextIO) -> int:
    check_selection(args)
    if args.json and args.format not in (None, "jsonl"):
        raise UsageError(f"--json is --format jsonl; it cannot go with --format {args.format}")
    if args.duration is not None and args.duration < 0:
        raise UsageError("--duration must be at least 0")
    check_stack_bytes(args.stack_bytes)
    resolver = Resolver(pid=args.pid, force=args.force, uretprobe=args.uretprobe, py_args=True,
                        argv=command_argv(args))
    probes = resolver.resolve_all(parse_specs(args.specs))
    args.hit_filter = hit_filter(args, probes)
    for p in probes:
        for note in p.notes:
            sys.stderr.write(f"uprobes: note: {note}\n")
    uretprobe_note(probes, sys.stderr)
    with ExitStack() as stack:
        kevents = None
        if args.kernel is not None:
            kevents = stack.enter_context(KernelEvents(parse_kernel_option(args.kernel)))
        out, binary = open_output(args, out, stack)
        child = launch(args.argv_command) if args.argv_command else None
        return run_trace(args, out, binary, probes, child, kevents)


def open_output(args: argparse.Namespace, out: TextIO,
                stack: ExitStack) -> tuple[TextIO, BinaryIO | None]:
    """Where the format of `args` (`--format`, `--json`, `-o`) writes: text,
    or binary for Perfetto's; sets `args.format` to the format it is."""
    args.format = _format(args)
    binary: BinaryIO | None = None
    if args.output:
        try:
            if args.format == "perfetto":
                binary = stack.enter_context(open(args.output, "wb"))
            else:
                out = stack.enter_context(open(args.output, "w"))
        except OSError as e:
            raise UsageError(f"cannot write {args.output}: {e.strerror}") from e
    elif args.format == "perfetto":
        binary = getattr(out, "buffer", None)
        if binary is None or out.isatty():
            raise UsageError("--format perfetto writes a binary trace: give -o FILE")
    return out, binary


def _format(args: argparse.Namespace) -> str:
    """The output format asked for; `perfetto` into a `.json` file is the
    Chrome JSON it wrote before the native format came."""
    fmt: str = args.format or ("jsonl" if args.json else "text")
    if fmt == "perfetto" and args.output and args.output.endswith(".json"):
        sys.stderr.write("uprobes: note: --format perfetto into a .json file writes Chrome "
                         "JSON (--format chrome-json); name it .perfetto-trace for Perfetto's "
                         "own format\n")
        return "chrome-json"
    return fmt


Output = (TraceTextRenderer | JsonLinesRenderer | ChromeJsonRenderer | PerfettoRenderer
          | PyArgsRenderer)
if TYPE_CHECKING:  # `record`'s renderer: imported by `record` alone
    from uprobes.record.writer import RecordWriter

    Renderer = Output | Timeline | RecordWriter
    MakeRenderer = Callable[[dict[str, ProbeInfo]], RecordWriter]


def make_renderer(args: argparse.Namespace, out: TextIO, binary: BinaryIO | None,
                  infos: dict[str, ProbeInfo], probes: list[ResolvedProbe], calls: set[str],
                  clocks: tuple[ClockSnapshot, ClockSnapshot] | None = None) -> Output:
    """The renderer of `args.format` for `probes`; `calls`: see `call_entries`.
    `clocks`: the run's clocks at start and end (a replay's), else read at
    start and end."""
    infos, converts = shown_infos(infos)
    past = {name: n for name, n in past_entry(probes).items() if name in calls}
    made = _make_renderer(args, out, binary, infos, calls, past, clocks)
    return PyArgsRenderer(made, converts, infos) if converts else made


def _make_renderer(args: argparse.Namespace, out: TextIO, binary: BinaryIO | None,
                   infos: dict[str, ProbeInfo], calls: set[str], past: dict[str, int],
                   clocks: tuple[ClockSnapshot, ClockSnapshot] | None) -> Output:
    start = None if clocks is None else clocks[0]
    out_r: Output
    if args.format == "perfetto":
        assert binary is not None
        out_r = PerfettoRenderer(binary, infos, calls, clock_start=start, past_entry=past)
    elif args.format == "chrome-json":
        out_r = ChromeJsonRenderer(out, infos, calls, clock_start=start, past_entry=past)
    elif args.format == "jsonl":
        out_r = JsonLinesRenderer(out, infos, clock_start=start)
    else:
        return TraceTextRenderer(out, infos)
    if clocks is not None:
        out_r.clock_end = clocks[1]
    return out_r


def call_entries(probes: list[ResolvedProbe]) -> set[str]:
    """Names of the entry probes on a function that also has a return probe
    (a `py:` function's are told by their names: its entry and return are
    at different places of the eval loop)."""
    returns = {p.key for p in probes if p.is_return}
    named = {p.name for p in probes if p.is_return and p.alias is not None}
    return {p.name for p in probes if not p.is_return and (
        p.key in returns and p.symbol_offset == 0
        or past_prologue(p) and isinstance(p.key, InodeKey) and replace(
            p.key, file_offset=p.key.file_offset - p.symbol_offset) in returns
        or p.alias is not None and f"{p.name}%return" in named)}


def run_trace(args: argparse.Namespace, out: TextIO, binary: BinaryIO | None,
              probes: list[ResolvedProbe], child: Launched | None,
              kevents: KernelEvents | None, make: MakeRenderer | None = None) -> int:
    """The run: the probes placed, every hit into the renderer of `args`'s
    format (or `make(infos)`'s: `uprobes record`), the summary, the
    command's status."""
    renderer: Renderer | None = None
    note = lambda n: sys.stderr.write(f"uprobes: note: {n}\n")  # noqa: E731
    stack_bytes = args.stack_bytes if args.stack or args.python else 0
    try:
        tracer = open_tracer(Request(
            probes, args.engine, pid=args.pid, child=child.pid if child else None,
            force=args.force, note=note, stack_bytes=stack_bytes, hit_filter=args.hit_filter,
            trapfree=not args.no_trapfree, ring_pages=args.ring_pages, python=args.python))
    except BaseException:
        if child is not None:
            child.abort()
        raise
    try:
        if kevents is not None:  # before the probes: the first hit has its kernel events
            kevents.open(pid=args.pid, child=child.pid if child else None)
        with tracer:
            if make is not None:  # `record`: no kernel events, no stacks
                renderer = make(tracer.infos)
            else:
                output = make_renderer(args, out, binary, tracer.infos, probes,
                                       call_entries(probes))
                renderer = output if kevents is None else Timeline(output, kevents)
            if child is not None:
                child.release()
            elif not tracer.target_exited:
                # The probes are in place: say so (tests and scripts wait for this).
                where = f"in process {args.pid}" if args.pid is not None else "system-wide"
                sys.stderr.write(f"uprobes: tracing {len(tracer.infos)} probes {where}; "
                                 "Ctrl-C to stop\n")
                sys.stderr.flush()
            started = time.monotonic()
            with ExitStack() as reading:
                if isinstance(renderer, Timeline):
                    timeline = renderer
                    reading.enter_context(Pump(lambda: timeline.tick(time.monotonic_ns())))
                if stack_bytes and make is None:
                    tracer.run(cast("Output | Timeline", renderer).event, args.duration)
                else:
                    tracer.run_render(renderer, args.duration)  # text/jsonl: the fast paths
            if kevents is not None:
                kevents.disable()
            renderer.summary(tracer.events, tracer.lost)
            (binary or out).flush()
    except BaseException:
        if child is not None:
            child.reaped(tracer.child_status)
            if renderer is None:
                child.abort()  # never released: the command must not run at all
            else:
                child.wait()  # it runs on, unharmed, to its end
        raise
    kernel = "" if kevents is None else f"; {kevents.count} kernel events, {kevents.lost} lost"
    sys.stderr.write(f"uprobes: {tracer.events} events, {tracer.lost} lost{kernel}\n")
    if child is not None:
        child.reaped(tracer.child_status)
        return finish(child, started, args.duration, note)
    return 0
