"""The agent's run: probes in place until SIGINT or SIGTERM; SIGHUP reloads.

Each configuration runs as one `Session` (system-wide on the kernel engine:
a probe on a file is in every process that maps it, now and later). A
reload reads the config again; a bad one is refused with one line that
says why, and the running probes stay as they were. A good one ends the
running session (every probe removed, as on any exit) and starts one with
the new probes; the metrics keep the counts of the probes that did not
change, so a reload shows in them only as the moment the probes were
being replaced (hits then are not seen).

Signals: the engine takes SIGINT, SIGTERM and SIGHUP while its run goes
on (a stop signal ends the run, never the program); between runs our own
handler notes them, and a run that starts after one ends at once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from uprobes.engines.signals import StopSignals
from uprobes.errors import UprobesError
from uprobes.session import Session

from .config import AgentConfig
from .metrics import Metrics
from .probes import Executables, build_session


def serve(config: AgentConfig, metrics: Metrics, reload: Callable[[], AgentConfig] | None,
          note: Callable[[str], object], on_ready: Callable[[AgentConfig], object],
          duration: float | None = None) -> int:
    """Run `config` until a stop signal or `duration` seconds; `reload()`
    gives the config a SIGHUP asks for (None: SIGHUP stops, as on the other
    commands). Returns the signal that ended it (0: none)."""
    deadline = None if duration is None else time.monotonic() + duration
    executables = Executables()
    lost_before = 0
    good: AgentConfig | None = None  # the last config that ran
    with StopSignals() as between:
        while True:
            session = build_session(config, metrics, executables, note)
            metrics.live_lost = lambda s=session, n=lost_before: n + s.lost_so_far

            def ready(config: AgentConfig = config, session: Session = session) -> None:
                nonlocal good
                good = config
                metrics.placed = len(config.probes)
                on_ready(config)
                if between.stopped:  # came while the probes were being placed
                    session.stop()

            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                session.run(left, ready=ready)
            except UprobesError as e:
                if good is None or good is config:
                    raise
                note(f"reload refused, back to the probes before it: {e}")
                config = good
                continue
            finally:
                metrics.placed = 0
                metrics.live_lost = None
                lost_before += session.lost
                metrics.set_dropped("ring_full", lost_before)
            signum = session.signal or between.signum
            between.signum = None
            if signum != signal.SIGHUP or reload is None:
                return signum or 0
            try:
                config = reload()
            except UprobesError as e:
                note(f"reload refused, the probes stay as they were: {e}")
                continue
            note(f"reloaded {config.source}: {len(config.probes)} probe lines")
