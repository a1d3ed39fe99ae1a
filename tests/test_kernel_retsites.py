"""Return probes on the function's own `ret`s (the default) against the
kernel's uretprobe (`--uretprobe`), on tests/fixtures/retsites.cc: a C++
exception through a return-probed frame, recursion, several rets, a tail call.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler

from uprobes.commands.resolve import parse_specs
from uprobes.resolve.resolver import Resolver

UPROBES = [sys.executable, "-m", "uprobes"]


@pytest.fixture(scope="module")
def exe(compile_c: Compiler) -> Path:
    return compile_c("retsites.cc")


def uprobes(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UPROBES, *argv], capture_output=True, text=True, timeout=120)


def trace_json(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str],
                                                     list[dict[str, Any]]]:
    out = tmp_path / "trace.jsonl"
    proc = uprobes("trace", "--json", "-o", str(out), *argv)
    docs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, [d for d in docs if "summary" not in d]


def resolve_one(spec: str, **kw: Any) -> Any:
    [probe] = Resolver(**kw).resolve_all(parse_specs([spec]))
    return probe


def objdump_rets(exe: Path, function: str) -> list[int]:
    """The file offsets of `function`'s rets as objdump sees them (a PIE's
    text has link address == file offset)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)],
                          capture_output=True, text=True, check=True).stdout
    body = text.split(f"<{function}>:\n", 1)[1].split("\n\n", 1)[0]
    return [int(m, 16) for m in re.findall(r"^\s*([0-9a-f]+):\s+ret", body, re.M)]


def test_ret_sites_are_the_functions_rets(exe: Path) -> None:
    for fn, n in (("through", 1), ("two_rets", 2), ("fact", None)):
        probe = resolve_one(f"r {exe}:{fn}")
        assert list(probe.ret_sites) == objdump_rets(exe, fn) and probe.uretprobe_reason is None
        assert n is None or len(probe.ret_sites) == n
    tail = resolve_one(f"r {exe}:tail_call")
    assert tail.ret_sites is None and "tail call" in tail.uretprobe_reason
    asked = resolve_one(f"r {exe}:through", uretprobe=True)
    assert asked.ret_sites is None and asked.uretprobe_reason is None
    stack = resolve_one(f"r {exe}:through sp=$stack")
    assert stack.ret_sites is None and "stack pointer" in stack.uretprobe_reason


def test_exception_through_a_return_probe_leaves_the_program_alone(
        exe: Path, tracefs: Path, tmp_path: Path) -> None:
    untraced = subprocess.run([str(exe), "throw"], capture_output=True, text=True)
    assert untraced.stdout == "total=165 caught=2\n" and untraced.returncode == 3
    proc, hits = trace_json(tmp_path, f"r {exe}:through v=$retval:s64", "--", str(exe), "throw")
    assert (proc.stdout, proc.returncode) == (untraced.stdout, untraced.returncode), proc.stderr
    assert "note" not in proc.stderr
    # through(i) returns 2i+1 for the calls that do not throw (i = 1, 2, 4, 5)
    assert [h["args"]["v"] for h in hits] == [3, 5, 9, 11]
    assert all(h["kind"] == "r" and h["probe"] == "uprobes/through__return" for h in hits)


def test_uretprobe_aborts_on_the_same_exception(exe: Path, tracefs: Path,
                                                tmp_path: Path) -> None:
    """Why ret sites are the default: the kernel's uretprobe swaps the return
    address, the unwinder finds no frame for it, and std::terminate aborts."""
    proc, hits = trace_json(tmp_path, "--uretprobe", f"r {exe}:through v=$retval:s64",
                            "--", str(exe), "throw")
    assert proc.returncode == 128 + 6, proc.stderr  # SIGABRT
    assert "terminate called after throwing an instance of 'std::runtime_error'" in proc.stderr
    assert "total=" not in proc.stdout
    assert [h["args"]["v"] for h in hits] == [3, 5]


def test_values_equal_the_uretprobes(exe: Path, tracefs: Path, tmp_path: Path) -> None:
    """Same calls (no exception, no ASLR), both ways: every event is the same,
    address returned to and function entry included, and the fetchargs a
    uretprobe sees after the ret (`%ip`, `$stack1`, `+8(%sp)`) too."""
    specs = [f"r {exe}:through v=$retval:s64 ip=%ip st=$stack1 deep=+8(%sp):x64 "
             f"caller=+0(%bp):x64 rv=$retval",
             f"r {exe}:fact v=$retval:s64", f"r {exe}:two_rets v=$retval:s64"]
    argv = ["--", "setarch", "-R", str(exe)]
    runs = []
    for extra in ([], ["--uretprobe"]):
        proc, hits = trace_json(tmp_path, *extra, *specs, *argv)
        assert proc.returncode == 3 and proc.stdout == "total=281 caught=0\n", proc.stderr
        runs.append([{k: h[k] for k in ("probe", "kind", "ip", "func", "args", "comm")}
                     for h in hits])
    ours, kernels = runs
    assert ours == kernels
    by_probe: dict[str, list[int]] = {}
    for h in ours:
        by_probe.setdefault(h["probe"], []).append(h["args"]["v"])
    assert by_probe == {"uprobes/through__return": [9, 15, 21, 27, 33, 39],
                        "uprobes/fact__return": [1, 2, 6, 24, 120, 1, 2],  # recursion
                        "uprobes/two_rets__return": [8, 7]}  # both rets
    two = [h["ip"] for h in ours if h["probe"] == "uprobes/two_rets__return"]
    assert two[0] != two[1]  # two call sites returned to


def test_tail_call_falls_back_with_one_note(exe: Path, tracefs: Path, tmp_path: Path) -> None:
    proc, hits = trace_json(tmp_path, f"r {exe}:tail_call v=$retval:s64",
                            f"r {exe}:two_rets", "--", str(exe))
    assert proc.returncode == 3, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("uprobes: note:")]
    assert len(notes) == 1
    assert notes[0].startswith("uprobes: note: uprobes/tail_call__return uses the kernel's "
                               "uretprobe (tail_call+0x4: tail call (jmp")
    assert [h["args"]["v"] for h in hits if h["probe"] == "uprobes/tail_call__return"] == [2]


def test_count_on_rets_equals_count_of_uretprobes(exe: Path, tracefs: Path) -> None:
    specs = [f"r {exe}:through", f"{exe}:two_rets%return", f"r {exe}:fact"]
    got = []
    for extra in ([], ["--uretprobe"]):
        proc = uprobes("count", "--json", *extra, *specs, "--", str(exe))
        assert proc.returncode == 3, proc.stderr
        got.append(json.loads(proc.stdout.splitlines()[-1]))
    assert got[0] == got[1] == {"uprobes/through__return": 6, "uprobes/two_rets__return": 2,
                                "uprobes/fact__return": 7}
    wide = subprocess.Popen([*UPROBES, "count", "--json", *specs], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wide.stderr is not None
        assert "system-wide" in wide.stderr.readline()  # the probes are in place
        assert subprocess.run([str(exe)], capture_output=True).returncode == 3
        wide.send_signal(signal.SIGINT)
        stdout, _ = wide.communicate(timeout=60)
    finally:
        wide.kill()
        wide.wait()
    assert json.loads(stdout.splitlines()[-1]) == got[0]
    thrown = uprobes("count", "--json", *specs, "--", str(exe), "throw")
    assert thrown.returncode == 3 and "caught=2" in thrown.stdout
    assert json.loads(thrown.stdout.splitlines()[-1])["uprobes/through__return"] == 4
