"""`uprobes demo`: compile the bundled example and probe it, to see the tool work."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import TextIO

from uprobes.errors import UprobesError

NAME = "demo"
HELP = "compile the bundled example program, then list, trace and count its functions"
EXAMPLES = ["uprobes demo"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", metavar="DIR", help="build the example in DIR and keep it")


def build_example(where: Path) -> Path:
    """Compile the bundled `demo.c` into `where`; returns the executable."""
    if shutil.which("gcc") is None:
        raise UprobesError("the demo compiles a small C program: install gcc")
    src = resources.files("uprobes.examples").joinpath("demo.c")
    c_file = where / "demo.c"
    c_file.write_text(src.read_text())
    exe = where / "kvstore"
    subprocess.run(["gcc", "-O1", "-g", "-o", str(exe), str(c_file)], check=True)
    return exe


def run(args: argparse.Namespace, out: TextIO) -> int:
    from uprobes.commands import main

    with tempfile.TemporaryDirectory(prefix="uprobes-demo-") as tmp:
        where = Path(args.keep) if args.keep else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        exe = build_example(where)
        steps = [
            ["list", str(exe), "kv_*"],
            ["trace", f"{exe}:kv_put key=+0(%di):string value=%si:s64",
             f"{exe}:kv_get%return value=$retval:s64", "--", str(exe)],
            ["count", f"{exe}:kv_*", "libc:__strcmp_*", "libc:printf", "--", str(exe)],
        ]
        for argv in steps:
            out.write("$ uprobes " + " ".join(_quote(a) for a in argv) + "\n")
            out.flush()
            status = main(argv, out)
            out.write("\n")
            if status:
                return status
    return 0


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " $%()") else arg
