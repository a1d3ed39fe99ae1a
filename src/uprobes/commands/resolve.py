"""`uprobes resolve`: show what probe specs resolve to, without placing anything."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from uprobes.commands.selection import add_uretprobe_argument, command_argv
from uprobes.engines.kernel.probe_line import kernel_can_name, kernel_line
from uprobes.errors import SpecError
from uprobes.lang import parse
from uprobes.lang.ast import ProbeSpec
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.render.json import write_json
from uprobes.resolve.resolver import Resolver

NAME = "resolve"
HELP = "resolve probe specs to files, inodes and offsets, and show the kernel's line for each"
EXAMPLES = [
    "uprobes resolve 'libc:malloc size=%di:u64'",
    "uprobes resolve 'libc:malloc%return ptr=$retval'  # one entry probe per ret of malloc",
    "uprobes resolve --uretprobe 'libc:malloc%return ptr=$retval'  # the kernel's uretprobe",
    "uprobes resolve 'libc:str*cmp' --json",
    "uprobes resolve 'usdt:/usr/bin/python3.11:python:function__entry file=+0($arg1):string'",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="probe specs")
    p.add_argument("-p", "--pid", type=int, help="resolve names as process PID sees them")
    p.add_argument("--force", action="store_true",
                   help="skip the executable-segment and instruction-boundary checks")
    p.add_argument("--json", action="store_true", help="one JSON object per probe")
    add_uretprobe_argument(p)


def parse_specs(texts: list[str]) -> list[ProbeSpec]:
    """Parse command-line specs; clearing lines (`-:EVENT`) make no sense here."""
    specs = []
    for text in texts:
        spec = parse(text)
        if not isinstance(spec, ProbeSpec):
            raise SpecError("a '-:EVENT' line clears a probe; give probes to place", text, 0)
        specs.append(spec)
    return specs


def run(args: argparse.Namespace, out: TextIO) -> int:
    resolver = Resolver(pid=args.pid, force=args.force, uretprobe=args.uretprobe, py_args=True,
                        argv=command_argv(args))
    probes = resolver.resolve_all(parse_specs(args.specs))
    for p in probes:
        if args.json:
            write_json(out, describe(p))
        else:
            out.writelines(line + "\n" for line in kernel_lines(p))
            if p.guard:  # the kernel's filter of its events (a py: function's)
                out.write(f"  filter {p.guard}\n")
        for note in p.notes:
            sys.stderr.write(f"uprobes: note: {note}\n")
        if not kernel_can_name(p.path):
            sys.stderr.write(f"uprobes: note: {p.name}: the kernel engine cannot name a path "
                             "with whitespace (uprobe_events splits at spaces); -e ptrace can\n")
        if p.uretprobe_reason:
            sys.stderr.write(f"uprobes: note: {p.name} uses the kernel's uretprobe: "
                             f"{p.uretprobe_reason}\n")
    return 0


def kernel_lines(p: ResolvedProbe) -> list[str]:
    """What the kernel engine writes for `p`: one line, or one entry probe per
    `ret` of a return probe's function (the engine adds a hidden fetcharg
    for the address returned to)."""
    if p.ret_sites:
        return [kernel_line(p, ret_site=site, for_kernel=False) for site in p.ret_sites]
    return [kernel_line(p, for_kernel=False)]


def describe(p: ResolvedProbe) -> dict[str, object]:
    key = p.key
    doc: dict[str, object] = {
        "probe": p.name, "kind": p.kind.value, "path": p.path, "file_offset": p.file_offset,
        "symbol": p.symbol, "symbol_offset": p.symbol_offset, "link_addr": p.link_addr,
        "ref_ctr_offset": p.ref_ctr_offset,
    }
    if p.guard:
        doc["guard"] = p.guard
    if p.is_return:
        doc.update(ret_sites=list(p.ret_sites) if p.ret_sites else None,
                   uretprobe_reason=p.uretprobe_reason)
    if isinstance(key, InodeKey):
        doc.update(dev=key.dev, ino=key.ino)
    if p.path != "[vdso]":
        doc["kernel_line"] = kernel_line(p, for_kernel=False)
        if p.ret_sites:
            doc["kernel_lines"] = kernel_lines(p)
    return doc
