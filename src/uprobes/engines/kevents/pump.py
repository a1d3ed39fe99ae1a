"""A thread of ours that calls one function every few milliseconds while a
run goes on: the kernel's events are read as they come, whether or not
probe hits come to carry them out, so their rings never fill."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

EVERY_S = 0.02
_JOIN_S = 10.0


class Pump:
    """`with Pump(fn):` calls `fn()` every `every_s` seconds on a thread until
    the block ends (then once more is the caller's business)."""

    def __init__(self, fn: Callable[[], object], every_s: float = EVERY_S) -> None:
        self.fn = fn
        self.every_s = every_s
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uprobes-kevents", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.every_s):
                self.fn()
        except BaseException as e:  # handed to the caller's thread at the end
            self.error = e

    def __enter__(self) -> Pump:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop calling and wait for the thread; raise what `fn` raised, if anything."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(_JOIN_S)
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.stop()
        else:
            self._stop.set()
            self._thread.join(_JOIN_S)
