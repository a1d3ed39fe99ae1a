"""A test hook: uprobes SIGKILLs itself when the ptrace engine reaches a
named point (UPROBES_TEST_SIGKILL=POINT), so a test of what a kill -9 there
leaves the traced program does not race a timer
(tests/reliability/test_kill_points.py).

Points: `exec-placed`, a process's probes placed at its exec, the thread
still in the tracer's stop (its last report that of a single-step);
`injecting-N`, the Nth system call injected by this uprobes (xol.py), its
registers set and the thread not yet resumed; `injected-N`, the same call
made and its stop consumed, the thread's registers not yet restored.
"""

from __future__ import annotations

import os
import signal

ENV = "UPROBES_TEST_SIGKILL"


def reached(point: str) -> None:
    """Die here by SIGKILL if the environment asks for `point`."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
