"""Watchers: clean-up that happens even when uprobes is SIGKILLed.

What a run leaves in the system when it dies without its own clean-up
(tracefs probes of the kernel engine, int3s of the ptrace engine) is
removed by a watcher: a separate small process, exec'd (so it holds none
of our fds) in a session of its own (so Ctrl-C at the terminal does not
reach it), whose stdin is a pipe that only we hold. We write to it what
it must undo as we make it (line records, each engine its own); EOF comes
when we exit by any means, and the watcher then undoes what is still
recorded. After a normal exit the records say there is nothing left.

The kernel closes a dying process's files (exit_files) before it detaches
its tracees (exit_notify), so a watcher may start its work while our
tracees are still in a ptrace stop; what it writes must be safe then.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable


def start_watcher(module: str, *args: str) -> int | None:
    """Start `python -m module ARGS...` as a watcher; the write end of its
    stdin (ours alone, held until we exit), or None if it could not start
    (then `uprobes cleanup` is the way after a SIGKILL)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        subprocess.Popen([sys.executable, "-m", module, *args], stdin=r,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError:
        os.close(w)
        return None
    finally:
        os.close(r)
    return w


def send(fd: int, text: str) -> bool:
    """Write records to a watcher; False if it is gone (killed), so the
    caller can stop writing (our SIGPIPE is ignored: Python's default)."""
    data = text.encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


class Watch:
    """A watcher started on the first record, to which any thread may write:
    one for several runs (the agent's tracers, one per process followed),
    whose records each name their process. A lock keeps each write whole (a
    batch may exceed PIPE_BUF, and the pipe then takes it in parts)."""

    def __init__(self, module: str) -> None:
        self.module = module
        self._fd: int | None = None
        self._dead = False
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._fd is not None and not self._dead

    def send(self, text: str) -> bool:
        """Write records (started first if need be); False if the watcher
        could not start or is gone."""
        with self._lock:
            if self._dead:
                return False
            if self._fd is None:
                self._fd = start_watcher(self.module)
                if self._fd is None:
                    self._dead = True
                    return False
            if not send(self._fd, text):
                self._dead = True
            return not self._dead

    def close(self) -> None:
        """Let the watcher go: it undoes what its records still hold, then exits."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._dead = True


def read_until_eof(on_line: Callable[[str], None] | None = None) -> None:
    """In the watcher: read stdin until every writer is gone, handing each
    complete line to `on_line`."""
    rest = b""
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            return
        if on_line is None:
            continue
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            on_line(line.decode())
