"""Processes as they start: the kernel's process events (`sys/proc_events`)
read in a thread of the agent's, so that what a process runs is known from
its exec on, while it surely still runs, and not only when its first hit
is read (a short-lived process is gone by then).

Where the process connector cannot be had (a container without
CAP_NET_ADMIN in the initial namespaces), one note says so and a
process's executable is read at its first hit instead.

The kernel drops events when our socket's buffer is full, and the events
end if a read fails: `on_missed` is told either way (`forever` once they
ended), so that what relies on them can look in /proc for what it missed.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable

from uprobes.errors import KernelError
from uprobes.sys.proc_events import EXEC, FORK, ProcEvents

POLL_MS = 200  # the longest a stop waits for the thread


class ProcessWatch:
    """While entered, each exec on the machine, and each new process (a fork
    runs its parent's file until it execs), is passed to `on_exec(pid)`."""

    def __init__(self, on_exec: Callable[[int], object], note: Callable[[str], object],
                 on_missed: Callable[[bool], object] = lambda forever: None,
                 buffer_bytes: int = 1 << 20) -> None:
        self.on_exec = on_exec
        self.note = note
        self.on_missed = on_missed
        self.buffer_bytes = buffer_bytes
        self._events: ProcEvents | None = None
        self._ended = False  # a read failed: no more events
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.execs = 0

    @property
    def available(self) -> bool:
        """Whether the kernel's process events are read (else nothing is passed on)."""
        return self._events is not None and not self._ended

    @property
    def overruns(self) -> int:
        """Reads that found events dropped by the kernel (our buffer was full)."""
        return self._events.overruns if self._events is not None else 0

    def __enter__(self) -> ProcessWatch:
        events = ProcEvents(self.buffer_bytes)
        try:
            events.__enter__()
        except KernelError as e:
            self.note(f"no process events ({e}): a process's executable is read at its "
                      "first hit instead")
            return self
        self._events = events
        self._thread = threading.Thread(target=self._read, name="uprobes-proc-events",
                                        daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        events = self._events
        assert events is not None
        poller = select.poll()
        poller.register(events.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            overruns = events.overruns
            try:
                batch = events.read()
            except KernelError as e:
                self.note(f"process events stopped: {e}")
                self._ended = True
                self.on_missed(True)
                return
            for ev in batch:
                if ev.what == EXEC or (ev.what == FORK and ev.tid == ev.pid):
                    self.execs += 1
                    self.on_exec(ev.pid)
            if events.overruns != overruns:  # after the events read with it
                self.on_missed(False)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._events is not None:
            self._events.__exit__(None, None, None)
            self._events = None

