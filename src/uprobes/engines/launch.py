"""Starting a command so that probes are in place before its first instruction.

The child is forked and waits on a pipe before it execs; the engine opens
its perf events on the child's pid (which exec keeps), then releases it.
A signal sent to uprobes alone never reaches the child: it runs to its end.
A run's `--duration` does end it (`finish`): tracing stops, then the
command gets SIGTERM, as perf stat --timeout and bpftrace -c do to theirs.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from uprobes.errors import UsageError
from uprobes.sys import ptrace


@dataclass
class Launched:
    """A command started held before exec; `release()` lets it run."""

    argv: list[str]
    pid: int
    _go: int
    _err: int
    status: int | None = field(default=None)

    def release(self) -> None:
        """Let the child exec; raise UsageError if the exec failed."""
        if self._go < 0:
            return
        os.write(self._go, b"x")
        os.close(self._go)
        self._go = -1
        failure = b""
        while chunk := os.read(self._err, 512):
            failure += chunk
        os.close(self._err)
        if failure:
            self.wait()
            raise UsageError(f"cannot run {self.argv[0]}: {failure.decode(errors='replace')}")

    @property
    def held(self) -> bool:
        """Still held before exec: neither released nor aborted."""
        return self._go >= 0

    def reaped(self, status: int | None) -> None:
        """The engine reaped the command (the ptrace engine is its tracer and
        collects its exit): `status` is its exit status; None, it did not."""
        if status is not None:
            self.status = status

    def wait(self) -> int:
        """Wait for the command; its exit status as a shell reports it (128+N for signal N)."""
        if self.status is None:
            while True:
                try:
                    _, raw = os.waitpid(self.pid, 0)
                    break
                except InterruptedError:
                    continue
            self.status = ptrace.decode(raw).code
        return self.status

    def poll(self) -> int | None:
        """The exit status if the command has ended, else None."""
        if self.status is None:
            pid, raw = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = ptrace.decode(raw).code
        return self.status

    def end(self, grace: float) -> int:
        """End the command: SIGTERM, then SIGKILL if it still runs `grace`
        seconds later; its status (143 when SIGTERM ended it)."""
        if self.poll() is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                os.kill(self.pid, signal.SIGTERM)
                # The pidfd turns readable when the command has exited.
                if not select.select([pidfd], [], [], grace)[0]:
                    os.kill(self.pid, signal.SIGKILL)
            finally:
                os.close(pidfd)
        return self.wait()

    def failed(self, status: int | None) -> None:
        """The run failed: take the exit status the engine reaped (`reaped`),
        and if the command was never released, it must not run at all."""
        self.reaped(status)
        if self.held:
            self.abort()

    def abort(self) -> None:
        """The engine failed before release: the command must not run at all."""
        if self.status is None:
            if self._go >= 0:
                os.close(self._go)  # the child sees EOF and exits without exec
                self._go = -1
            self.wait()


def launch(argv: list[str]) -> Launched:
    """Fork a child that will exec `argv` once released."""
    if not argv:
        raise UsageError("no command given after --")
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: only async-signal-safe work until exec
        try:
            os.close(go_w)
            os.close(err_r)
            if os.read(go_r, 1) != b"x":
                os._exit(127)
            os.close(go_r)
            # Our own handlers must not leak into the command: defaults back.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(err_w, (e.strerror or str(e)).encode())
        finally:
            os._exit(127)
    os.close(go_r)
    os.close(err_w)
    return Launched(argv, pid, go_w, err_r)


# How long a command has to end after the SIGTERM of `finish` before it gets SIGKILL.
TERM_GRACE_S = 5.0


def finish(child: Launched, started: float, duration: float | None,
           note: Callable[[str], object]) -> int:
    """The command's status once tracing it is over: when `duration` seconds
    have passed since `started` (time.monotonic()), the run ended there, and
    so does the command (`Launched.end`); otherwise (it exited, or a signal
    stopped the tracing) it runs to its own end."""
    if duration is None or time.monotonic() - started < duration or child.poll() is not None:
        return child.wait()
    note(f"--duration {duration:g} passed: ending the command (pid {child.pid}) with SIGTERM")
    return child.end(TERM_GRACE_S)
