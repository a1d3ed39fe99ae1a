"""Load: a burst of 1M hits in trace mode. Every hit is either delivered or
counted as lost (events + lost == hits, exactly). uprobes' peak RSS is
printed for docs/testing.md; the bound on it is the bench's to check
(python -m bench.claims): a memory figure asserted in a test depends on the
machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler

# uprobes, reporting its own peak RSS on stderr as it exits.
MEASURED = [sys.executable, "-c",
            "import resource, sys; from uprobes.commands import main; rc = main(sys.argv[1:]); "
            "sys.stderr.write("
            "f'peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n'); "
            "sys.exit(rc)"]
LOOPS = 250_000  # x 4 threads


@pytest.mark.heavy
def test_a_million_hits_are_delivered_or_counted_lost(tracefs: Path, compile_c: Compiler,
                                                      tmp_path: Path) -> None:
    exe = compile_c("threads.c", "-pthread")
    out = tmp_path / "trace.jsonl"
    done = subprocess.run([*MEASURED, "trace", "--json", "-o", str(out), f"{exe}:work",
                           "--", str(exe), str(LOOPS)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"calls work={4 * LOOPS}\n"
    with out.open() as f:
        lines = sum(1 for _ in f)
        f.seek(0)
        last = ""
        for line in f:
            last = line
    summary = json.loads(last)["summary"]
    assert summary["events"] == lines - 1  # every event written, one line each
    assert summary["events"] + summary["lost"] == 4 * LOOPS
    assert f"{summary['events']} events, {summary['lost']} lost" in done.stderr
    peak_kib = int(done.stderr.rsplit("peak_rss_kib ", 1)[1].split()[0])
    print(f"\n1M hits: {summary['events']} delivered, {summary['lost']} lost, "
          f"uprobes peak RSS {peak_kib / 1024:.0f} MiB", file=sys.stderr)
