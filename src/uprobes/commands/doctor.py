"""`uprobes doctor`: what this kernel and these privileges let each engine do."""

from __future__ import annotations

import argparse
from typing import TextIO

from uprobes.render.json import write_json
from uprobes.render.table import write_table
from uprobes.sys.features import features

NAME = "doctor"
HELP = "report what the kernel offers uprobes here (tracefs, uprobe PMU, privileges)"
EXAMPLES = ["uprobes doctor", "uprobes doctor --json"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object")


def run(args: argparse.Namespace, out: TextIO) -> int:
    rows = features().report()
    if args.json:
        write_json(out, dict(rows))
    else:
        write_table(out, ["CHECK", "FINDING"], [list(r) for r in rows])
    return 0
