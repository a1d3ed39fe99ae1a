"""`uprobes stacks`: a fixture reaches one function by two call paths a
known number of times; both engines count each path exactly, in every
output form, and the command's output and exit status pass through."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler
from gdb_support import gdb_batch

from uprobes.commands import main

ENGINES = ("kernel", "ptrace")
PATH_A = ["hot", "from_a", "main"]
PATH_B = ["hot", "via_b", "from_b", "main"]


@pytest.fixture(scope="module")
def callers(compile_c: Compiler) -> Path:
    return compile_c("callers.c", "-O2", "-fomit-frame-pointer")


def _stacks(engine: str, exe: Path, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(["stacks", "-e", engine, *extra, f"{exe}:hot", "--", str(exe)], out=out)
    return status, out.getvalue()


@pytest.mark.parametrize("engine", ENGINES)
def test_each_call_path_counted_exactly(tracefs: Path, callers: Path, engine: str,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    status, text = _stacks(engine, callers, "--json")
    assert status == 7
    assert capfd.readouterr().out == "sink 36\n"  # the program's own output, unchanged
    doc = json.loads(text)
    (probe,) = doc.values()
    assert probe["hits"] == 8 and probe["unwalked"] == 0
    found = {}
    for stack in probe["stacks"]:
        names = [f["symbol"] for f in stack["frames"]]
        assert names[-1] == "_start"
        found[tuple(names[:names.index("main") + 1])] = stack["count"]
        assert all(f["file"] for f in stack["frames"])
    assert found == {tuple(PATH_A): 3, tuple(PATH_B): 5}
    assert [s["count"] for s in probe["stacks"]] == [5, 3]  # most frequent first


@pytest.mark.parametrize("engine", ENGINES)
def test_folded_for_flame_graphs(tracefs: Path, callers: Path, engine: str) -> None:
    status, text = _stacks(engine, callers, "--folded")
    assert status == 7
    folded = {}
    for line in text.splitlines():
        path, count = line.rsplit(" ", 1)
        folded[path] = int(count)
    assert sum(folded.values()) == 8
    comm = callers.name[:15]
    want_a = ";".join(reversed(PATH_A))
    want_b = ";".join(reversed(PATH_B))
    by_tail = {p.split(";main;", 1)[1]: n for p, n in folded.items()}
    assert by_tail == {want_a.split("main;", 1)[1]: 3, want_b.split("main;", 1)[1]: 5}
    assert all(p.startswith(f"{comm};") and ";_start;" not in p.split(";", 1)[0]
               for p in folded)


def test_text_shows_the_top_stacks_with_shares(tracefs: Path, callers: Path) -> None:
    status, text = _stacks("kernel", callers, "--top", "1")
    assert status == 7
    lines = text.splitlines()
    assert lines[0].endswith(": 8 hits, 2 distinct stacks (1 not shown)")
    assert lines[1] == "  5 (62.5%)"
    assert lines[2].startswith("\thot+0x0 (") and lines[3].startswith("\tvia_b+")


def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stacks", "--folded", "--json", "libc:malloc", "--", "true"]) == 2
    assert main(["stacks", "--stack-bytes", "12", "libc:malloc", "--", "true"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["uprobes: error: give either --folded or --json, not both",
                   "uprobes: error: --stack-bytes must be a multiple of 8 from 8 to 61432"]


def test_same_paths_in_two_processes_are_one_stack(tracefs: Path, callers: Path,
                                                   tmp_path: Path) -> None:
    """Without symbols a frame is keyed by its link address, not its runtime
    one: two runs of a stripped PIE (two load addresses) give 2 stacks, not 4."""
    stripped = tmp_path / "callers-stripped"
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(callers)], check=True)
    out = io.StringIO()
    status = main(["stacks", "--json", "--force", f"{stripped}:{_offset(callers, 'hot')}", "--",
                   "/bin/sh", "-c", f"{stripped}; {stripped}"], out=out)
    assert status == 7
    (probe,) = json.loads(out.getvalue()).values()
    assert probe["hits"] == 16
    assert sorted(s["count"] for s in probe["stacks"]) == [6, 10]
    caller = probe["stacks"][0]["frames"][1]
    assert caller["symbol"] is None and caller["file"] == str(stripped)


def _offset(exe: Path, symbol: str) -> str:
    out = io.StringIO()
    assert main(["resolve", f"{exe}:{symbol}"], out=out) == 0
    return out.getvalue().split()[1].rsplit(":", 1)[1]


def _folded(engine: str, probe: str, *argv: str) -> tuple[dict[str, int], str]:
    """`uprobes stacks --folded -e ENGINE PROBE -- ARGV`: (folded stacks, the
    program's own output)."""
    run = subprocess.run([sys.executable, "-m", "uprobes", "stacks", "--folded",
                          *engine.split(), probe, "--", *argv],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    folded, own = {}, []
    for line in run.stdout.splitlines():
        path, _, count = line.rpartition(" ")
        if ";" in path and count.isdigit():
            folded[path] = int(count)
        else:
            own.append(line)
    return folded, "\n".join(own)


def test_a_short_lived_fork_childs_frames_are_named(tracefs: Path,
                                                    compile_c: Compiler) -> None:
    """fork_quick_stacks.c: a fork child hits target three times and exits at
    once, before its maps can be read. Its frames are named from its
    parent's maps as the kernel's PERF_RECORD_FORK copies them (before:
    `[unknown]`), the same as the ptrace engine (int3s) and gdb (following
    the child) walk them; a library the child dlopen()s after the fork is
    named from the child's own PERF_RECORD_MMAP2, and the frames below it
    from the copy (before: `[unknown]` under the library's)."""
    exe = compile_c("fork_quick_stacks.c", "-O2", "-ldl")
    lib = compile_c("fork_quick_lib.c", "-O2", "-shared", "-fPIC")
    kernel, out = _folded("-e kernel", f"{exe}:target", str(exe))
    ptrace, _ = _folded("-e ptrace --no-trapfree", f"{exe}:target", str(exe))
    assert out == "parent 13"
    assert kernel == ptrace, (kernel, ptrace)
    child = [p for p, n in kernel.items() if n == 3]
    assert len(child) == 1 and child[0].endswith(";main;c_b;c_a;target"), kernel
    frames = gdb_batch(exe, ["set follow-fork-mode child", "break target", "run", "bt"])
    walked = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) \(", frames, re.M)
    ours = child[0].split(";")
    assert ours[ours.index("main"):] == list(reversed(walked)), (child, frames)  # gdb: to main
    kernel, _ = _folded("-e kernel", f"{lib}:lib_target", str(exe), str(lib))
    ptrace, _ = _folded("-e ptrace --no-trapfree", f"{lib}:lib_target", str(exe), str(lib))
    assert kernel == ptrace and list(kernel.values()) == [2], (kernel, ptrace)
    assert next(iter(kernel)).endswith(";main;lib_entry;lib_mid;lib_target"), kernel
