"""The Python API, `uprobes.Session`, on the kernel engine: real fixture, exact values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler

import uprobes
from uprobes.errors import ResolveError, SpecError, UsageError

LOOPS = 7


@pytest.fixture
def target(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("target.c")


def untraced(*argv: str) -> str:
    """What the command prints when nothing traces it: a traced run prints the same."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


def test_spawn_delivers_exact_args_and_return_values(target: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    s = uprobes.Session(engine="kernel")
    entries: list[tuple[int, int]] = []
    returns: list[int] = []

    @s.probe(f"{target}:add a=%di:s64 b=%si:s64")
    def on_add(ev: uprobes.Event) -> None:
        assert ev.kind == "p" and ev.comm == target.name[:15]
        entries.append((ev.args["a"], ev.args["b"]))

    s.probe(f"r {target}:add sum=$retval:s64", lambda ev: returns.append(ev.args["sum"]))
    status = s.spawn([str(target), str(LOOPS)])
    assert status == 0
    assert capfd.readouterr().out == untraced(str(target), str(LOOPS))  # its output is its own
    assert entries == [(i, 100) for i in range(LOOPS)]
    assert returns == [i + 100 for i in range(LOOPS)]
    assert s.events == 2 * LOOPS and s.lost == 0


def test_one_line_twice_is_one_probe_with_two_consumers_and_filters(target: Path) -> None:
    s = uprobes.Session()
    first: list[int] = []
    second: list[int] = []
    line = f"{target}:add a=%di:s64"
    s.probe(line, lambda ev: first.append(ev.args["a"]))
    s.probe(line, lambda ev: second.append(ev.args["a"]), filter=lambda ev: ev.args["a"] % 2 == 0)
    s.probe(line, lambda ev: pytest.fail("comm filter let a hit through"), comm="nobody")
    third: list[int] = []
    s.probe(line, lambda ev: third.append(ev.args["a"]), condition="a >= 3 && a & 1")
    assert s.spawn([str(target), str(LOOPS)]) == 0
    assert len(s.probes) == 1  # placed once
    assert first == list(range(LOOPS))
    assert second == [i for i in range(LOOPS) if i % 2 == 0]
    assert third == [i for i in range(LOOPS) if i >= 3 and i & 1]


def test_stop_from_a_handler_ends_the_run_and_the_command_runs_on(
        target: Path, capfd: pytest.CaptureFixture[str]) -> None:
    s = uprobes.Session()
    seen: list[int] = []

    @s.probe(f"{target}:add a=%di:s64")
    def first_only(ev: uprobes.Event) -> None:
        seen.append(ev.args["a"])
        s.stop()

    status = s.spawn([str(target), "2000"])
    assert status == 0
    assert capfd.readouterr().out == untraced(str(target), "2000")
    assert seen and seen[0] == 0
    assert len(seen) < 2000


def test_a_handler_that_raises_stops_tracing_not_the_command(
        target: Path, capfd: pytest.CaptureFixture[str]) -> None:
    s = uprobes.Session()

    @s.probe(f"{target}:greet")
    def boom(ev: uprobes.Event) -> None:
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError, match="handler bug"):
        s.spawn([str(target), str(LOOPS)])
    assert capfd.readouterr().out == untraced(str(target), str(LOOPS))
    # (the autouse no_leftover_probes fixture checks that nothing stays placed)


def test_attach_follows_a_running_process(target: Path) -> None:
    proc = subprocess.Popen([str(target), str(LOOPS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TARGET_WAIT": "1"})
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith("ready")
        s = uprobes.Session()
        points: list[tuple[int, int]] = []
        s.probe(f"{target}:point_sum x=+0(%di):s32 y=+4(%di):s32",
                lambda ev: points.append((ev.args["x"], ev.args["y"])), pid=proc.pid)
        def release() -> None:  # probes are in place: let it make its calls
            proc.stdin.write("go\n")
            proc.stdin.flush()
        s.attach(proc.pid, ready=release)
        assert proc.wait(60) == 0
    finally:
        proc.kill() if proc.poll() is None else None
    assert points == [(3, 4)] * LOOPS


def test_bad_input_is_a_clear_error_at_the_line_that_made_it(target: Path) -> None:
    s = uprobes.Session()
    with pytest.raises(SpecError):
        s.probe(f"{target}:add a=%nosuchreg")
    with pytest.raises(SpecError, match="has no field 'b'"):
        s.probe(f"{target}:add a=%di", print, condition="b > 1")
    with pytest.raises(UsageError, match="no probes"):
        s.spawn([str(target)])
    s = uprobes.Session()
    s.probe(f"{target}:no_such_function", print)
    with pytest.raises(ResolveError):
        s.spawn([str(target)])
    with pytest.raises(UsageError, match="runs once"):
        s.spawn([str(target)])
    with pytest.raises(UsageError, match="unknown engine"):
        uprobes.Session(engine="dtrace")


def test_the_readme_example_runs(tracefs: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "malloc_sizes.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("ls exited 0:") and "malloc calls" in lines[-1]


def test_ptrace_engine_same_events_and_handlers_that_change_registers(
        target: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The same lines on the ptrace engine give the kernel's values, and a
    handler there runs while the thread is stopped: it can change the value
    `add` returns to its caller."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    for engine in ("kernel", "ptrace"):
        s = uprobes.Session(engine=engine)
        got: list[tuple[int, ...]] = []
        s.probe(f"{target}:add a=%di:s64 b=%si:s64",
                lambda ev, got=got: got.append((ev.args["a"], ev.args["b"])))
        s.probe(f"r {target}:add v=$retval:s64",
                lambda ev, got=got: got.append((ev.args["v"],)))
        assert s.spawn([str(target), str(LOOPS)]) == 0
        assert s.engine_used == engine
        seen[engine] = got
    assert seen["kernel"] == seen["ptrace"] and len(seen["kernel"]) == 2 * LOOPS
    capfd.readouterr()

    s = uprobes.Session(engine="ptrace")

    @s.probe(f"r {target}:add")
    def bump(ev: uprobes.Event) -> None:
        assert ev.hit is not None and ev.hit.regs.rip == ev.ip
        ev.hit.set(rax=ev.hit.regs.rax + 1000)

    assert s.spawn([str(target), "3"]) == 0
    out = capfd.readouterr().out
    plain = int(untraced(str(target), "3").rsplit("total=", 1)[1])
    assert out.endswith(f" total={plain + 3000}\n")  # three add() calls return 1000 more each
