"""`--src DIR` of bench.ptrace and bench.kernel: two source trees in one run.

The quickest settings (a few hits, one repeat), so that comparing a change
with its base cannot rot; the figures are not checked, only that each
tree's row ran, says its tree and has a ratio to the first tree's.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"-?\d+\.\d\d")


def _rows(stdout: str, first: str) -> list[list[str]]:
    """The table's rows as cells, from the one whose first cell is `first` on."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in stdout.splitlines() if ln.startswith("|")]
    header = next(i for i, r in enumerate(rows) if r[0] == first)
    return rows[header:]


def _old_tree(tmp_path: Path) -> str:
    """A second tree to compare with: a copy of this checkout's src/ (named `old`)."""
    old = tmp_path / "old" / "src"
    shutil.copytree(ROOT / "src", old, ignore=shutil.ignore_patterns("__pycache__"))
    return str(old)


def _bench(module: str, *args: str) -> str:
    proc = run_in_session([sys.executable, "-m", module, *args], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _both_trees(rows: list[list[str]], tree: int, ratio: int) -> None:
    """Each tree's row, the first tree's ratio 1.00 and the other's a number."""
    trees = [r[tree] for r in rows[2:] if r[tree] != "-"]
    assert trees[0] == "old" and len(trees) == 2 and trees[1] != "old", rows
    old, new = (r for r in rows[2:] if r[tree] != "-")
    assert old[ratio] == "1.00", rows
    assert RATIO.fullmatch(new[ratio]), rows


@pytest.mark.kernel
def test_ptrace_bench_two_trees(tracefs: Path, tmp_path: Path) -> None:
    out = _bench("bench.ptrace", "--only", "uprobes trace -e ptrace --no-trapfree",
                 "--scale", "0.005", "--repeats", "1",
                 "--src", _old_tree(tmp_path), "--src", str(ROOT / "src"))
    rows = _rows(out, "tool")
    assert rows[0][:6] == ["tool", "tree", "probe", "function (first insn)", "us/hit",
                           "x old"], out
    assert len(rows) == 4, out
    assert all(r[0] == "uprobes trace -e ptrace --no-trapfree" and r[-2] == "exact"
               for r in rows[2:]), out
    _both_trees(rows, tree=1, ratio=5)


@pytest.mark.kernel
def test_kernel_per_hit_bench_two_trees(tracefs: Path, tmp_path: Path) -> None:
    out = _bench("bench.kernel", "--only", "per-hit", "--calls", "500", "--repeats", "1",
                 "--src", _old_tree(tmp_path), "--src", str(ROOT / "src"))
    rows = _rows(out, "mode")
    assert rows[0][1] == "tree" and rows[0][3] == "x old", out
    for mode in ("`uprobes count -e kernel`", "`trace -o /dev/null`", "`trace --json"):
        _both_trees([*rows[:2], *(r for r in rows[2:] if r[0].startswith(mode))],
                    tree=1, ratio=3)
    assert all("lost 0 of 500" in r[-1] for r in rows if r[0].startswith("`trace")), out
