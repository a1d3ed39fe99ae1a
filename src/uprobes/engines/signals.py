"""SIGINT, SIGTERM and SIGHUP stop a run instead of killing it, so its
clean-up runs; the previous handlers come back on exit.

A handler only sets a flag and writes a byte to a pipe that the run's poll
loop watches, so the loop wakes at once (PEP 475 would otherwise resume the
poll until its timeout).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """While entered, the stop signals set `signum` and make `fileno()` readable."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, Any] = {}

    def fileno(self) -> int:
        return self._r

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        try:
            os.write(self._w, b"s")
        except OSError:
            pass  # the pipe is full: the loop is already woken

    def __enter__(self) -> StopSignals:
        global _runs
        _runs += 1
        # signal.signal works only in the main thread; elsewhere the caller
        # stops the run itself (a Python API user in a worker thread).
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        for fd in (self._r, self._w):
            os.close(fd)


_runs = 0  # tracing runs entered by this process (StopSignals)

WAKE_SIGNAL = signal.SIGRTMIN + 2
"""Wakes a tracer blocked in a wait outside the main thread (a ptrace
tracer's `wake()`, and the timer that bounds its waits)."""


def _woken(signum: int, frame: FrameType | None) -> None:
    """Nothing to do: the signal's work is to interrupt a wait."""


def install_wake_handler() -> None:
    """From the main thread, once: catch `WAKE_SIGNAL` with a handler that
    does nothing. Python installs its handlers without SA_RESTART, so the
    signal makes a blocking wait in whichever thread it reaches return
    (EINTR). Without it, a tracer outside the main thread cannot block (the
    signal would end the process) and polls instead, backing off to the
    run loop's wake-up period between polls."""
    signal.signal(WAKE_SIGNAL, _woken)


def wake_handler_installed() -> bool:
    """Whether `install_wake_handler()` ran (from any thread)."""
    return signal.getsignal(WAKE_SIGNAL) is _woken


class StopRequested(KeyboardInterrupt):
    """A stop signal before any tracing began: stop (nothing is placed yet)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class CommandSignals:
    """For one whole command: SIGINT, SIGTERM and SIGHUP before tracing
    begins stop it (StopRequested; nothing is placed yet); while tracing,
    StopSignals takes them; once a tracing run has ended, they are only
    noted, so a late one cannot kill us between the clean-up and passing on
    the traced command's exit status."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._runs_before = _runs
        self.late: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if _runs == self._runs_before:
            raise StopRequested(signum)
        self.late = signum

    def __enter__(self) -> CommandSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
