"""`count -e ptrace --by KEY [--value ARG]`: hits counted by key in the
program (engines/trapfree/keyed.py), against what fixture timed.c says it did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler

UPROBES = [sys.executable, "-m", "uprobes"]


@pytest.fixture(scope="module")
def timed(compile_c: Compiler) -> Path:
    return compile_c("timed.c", "-pthread")


def _count(*argv: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    run = subprocess.run([*UPROBES, "count", "-e", "ptrace", "--json", *argv],
                         capture_output=True, text=True, timeout=300)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stderr
    return run, json.loads(run.stdout.splitlines()[-1])


def test_counts_by_a_fetched_value_with_its_sum_min_max(timed: Path) -> None:
    """tiny(i % 10) for i < 100,000: keys 0..9, 10,000 calls each; the value
    summed per key is the key times its calls."""
    run, doc = _count("--by", "a", "--value", "a", f"{timed}:tiny a=%di:s32", "--",
                      str(timed), "keys", "100000", "10")
    assert "calls=100000" in run.stdout
    rows = {r["key"]: r for r in doc["uprobes/tiny"]["keys"]}
    assert set(rows) == set(range(10))
    for key, r in rows.items():
        assert (r["count"], r["sum"], r["min"], r["max"]) == (10000, 10000 * key, key, key)
    assert doc["uprobes/tiny"]["overflow"] == 0


def test_counts_by_thread_and_process(timed: Path) -> None:
    """4 threads x 50,000 calls: 4 tids of 50,000 each; by pid, one process."""
    _, doc = _count("--by", "tid", f"{timed}:tiny", "--", str(timed), "threads", "4", "50000")
    counts = [r["count"] for r in doc["uprobes/tiny"]["keys"]]
    assert counts == [50000] * 4
    _, doc = _count("--by", "pid", f"{timed}:tiny", "--", str(timed), "threads", "4", "50000")
    rows = doc["uprobes/tiny"]["keys"]
    assert len(rows) == 1 and rows[0]["count"] == 200000
    _, doc = _count("--by", "comm", f"{timed}:tiny", "--", str(timed), "threads", "2", "1000")
    assert doc["uprobes/tiny"]["keys"] == [{"key": timed.name[:15], "count": 2000}]


def test_a_full_table_says_how_many_hits_it_could_not_key(timed: Path) -> None:
    """10,000 distinct keys into a table of 4,096: every hit is either
    counted under its key or in the overflow, and the table says so."""
    run = subprocess.run([*UPROBES, "count", "-e", "ptrace", "--by", "a", f"{timed}:tiny a=%di",
                          "--", str(timed), "keys", "20000", "10000"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    found = [ln for ln in run.stdout.splitlines() if "hits not keyed" in ln]
    assert len(found) == 1, run.stdout
    overflow = int(found[0].split()[0].lstrip("("))
    counted = sum(int(ln.split()[1]) for ln in run.stdout.splitlines()[3:]
                  if ln.split() and ln.split()[0].isdigit())
    assert overflow > 0 and counted + overflow == 20000


def _refused_in_one_line(timed: Path, argv: list[str], words: str) -> None:
    run = subprocess.run([*UPROBES, "count", *argv, "--", str(timed), "tiny", "10"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("uprobes: error: ") and words in run.stderr, run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr


@pytest.mark.root
def test_the_kernel_engine_counts_by_key_from_events(timed: Path) -> None:
    """As root, `-e auto` takes the kernel engine, which has no program code
    to count in: it counts by key from its events, as the ptrace engine
    counts in the program (it refused, saying `give -e ptrace`)."""
    argv = ["--json", "--by", "a", "--value", "a", f"{timed}:tiny a=%di:s32", "--",
            str(timed), "keys", "1000", "10"]
    kernel = subprocess.run([*UPROBES, "count", *argv], capture_output=True, text=True,
                            timeout=300)
    assert kernel.returncode == 0 and "Traceback" not in kernel.stderr, kernel.stderr
    _, doc = _count(*argv[1:])
    assert json.loads(kernel.stdout.splitlines()[-1]) == doc
    assert {r["key"]: r["count"] for r in doc["uprobes/tiny"]["keys"]} == \
        {k: 100 for k in range(10)}


def test_what_cannot_be_keyed_is_one_line(timed: Path) -> None:
    """--no-trapfree, a key no spec fetches, a value without a key: one line, exit 2."""
    for argv, words in (
            (["-e", "ptrace", "--no-trapfree", "--by", "tid", f"{timed}:tiny"],
             "drop --no-trapfree"),
            (["-e", "ptrace", "--by", "size", f"{timed}:tiny"], "fetches no size"),
            (["-e", "ptrace", "--value", "a", f"{timed}:tiny a=%di"], "give --by KEY")):
        _refused_in_one_line(timed, argv, words)


def test_a_filter_is_tested_before_the_key(timed: Path) -> None:
    """`--by a --if 'a >= 3 && a < 7'`: only keys 3..6 are counted, 10,000 each
    (the rest rejected by the compiled compare, counted nowhere); `--by tid
    --tid T` with a tid no thread has counts nothing; a filter the program's
    code cannot test (a glob on the comm) leaves the probe uncounted, saying why."""
    _, doc = _count("--by", "a", "--if", "a >= 3 && a < 7", f"{timed}:tiny a=%di:s32", "--",
                    str(timed), "keys", "100000", "10")
    assert {r["key"]: r["count"] for r in doc["uprobes/tiny"]["keys"]} == \
        {3: 10000, 4: 10000, 5: 10000, 6: 10000}
    _, doc = _count("--by", "tid", "--tid", "1", f"{timed}:tiny", "--", str(timed), "threads",
                    "2", "1000")
    assert doc["uprobes/tiny"]["keys"] == []
    run, doc = _count("--by", "a", "--if", 'comm ~ "x*"', f"{timed}:tiny a=%di", "--",
                      str(timed), "tiny", "10")
    assert "not counted by a: its filter cannot be tested in the program" in run.stderr


def test_comm_is_tested_before_the_key(timed: Path) -> None:
    """`--by a --comm odd` while the thread renames itself every 70 calls
    (by prctl and by /proc in turn): exactly the calls made as "odd" are
    keyed, each once."""
    run, doc = _count("--by", "a", "--comm", "odd", f"{timed}:tiny a=%di:s64", "--", str(timed),
                      "renames", "1000", "70")
    assert "not counted" not in run.stderr, run.stderr
    assert {r["key"]: r["count"] for r in doc["uprobes/tiny"]["keys"]} == \
        {i: 1 for i in range(1000) if (i // 70) % 2 == 1}


def test_by_comm_is_the_name_at_each_hit(timed: Path) -> None:
    """`--by comm` while the thread renames itself every 70 calls (by prctl
    and by /proc in turn): each hit is keyed by the name it has then,
    asked of the kernel at the hit; with `--comm odd` only those are kept."""
    evens = sum(1 for i in range(3000) if (i // 70) % 2 == 0)
    argv = [f"{timed}:tiny", "--", str(timed), "renames", "3000", "70"]
    _, doc = _count("--by", "comm", *argv)
    assert {r["key"]: r["count"] for r in doc["uprobes/tiny"]["keys"]} == \
        {"even": evens, "odd": 3000 - evens}
    _, doc = _count("--by", "comm", "--comm", "odd", *argv)
    assert {r["key"]: r["count"] for r in doc["uprobes/tiny"]["keys"]} == {"odd": 3000 - evens}


@pytest.mark.parametrize("how", ["raw", "glibc", "thread"])
@pytest.mark.parametrize("command", ["count", "latency"])
def test_a_raw_fork_childs_hits_are_its_own(how: str, command: str,
                                            compile_c: Compiler) -> None:
    """A child forked by the fork system call itself keeps its parent's tid
    in its thread block (where the in-program code reads the tid); its 300
    calls are still under its own tid, the parent's 200 under the parent's
    (before: all 500 under the parent's), counted and timed in the program.
    glibc's fork (the kernel writes the child's tid there) the same. A
    thread made by clone() without CLONE_SETTLS shares its parent's thread
    block: its 300 calls are its own too (before: under the parent's)."""
    exe = compile_c("rawfork.c")
    run = subprocess.run([*UPROBES, command, "-e", "ptrace", "--json", "--by", "tid",
                          f"{exe}:work", "--", str(exe), how], capture_output=True, text=True,
                         timeout=300)
    assert "Traceback" not in run.stderr and run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    said = dict(ln.split("=", 1) for ln in lines if ln.startswith(("child=", "parent=")))
    doc = json.loads(lines[-1])
    if command == "count":
        got = {r["key"]: r["count"] for r in doc["uprobes/work"]["keys"]}
    else:
        got = {int(k.rsplit("=", 1)[1]): h["count"] for k, h in doc.items()}
    assert got == {int(said["parent"]): 200, int(said["child"]): 300}, (got, run.stderr)
    assert ("leaves its parent's tid in its thread block" in run.stderr) == (how != "glibc"), \
        run.stderr


@pytest.mark.root
@pytest.mark.parametrize("by", ["x", "comm"])
def test_a_probe_no_jump_can_cover_is_counted_by_key_from_its_int3s(
        compile_c: Compiler, by: str) -> None:
    """short4 is 4 bytes, too short for a jump: its hits take an int3 each
    and are counted by key from events, beside longer's (trap-free), in one
    table, as the kernel engine counts them; one note says which probe traps
    and why. (Its hits were left out with a note, and the table empty.)"""
    exe = compile_c("short_func.c")
    argv = ["--json", "--by", by, f"{exe}:short4 x=%di:s32", f"{exe}:longer x=%di:s32",
            "--", str(exe), "12"]
    docs = {}
    for engine in ("kernel", "ptrace"):
        run = subprocess.run([*UPROBES, "count", "-e", engine, *argv], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        assert run.stdout.startswith("short4=12 longer=6 "), run.stdout
        docs[engine] = json.loads(run.stdout.splitlines()[-1])
        if engine == "ptrace":
            assert "not counted" not in run.stderr, run.stderr
            assert "int3 trap per hit: uprobes/short4: short4 ends 4 bytes after it" \
                in run.stderr, run.stderr
    assert docs["ptrace"] == docs["kernel"]
    if by == "x":
        assert [(r["key"], r["count"]) for r in docs["ptrace"]["uprobes/short4"]["keys"]] == \
            [(0, 4), (1, 4), (2, 4)]
        assert [(r["key"], r["count"]) for r in docs["ptrace"]["uprobes/longer"]["keys"]] == \
            [(0, 3), (2, 3)]
    else:
        assert docs["ptrace"]["uprobes/short4"]["keys"] == [{"key": exe.name[:15], "count": 12}]
        assert docs["ptrace"]["uprobes/longer"]["keys"] == [{"key": exe.name[:15], "count": 6}]
