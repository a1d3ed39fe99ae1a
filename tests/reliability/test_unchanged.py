"""The program never notices: for a corpus of programs that stress what
tracing can break (threads, fork+exec, dlopen, longjmp, C++ exceptions
through return-probed frames, signal handlers that hit probes, recursion,
python3, sort on a large file), the traced run's stdout and exit status
equal the untraced run's, and the probes did fire."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Compiler

UPROBES = [sys.executable, "-m", "uprobes"]
ENGINES = ["kernel", "ptrace"]


@dataclass(frozen=True)
class Case:
    argv: Callable[[Compiler, Path], list[str]]
    specs: Callable[[list[str]], list[str]]


def _prog(source: str, *flags: str) -> Callable[[Compiler, Path], list[str]]:
    return lambda cc, tmp: [str(cc(source, *flags))]


def _sorted_input(cc: Compiler, tmp: Path) -> list[str]:
    rng = random.Random(11)
    data = tmp / "lines.txt"
    data.write_text("".join(f"{rng.randrange(10**9):09d} {rng.choice('abcdefgh') * 5}\n"
                            for _ in range(200_000)))
    return ["sort", str(data)]


CASES: dict[str, Case] = {
    "threads": Case(lambda cc, tmp: [str(cc("threads.c", "-pthread")), "10000"],
                    lambda a: [f"{a[0]}:work", f"r {a[0]}:work v=$retval:s64"]),
    "fork+exec": Case(_prog("corpus/forkexec.c"),
                      lambda a: [f"{a[0]}:step i=%di:s64", f"r {a[0]}:step", "libc:execve"]),
    "dlopen": Case(_prog("corpus/dlopen.c", "-ldl"),
                   lambda a: ["libm:cbrt", "r libm:cbrt"]),
    "longjmp": Case(_prog("corpus/longjmp.c"),
                    lambda a: [f"{a[0]}:dive d=%di:s32", f"r {a[0]}:dive r=$retval:s32"]),
    "c++ exception": Case(lambda cc, tmp: [str(cc("retsites.cc")), "throw"],
                          lambda a: [f"{a[0]}:through", f"r {a[0]}:through",
                                     f"r {a[0]}:thrower"]),
    "signal handler": Case(_prog("corpus/signals.c"),
                           lambda a: [f"{a[0]}:tick", f"r {a[0]}:tick"]),
    "recursion": Case(_prog("latency.c"),
                      lambda a: [f"{a[0]}:fib n=%di:s32", f"r {a[0]}:fib v=$retval:s64"]),
    "python3": Case(lambda cc, tmp: ["/usr/bin/python3.11", "-c",
                                     "import json, hashlib; d = [json.dumps({'i': i}) for i in "
                                     "range(20000)]; print(hashlib.sha1(''.join(d).encode())"
                                     ".hexdigest())"],
                    lambda a: ["libc:malloc", "r libc:malloc", "libc:free"]),
    "sort": Case(_sorted_input, lambda a: ["libc:malloc", "r libc:malloc", "libc:free"]),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(CASES))
def test_traced_run_equals_untraced(name: str, engine: str, tracefs: Path,
                                    compile_c: Compiler, tmp_path: Path) -> None:
    case = CASES[name]
    argv = case.argv(compile_c, tmp_path)
    plain = subprocess.run(argv, capture_output=True, timeout=120)
    trace = tmp_path / "trace.txt"
    traced = subprocess.run([*UPROBES, "trace", "-e", engine, "-o", str(trace),
                             *case.specs(argv), "--", *argv], capture_output=True, timeout=300)
    assert b"Traceback" not in traced.stderr, traced.stderr.decode()
    assert traced.stdout == plain.stdout, traced.stderr.decode()
    assert traced.returncode == plain.returncode, traced.stderr.decode()
    assert trace.read_text().strip(), "no probe fired"
