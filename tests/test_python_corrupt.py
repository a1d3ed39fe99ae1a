"""Python stacks of a program that corrupts its own interpreter state at
the probe point (tests/fixtures/py_corrupt.py: a frame chain that loops, a
`previous` into unmapped memory, a code object that is garbage, not an
address, or claims absurd sizes, a thread state whose frame pointer is
garbage, a thread list that is). The program is untrusted input to a root
tracer: `trace --python` and `stacks --python`, at an int3 and trap-free,
end within a bound with no traceback, show the frames that can be read and
a marker for the rest (`...` where the chain cannot be followed, `<bad
frame>` for a frame whose code object cannot be read), and leave the
program's output and exit status as they are untraced."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import CPYTHONS, LATER_CPYTHONS, Compiler, killed_after, read_fd_until

from uprobes.resolve.pyprocess import find_interpreter
from uprobes.unwind.cpython import reader
from uprobes.unwind.cpython.linetable import LineTable

FIXTURE = str(Path(__file__).parent / "fixtures" / "py_corrupt.py")
UPROBES = [sys.executable, "-m", "uprobes"]
BOUND_S = 120
"""What a whole run may take, loaded machine and all (it takes seconds)."""
FULL = ["victim", "middle", "outer", "main", "<module>"]
BAD_CODE = ["victim", "<bad frame>", "outer", "main", "<module>"]
INT3 = {
    "self_loop": [["victim", "..."]],
    "earlier_loop": [["victim", "middle", "outer", "..."]],
    "unmapped_previous": [["victim", "middle", "..."]],
    "garbage_code": [BAD_CODE],
    "wild_code": [BAD_CODE],
    "absurd_code": [BAD_CODE],
    "bad_frame_pointer": [["..."]],
    # (the thread's state as found at an earlier hit, or none found)
    "bad_thread_state": [FULL, [], ["..."]],
}
TRAPFREE = INT3 | {
    # Named after the hit: a code object that cannot be named then may have
    # been freed since (the walk copied its fingerprint, not its strings).
    "garbage_code": [BAD_CODE, ["victim", "<freed code>", "outer", "main", "<module>"]],
    # The fingerprints are copied by one call, which stops at the first
    # address that cannot be read: the stack ends there.
    "wild_code": [["victim", "..."]],
    # (its state from the pthread key, not the thread list)
    "bad_thread_state": [FULL],
}


@cache
def _layout(python: str) -> str:
    """The offsets of `python`'s interpreter, as JSON (its Layout's fields)."""
    prog = subprocess.Popen([python, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert prog.stdout is not None and prog.stdout.readline() == "up\n"
        interp = find_interpreter(prog.pid)
        assert interp is not None
        return json.dumps(interp.layout.fields)
    finally:
        prog.kill()
        prog.wait()


def _lib(compile_c: Compiler) -> Path:
    return compile_c("py_corrupt.c", "-shared", "-fPIC", name="py_corrupt.so")


def _argv(python: str, compile_c: Compiler) -> list[str]:
    return [python, FIXTURE, _layout(python), str(_lib(compile_c))]


def _spec(argv: list[str]) -> str:
    """The probe point: the fixture library's probe_point."""
    return f"{argv[-1]}:probe_point"


def _untraced(argv: list[str]) -> str:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=BOUND_S)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _stacks(out: str) -> list[list[str]]:
    """Each hit's Python frames, innermost first, from `trace --json`."""
    hits = [json.loads(x) for x in out.splitlines() if '"probe"' in x]
    return [[str(f["symbol"]) for f in h["stack"] if f.get("python")] for h in hits]


def _judge(stacks: list[list[str]], expected: dict[str, list[list[str]]]) -> None:
    assert len(stacks) == len(expected), stacks
    wrong = {case: got for (case, allowed), got in zip(expected.items(), stacks, strict=True)
             if got not in allowed}
    assert not wrong, wrong


INTERPRETERS = CPYTHONS + LATER_CPYTHONS


def _of_command(argv: list[str], command: list[str], tmp_path: Path) -> str:
    """What `uprobes COMMAND --python ... -- ARGV` at probe_point writes (at an
    int3), once it ended within the bound, with no traceback, the program's
    output its untraced one."""
    out = tmp_path / "out"
    done = subprocess.run([*UPROBES, command[0], "-e", "ptrace", "--python", *command[1:], "-o",
                           str(out), _spec(argv), "--", *argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == _untraced(argv)
    return out.read_text()


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_corrupt_frames_of_a_command(python: str, compile_c: Compiler, tmp_path: Path) -> None:
    """`trace --python -- CMD` (at an int3): each case's readable frames and
    its marker; the program's output and status its untraced ones. Before:
    a loop ended the stack with no marker, a `previous` into nothing lost
    every Python frame, a code object that is not one showed `<freed code>`,
    one claiming a line table of 2^40 code units ended the stack."""
    _judge(_stacks(_of_command(_argv(python, compile_c), ["trace", "--json"], tmp_path)), INT3)


@pytest.mark.root
def test_corrupt_frames_in_stacks(compile_c: Compiler, tmp_path: Path) -> None:
    """`stacks --python` (folded) counts the same stacks, markers and all."""
    out = _of_command(_argv("/usr/bin/python3.11", compile_c), ["stacks", "--folded"], tmp_path)
    folded = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}
    python = [";".join(f.split(" (")[0] for f in stack.split(";")
                       if f in ("...", "<bad frame>") or " (py_corrupt.py:" in f)
              for stack in folded]
    assert sorted(python) == sorted(["..." + ";victim", "...;outer;middle;victim",
                                     "...;middle;victim", "<module>;main;outer;<bad frame>;victim",
                                     "...", "<module>;main;outer;middle;victim"]), folded
    assert folded[next(s for s in folded if "<bad frame>" in s)] == 3


def attached(argv: list[str], flags: list[str], tmp_path: Path, spec: str
             ) -> tuple[str, str, str]:
    """`trace --python -p ... SPEC` of a program (argv) that prints "ready",
    runs at a line on stdin, prints "done" and exits 0 at another line:
    (its stdout to "done", uprobes' stderr, the hits as JSON lines)."""
    prog = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out = tmp_path / "hits.jsonl"
    tracer: subprocess.Popen[bytes] | None = None
    try:
        with killed_after(prog, BOUND_S):
            assert prog.stdin is not None and prog.stdout is not None
            lines = [prog.stdout.readline()]
            tracer = subprocess.Popen(
                [*UPROBES, "trace", "-e", "ptrace", "--python", "--json", *flags, "-o",
                 str(out), "-p", str(prog.pid), spec], stderr=subprocess.PIPE)
            assert tracer.stderr is not None
            said = read_fd_until(tracer.stderr.fileno(), "Ctrl-C to stop")
            assert "Ctrl-C to stop" in said, said
            prog.stdin.write("go\n")
            prog.stdin.flush()
            while lines[-1] not in ("done\n", ""):
                lines.append(prog.stdout.readline())
            tracer.send_signal(signal.SIGINT)
            _, err = tracer.communicate(timeout=BOUND_S)
            assert tracer.returncode == 0 and "Traceback" not in err.decode(), err
            prog.stdin.write("end\n")
            prog.stdin.flush()
            assert prog.wait(timeout=BOUND_S) == 0
        return "".join(lines), said + err.decode(), out.read_text()
    finally:
        prog.kill()
        prog.wait()
        if tracer is not None:
            tracer.kill()
            tracer.wait()


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
@pytest.mark.parametrize("trapfree", [True, False], ids=["trapfree", "int3"])
def test_corrupt_frames_of_a_running_process(python: str, trapfree: bool,
                                             compile_c: Compiler, tmp_path: Path) -> None:
    """`trace --python -p` (trap-free: the probe's code copies the chain;
    `--no-trapfree`: read at an int3): each case's readable frames and its
    marker, the program's own output and exit status."""
    argv = _argv(python, compile_c)
    stdout, said, hits = attached(argv, [] if trapfree else ["--no-trapfree"], tmp_path,
                                  _spec(argv))
    assert ("1 of 1 probes trap-free" in said) == trapfree, said
    assert stdout == _untraced(argv)
    _judge(_stacks(hits), TRAPFREE if trapfree else INT3)


def test_the_fixture_restores_what_it_corrupts(compile_c: Compiler) -> None:
    """Untraced, every case goes on as if nothing had happened (the oracle
    the traced runs are held to)."""
    out = _untraced(_argv("/usr/bin/python3.11", compile_c)).splitlines()
    assert out == ["ready", *(f"{case} ok" for case in INT3), "done"]



def test_frames_kept_per_code_object_are_bounded() -> None:
    """The code unit a frame runs at is the program's word: one that names a
    new unit at each hit (a `prev_instr` written over) no longer grows what
    is kept for its code object without bound (before: a frame per unit
    ever named, 20,000 here)."""
    code = reader._Code(b"", "f.py", "f", 1, 0, 1 << 40, LineTable(b"", 1), 0, {})
    budget = reader._Budget(lambda addr, n: b"\0" * n)
    for unit in range(20000):
        assert code.frame(unit, budget).symbol == "f"
    assert len(code.frames) <= 4096  # (reader._MAX_CODE_FRAMES)
