"""A traced program that turns its time-stamp counter off (prctl(PR_SET_TSC,
PR_TSC_SIGSEGV), or seccomp strict mode, which does it too): the trap-free
code's rdtsc/rdtscp fault there, and the tracer reads the counter for it
(engines/ptrace/loop.py `_emulate_tsc`). The program runs as untraced and
every hit is kept, as the kernel engine keeps them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler, read_fd_until

UPROBES = [sys.executable, "-m", "uprobes"]
AFTER = 3000  # calls after the counter is off (100 before)
ROUNDS = 20  # attach-detach rounds: the old code killed the program in 1 of 8 or so


@pytest.fixture(scope="module")
def tsc_off(compile_c: Compiler) -> Path:
    return compile_c("tsc_off.c", "-O1")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _hits(command: str, engine: str, exe: Path, mode: str, tmp_path: Path
          ) -> tuple[subprocess.CompletedProcess[str], int]:
    """(the run, the hits `command` reports for work())."""
    out = tmp_path / f"{command}-{engine}-{mode}"
    argv = [*UPROBES, command, "-e", engine, "-o", str(out)]
    if command != "record":
        argv.append("--json")
    run = _run([*argv, f"{exe}:work", "--", str(exe), mode, str(AFTER)])
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    if command == "latency":
        return run, int(json.loads(out.read_text())["uprobes/work"]["count"])
    text = _run([*UPROBES, "replay", "--json", str(out)]).stdout if command == "record" \
        else out.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    return run, sum(1 for e in lines if e.get("probe") == "uprobes/work")


@pytest.mark.parametrize("mode", ["tsc", "strict"])
@pytest.mark.parametrize("command", ["trace", "latency", "record"])
def test_a_program_without_its_tsc_runs_as_untraced(tsc_off: Path, tmp_path: Path,
                                                      mode: str, command: str) -> None:
    untraced = _run([str(tsc_off), mode, str(AFTER)])
    assert untraced.returncode == 0 and untraced.stdout.startswith(f"calls {100 + AFTER} ")
    run, hits = _hits(command, "ptrace", tsc_off, mode, tmp_path)
    assert run.stdout == untraced.stdout
    assert hits == 100 + AFTER
    assert "SIGSEGV" not in run.stderr
    assert "turned the time-stamp counter off" in run.stderr
    # Every rdtsc/rdtscp ours (latency: two a call, after the prctl).
    done = int(run.stderr.split("probe code ")[1].split(" times")[0])
    assert done == AFTER * (2 if command == "latency" else 1)


@pytest.mark.parametrize("mode", ["tsc", "strict"])
def test_the_hits_are_the_kernel_engines(tsc_off: Path, tmp_path: Path, mode: str,
                                         tracefs: Path) -> None:
    kernel_run, kernel = _hits("trace", "kernel", tsc_off, mode, tmp_path)
    run, ours = _hits("trace", "ptrace", tsc_off, mode, tmp_path)
    assert run.stdout == kernel_run.stdout
    assert ours == kernel == 100 + AFTER


def test_attached_to_a_program_without_its_tsc(tsc_off: Path, tmp_path: Path) -> None:
    """-p: the counter was off before uprobes came; every hit is kept all the same."""
    out = tmp_path / "attached.jsonl"
    proc = subprocess.Popen([str(tsc_off), "tsc", str(AFTER), "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    tracer = None
    try:
        assert proc.stdout.readline() == "off\n"
        tracer = subprocess.Popen([*UPROBES, "trace", "-e", "ptrace", "--json", "-o", str(out),
                                   "-p", str(proc.pid), f"{tsc_off}:work"],
                                  stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        notes = read_fd_until(tracer.stderr.fileno(), "tracing")
        assert "tracing" in notes, notes
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.read() == f"calls {100 + AFTER} sum " + _sum() + "\n"
        assert proc.wait(timeout=60) == 0
        _, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0, err
        events = [json.loads(line) for line in out.read_text().splitlines()]
        assert sum(1 for e in events if e.get("probe") == "uprobes/work") == AFTER
        assert f"probe code {AFTER} times" in err
    finally:
        proc.kill()
        if tracer is not None:
            tracer.kill()
            tracer.wait()
        proc.wait()


def _sum() -> str:
    """What the fixture's calls add up to, as it prints it."""
    def work(x: int) -> int:
        for k in range(3):
            x = x * 31 + k
        return x
    return str(sum(work(i) for i in range(100)) + sum(work(i) for i in range(AFTER)))


def test_detached_while_a_hit_waits_for_its_counter(tsc_off: Path, tmp_path: Path) -> None:
    """The end of a run stops every thread: one stopped at the SIGSEGV of our
    rdtscp (about one end in eight, with every hit trapping) gets it done
    there too, instead of the signal after detach. Attach and detach again
    and again; the program lives through every one."""
    proc = subprocess.Popen([str(tsc_off), "tsc", "0", "loop"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "off\n"
        for _ in range(ROUNDS):
            run = _run([*UPROBES, "trace", "-e", "ptrace", "-o", os.devnull, "--duration",
                        "0.3", "-p", str(proc.pid), f"{tsc_off}:work"])
            assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
            assert proc.poll() is None, (proc.returncode, run.stderr)
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read().startswith("calls ")
    finally:
        proc.kill()
        proc.wait()
