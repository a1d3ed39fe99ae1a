"""The agent's run: probes in place until SIGINT or SIGTERM; SIGHUP reloads.

Each configuration runs as one `Session` (system-wide on the kernel engine:
a probe on a file is in every process that maps it, now and later), in a
thread of its own, so that the main thread keeps the signals: a reload
reads the config again while the probes run on, and a bad one is refused
with one line that says why, the probes left as they were. A good one ends
the running session (every probe removed, what the rings still hold
counted) and starts one with the new probes; the metrics keep the counts
of the probes that did not change, so a reload shows in them only as the
moment the probes were being replaced (hits then are not seen).

A probe whose file does not exist yet is waited for: the others run, and
when the file appears (looked for once a second) the session is replaced
by one with it, as on a reload. On the ptrace engine the new probes are
resolved before the running ones are taken out (`following.check`, in the
processes running their executables now): where they cannot be, one line
says so and the probes before run on untouched. (What fails only in a
process started afterwards fails that process alone: following.py.)
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from uprobes.engines.signals import StopSignals
from uprobes.errors import EngineError, UprobesError
from uprobes.model.event import Event

from .config import AgentConfig, AgentProbe
from .counting import CountRun
from .following import RESCAN_S, Following, check
from .metrics import Metrics
from .probes import Executables, OnCall, build_session, missing_file
from .processes import ProcessWatch

WATCH_S = 0.2
"""How often the main thread looks at the run, and for files probes wait for."""

END_S = 120.0
"""The longest a session may take to remove its probes once asked to end."""


class _Run:
    """One configuration's session, run in a thread."""

    def __init__(self, config: AgentConfig, metrics: Metrics, executables: Executables,
                 note: Callable[[str], object], on_ready: Callable[[AgentConfig], object],
                 lost_before: int, on_call: OnCall | None,
                 on_stack: Callable[[Event], object] | None) -> None:
        self.config = config
        self.metrics = metrics
        self.on_ready = on_ready
        self.session = build_session(config, metrics, executables, note, on_call, on_stack)
        metrics.live_lost = lambda: lost_before + self.session.lost_so_far
        self.error: BaseException | None = None
        self.placed = False
        self._ending = False
        self._thread = threading.Thread(target=self._main, name="uprobes-agent-run",
                                        daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self.session.run(ready=self._ready)
        except BaseException as e:  # handed to the main thread (`ended`)
            self.error = e

    def _ready(self) -> None:
        self.placed = True
        self.metrics.placed = len(self.config.probes)
        self.on_ready(self.config)
        if self._ending:  # asked to end while the probes were being placed
            self.session.finish()

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()

    @property
    def lost(self) -> int:
        """Records the kernel dropped in this session."""
        return self.session.lost

    def end(self) -> None:
        """End the session (every probe removed) and wait for it, with a bound."""
        self._ending = True
        self.session.finish()
        self._thread.join(END_S)
        if self._thread.is_alive():
            raise EngineError(f"the probes were not removed within {END_S:g} s")
        self.metrics.placed = 0
        self.metrics.live_lost = None


def serve(config: AgentConfig, metrics: Metrics, reload: Callable[[], AgentConfig] | None,
          note: Callable[[str], object], on_ready: Callable[[AgentConfig], object],
          duration: float | None = None, executables: Executables | None = None,
          on_call: OnCall | None = None,
          on_stack: Callable[[Event], object] | None = None) -> int:
    """Run `config` until a stop signal or `duration` seconds; `reload()`
    gives the config a SIGHUP asks for (None: SIGHUP stops, as on the other
    commands); `on_call` gets each call timed, `on_stack` each hit of a probe
    that counts stacks. Returns the signal that ended
    it (0: none)."""
    deadline = None if duration is None else time.monotonic() + duration
    executables = executables or Executables()
    lost = 0
    good: AgentConfig | None = None  # the last config whose probes were placed
    run: _Run | CountRun | Following | None = None
    waiting: dict[str, str] = {}

    running: tuple[AgentProbe, ...] = ()  # the probes of the run going on

    def start(config: AgentConfig) -> _Run | CountRun | Following | None:
        nonlocal waiting
        present, now_waiting = _split(config.probes)
        for path in sorted(set(now_waiting.values()) - set(waiting.values())):
            note(f"waiting for {path} to exist: its probes are placed when it does")
        waiting = now_waiting
        return launch(config, present)

    def start_or_back(config: AgentConfig, old: AgentConfig, old_probes: tuple[AgentProbe, ...],
                      old_waiting: dict[str, str],
                      refused: str) -> tuple[AgentConfig, _Run | CountRun | Following | None]:
        """`start(config)`; if its probes cannot be placed (resolving them
        is done here, in the main thread, on the ptrace engine), say so and
        run `old_probes` of `old` again: the agent goes on as before."""
        nonlocal waiting
        try:
            return config, start(config)
        except UprobesError as e:
            note(f"{refused}: {e}")
            waiting = old_waiting
            return old, launch(old, old_probes)

    def launch(config: AgentConfig,
               present: tuple[AgentProbe, ...]) -> _Run | CountRun | Following | None:
        nonlocal running
        running = ()
        if not present:
            return None
        run = _launch(config, present)
        running = present
        return run

    def _launch(config: AgentConfig,
                present: tuple[AgentProbe, ...]) -> _Run | CountRun | Following:
        if config.engine == "ptrace":
            run = Following(replace(config, probes=present), metrics, note, on_ready)
            following[:] = [run]
            if not watch.available:
                note(f"processes started later are looked for in /proc every "
                     f"{RESCAN_S:g} s (calls made before are not timed)")
            run.begin(events=watch.available)
            return run
        if config.counts_only:
            return CountRun(replace(config, probes=present), metrics, note, on_ready)
        return _Run(replace(config, probes=present), metrics, executables, note, on_ready, lost,
                    on_call, on_stack)

    def precheck(config: AgentConfig) -> None:
        """On the ptrace engine, raise what starting `config` would, before
        the running probes are taken out (the kernel engine's session
        resolves its probes as it starts, in its own thread)."""
        if config.engine == "ptrace":
            check(replace(config, probes=_split(config.probes)[0]))

    def stop(run: _Run | CountRun | Following | None) -> None:
        nonlocal lost
        following.clear()
        if run is not None:
            run.end()
            lost += run.lost
            metrics.set_dropped("ring_full", lost)

    following: list[Following] = []  # the run going on, when on the ptrace engine

    def on_exec(pid: int) -> None:
        executables.learn(pid)
        for f in following:
            f.consider(pid)

    def on_missed(forever: bool) -> None:
        """Process events dropped, or ended (`forever`): the ptrace engine's
        run looks in /proc for the processes they would have told of."""
        for f in list(following):
            if forever:
                note(f"processes started from now on are looked for in /proc every "
                     f"{RESCAN_S:g} s")
            f.missed(forever)

    with StopSignals() as signals, ProcessWatch(on_exec, note, on_missed) as watch:
        poller = select.poll()
        poller.register(signals.fileno(), select.POLLIN)
        run = start(config)
        try:
            while True:
                wait = WATCH_S if deadline is None else min(WATCH_S, deadline - time.monotonic())
                if wait > 0:
                    poller.poll(int(wait * 1000) + 1)
                _drain(signals.fileno())
                if run is not None and run.placed:
                    good = config
                if run is not None and run.ended:
                    stop(run)
                    error, run = run.error, None
                    if error is None:
                        return 0
                    if good is None or good is config or not isinstance(error, UprobesError):
                        raise error
                    note(f"reload refused, back to the probes before it: {error}")
                    config = good
                    run = start(config)
                    continue
                signum, signals.signum = signals.signum, None
                if signum == signal.SIGHUP and reload is not None:
                    try:
                        new = reload()
                    except UprobesError as e:
                        note(f"reload refused, the probes stay as they were: {e}")
                        continue
                    metrics.max_series = new.max_series
                    sinks = (new.prometheus, new.otlp, new.pyroscope)
                    if sinks != (config.prometheus, config.otlp, config.pyroscope):
                        note("the sinks ([prometheus], [otlp], [pyroscope]) are read when the "
                             "agent starts: restart it to change them; the probes reload")
                    if new.probes == config.probes and new.engine == config.engine \
                            and new.counts_only == config.counts_only:
                        note(f"reloaded {new.source}: the probes are unchanged, left in place")
                        config = new
                        continue
                    try:
                        precheck(new)
                    except UprobesError as e:
                        note(f"reload refused, the probes stay as they were: {e}")
                        continue
                    old, old_probes, old_waiting = config, running, waiting
                    stop(run)
                    run = None
                    config, run = start_or_back(new, old, old_probes, old_waiting,
                                                "reload refused, back to the probes before it")
                    if config is new:
                        note(f"reloaded {new.source}: {len(new.probes)} probe lines")
                    continue
                if signum is not None:
                    return signum
                if deadline is not None and time.monotonic() >= deadline:
                    return 0
                if waiting and any(os.path.exists(p) for p in set(waiting.values())):
                    old_probes, old_waiting = running, waiting
                    appeared = {p for p in waiting.values() if os.path.exists(p)}
                    try:
                        precheck(config)
                    except UprobesError as e:
                        note(f"the probes on {', '.join(sorted(appeared))} not placed, "
                             f"the others run on: {e}")
                        waiting = {line: p for line, p in waiting.items() if p not in appeared}
                        continue
                    stop(run)
                    run = None
                    # Refused, the file is waited for no more (it exists): its
                    # probes stay out until a reload.
                    config, run = start_or_back(
                        config, config, old_probes,
                        {line: p for line, p in old_waiting.items() if p not in appeared},
                        f"the probes on {', '.join(sorted(appeared))} not placed, "
                        "the others run on")
        finally:
            stop(run)


def _split(probes: tuple[AgentProbe, ...]) -> tuple[tuple[AgentProbe, ...], dict[str, str]]:
    """The probes whose files exist, and line -> missing file of the others."""
    waiting = {p.line: path for p in probes if (path := missing_file(p)) is not None}
    return tuple(p for p in probes if p.line not in waiting), waiting


def _drain(fd: int) -> None:
    """Empty the signal pipe (non-blocking), so the next poll waits again."""
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass
