"""Starting a command held before exec: statuses, failures, signals."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from uprobes.engines.launch import launch
from uprobes.errors import UsageError


def test_child_waits_until_released(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "ran"
    child = launch(["/bin/sh", "-c", f"touch {marker}"])
    assert child.poll() is None
    # Held before exec: still our own program image, and nothing ran yet.
    assert os.readlink(f"/proc/{child.pid}/exe") == os.readlink("/proc/self/exe")
    assert not marker.exists()
    child.release()
    assert child.wait() == 0 and marker.exists()


@pytest.mark.parametrize("argv,status", [
    (["/bin/sh", "-c", "exit 3"], 3),
    (["/bin/sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
    (["/bin/true"], 0),
])
def test_exit_status_like_a_shell(argv: list[str], status: int) -> None:
    child = launch(argv)
    child.release()
    assert child.wait() == status
    shell = subprocess.run(["/bin/sh", "-c", " ".join(f"'{a}'" for a in argv) + "; echo $?"],
                           capture_output=True, text=True)
    assert int(shell.stdout.split()[-1]) == status


def test_exec_failure_is_a_usage_error() -> None:
    child = launch(["/no/such/program"])
    with pytest.raises(UsageError, match="cannot run /no/such/program"):
        child.release()
    assert child.status == 127


def test_abort_before_release_never_runs_the_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "ran"
    child = launch(["/bin/sh", "-c", f"touch {marker}"])
    child.abort()
    assert child.status == 127 and not marker.exists()


def test_signal_handlers_reset_in_the_child() -> None:
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        child = launch(["/bin/sh", "-c", "kill -TERM $$; exit 0"])
        child.release()
        assert child.wait() == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, old)


def test_empty_command() -> None:
    with pytest.raises(UsageError, match="no command"):
        launch([])
