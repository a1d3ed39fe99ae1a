"""The kernel engine with -p when the process ends while its probes are
resolved or placed: its ending is not our error. During placement the run
ends as after any exit of the process (a note says so, what was placed is
removed, the counts are printed, exit 0); during resolution the error is
one line saying it exited (exit 2). The process is killed from inside the
run (a wrapper around the step, then the step itself), so the moment is
the same in every run."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, without_clocks

from uprobes.commands import main
from uprobes.engines.kernel.counting import KernelCounter
from uprobes.engines.kernel.tracer import KernelTracer
from uprobes.resolve.resolver import Resolver

PROBES = 8  # pages.c: f0..f7, one kernel event each


@pytest.fixture(scope="module")
def pages(compile_c: Compiler) -> Path:
    return compile_c("pages.c")


@pytest.fixture
def target(pages: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([str(pages)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready ")
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def kill_at(monkeypatch: pytest.MonkeyPatch, owner: type, step: str, nth: int,
            proc: subprocess.Popen[str]) -> list[int]:
    """Make `owner.step` kill and reap `proc` just before its `nth` call
    (0: the first); the calls made are counted in the list returned."""
    real: Callable[..., Any] = getattr(owner, step)
    calls: list[int] = []

    def step_then(self: object, *args: object, **kwargs: object) -> Any:
        if len(calls) == nth:
            proc.kill()
            proc.wait()
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, step, step_then)
    return calls


@pytest.mark.parametrize("nth", [0, 1, PROBES - 1])
@pytest.mark.parametrize("command", ["count", "trace"])
def test_exit_during_placement(command: str, nth: int, pages: Path,
                               target: subprocess.Popen[str], tracefs: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    owner = KernelCounter if command == "count" else KernelTracer
    calls = kill_at(monkeypatch, owner, "_place", nth, target)
    status = main([command, "-e", "kernel", "--json", "-p", str(target.pid), f"{pages}:f?"])
    out, err = capsys.readouterr()
    assert target.returncode == -signal.SIGKILL and calls  # it did die mid-placement
    assert status == 0, err
    assert f"uprobes: note: process {target.pid} exited while its probes were placed" in err
    assert "error" not in err and "refused" not in err and "skipped" not in err, err
    if command == "count":
        counts = json.loads(out.splitlines()[-1])
        assert counts == {f"uprobes/f{i}": 0 for i in range(PROBES)}
    else:
        summary = without_clocks(json.loads(out.splitlines()[-1]))
        assert summary == {"summary": {"events": 0, "lost": 0}}


@pytest.mark.parametrize("command", ["count", "trace"])
def test_exit_during_resolution(command: str, pages: Path, target: subprocess.Popen[str],
                                tracefs: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    kill_at(monkeypatch, Resolver, "resolve", 1, target)
    status = main([command, "-e", "kernel", "-p", str(target.pid), f"{pages}:f0",
                   f"{pages}:f1"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err == f"uprobes: error: process {target.pid} exited while its probes were " \
                  "being resolved\n"
