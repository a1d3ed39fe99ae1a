"""The agent's counts-only mode (`--counts-only`, `counts_only = true`): the
kernel counts each probe's hits, the agent reads the counters when it is
asked for the metrics.

Without it every hit is an event that the agent reads and labels in Python
(by executable and comm, for the extra labels, the latencies): its CPU then
follows the hit rate of the whole machine. With it a probe is one uprobe
PMU counter per CPU (what `uprobes count` uses), read by a scrape or a
push: the agent's own work is one read per counter per export, whatever
the hit rate. What it gives up: the executable and comm of each hit (a
series per probe, `executable` the probed file, `comm` empty), latencies,
extra labels, stacks and filters, which it refuses in one line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from uprobes.engines.base import Counter, Request, open_counter
from uprobes.errors import EngineError, UsageError
from uprobes.model.event import display_names
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.resolver import Resolver

from .config import AgentConfig, check_probe
from .metrics import Labels, Metrics

WAKE_S = 0.2
"""How often the counting thread looks whether it should end."""
END_S = 120.0


def check_counts_only(config: AgentConfig) -> None:
    """What counts-only cannot do, refused in one line."""
    for probe in config.probes:
        what = ("extra labels" if probe.labels else "a comm filter" if probe.comm else
                "an executable filter" if probe.executable else "stacks" if probe.stacks
                else None)
        if what is not None:
            raise UsageError(f"{probe.line}: counts-only keeps a count per probe, not "
                             f"{what}: leave counts_only out for it")
    if config.otlp is not None or config.pyroscope is not None:
        raise UsageError("counts-only serves the counts to Prometheus: leave OTLP and "
                         "Pyroscope out, or counts_only")


class CountRun:
    """One configuration's counters, kept in a thread until `end()`; the
    metrics read them live (`Metrics.live_hits`)."""

    def __init__(self, config: AgentConfig, metrics: Metrics,
                 note: Callable[[str], object],
                 on_ready: Callable[[AgentConfig], object]) -> None:
        self.config = config
        self.metrics = metrics
        self.on_ready = on_ready
        self.note = note
        self.error: BaseException | None = None
        self.placed = False
        self.lost = 0
        self._ending = threading.Event()
        self._counter: Counter | None = None
        self._series: dict[str, tuple[str, Labels]] = {}  # display name -> (line, labels)
        metrics.keep_only({p.key: p.labels for p in config.probes})
        self._thread = threading.Thread(target=self._main, name="uprobes-agent-counts",
                                        daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            probes = Resolver().resolve_all([check_probe(p) for p in self.config.probes])
            self._series = _series(probes)
            counter = open_counter(Request(probes, self.config.engine, note=self.note))
            with counter:
                self._counter = counter
                self.metrics.live_hits = self._live
                self.placed = True
                self.metrics.placed = len(self.config.probes)
                self.on_ready(self.config)
                while not self._ending.is_set() and counter.signal is None:
                    counter.count(WAKE_S)
                final = self._live()
                self.metrics.live_hits = None
                self.metrics.add_hits(final)  # kept across a reload of unchanged probes
        except BaseException as e:  # handed to the main thread (`ended`)
            self.error = e
            self.metrics.live_hits = None

    def _live(self) -> dict[str, dict[Labels, int]]:
        counter = self._counter
        out: dict[str, dict[Labels, int]] = {}
        if counter is None:
            return out
        for name, n in counter.live_counts().items():
            line, labels = self._series.get(name, ("", ()))
            if line:
                series = out.setdefault(line, {})
                series[labels] = series.get(labels, 0) + n
        return out

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()

    def end(self) -> None:
        """Read the counters a last time and remove the probes, with a bound."""
        self._ending.set()
        self._thread.join(END_S)
        if self._thread.is_alive():
            raise EngineError(f"the probes were not removed within {END_S:g} s")
        self.metrics.placed = 0


def _series(probes: list[ResolvedProbe]) -> dict[str, tuple[str, Labels]]:
    """Each probe's count (by display name) -> its configured line and labels
    (probe, executable: the probed file, comm: none)."""
    return {name: (p.spec.text, (p.name, p.path, ""))
            for name, p in zip(display_names(probes), probes)}
