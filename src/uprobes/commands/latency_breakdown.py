"""`uprobes latency --breakdown`: the kernel's events of the timed threads,
gathered while the calls are timed, to split each call's time.

The events come from engines/kevents (sched and syscalls, filtered to the
traced threads in the kernel), read by a thread of ours (`Pump`) so the
rings never fill while the run goes on, and once more at the end;
analysis/breakdown.py does the splitting.
"""

from __future__ import annotations

import threading

from uprobes.engines.kevents.decode import parse_kernel_option
from uprobes.engines.kevents.pump import Pump
from uprobes.engines.kevents.source import KernelEvents
from uprobes.model.kevent import KernelEvent


class EventGatherer:
    """Opens the kernel's events for a target and keeps every one read."""

    def __init__(self) -> None:
        self.source = KernelEvents(parse_kernel_option("sched,syscalls"))
        self.events: list[KernelEvent] = []
        self._pump: Pump | None = None
        self._lock = threading.Lock()

    def start(self, *, pid: int | None = None, child: int | None = None) -> None:
        """Open the events for `child` (held before exec), process `pid`, or
        every task, and start reading them."""
        self.source.open(pid=pid, child=child)
        self._pump = Pump(self._read).__enter__()

    def _read(self) -> None:
        with self._lock:
            self.events.extend(self.source.read())

    def finish(self) -> list[KernelEvent]:
        """Stop recording, read what is left; every event, in time order."""
        if self._pump is not None:
            pump, self._pump = self._pump, None
            pump.stop()
        self.source.disable()
        self._read()
        self.events.sort(key=lambda e: e.ts_ns)
        return self.events

    @property
    def lost(self) -> int:
        return self.source.lost

    def close(self) -> None:
        if self._pump is not None:
            pump, self._pump = self._pump, None
            pump.__exit__(None, None, None)
        self.source.close()
