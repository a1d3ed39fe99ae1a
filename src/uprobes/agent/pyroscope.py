"""Pyroscope: the stacks that reach the probes, pushed as folded stacks.

Each probe line asked for stacks (`stacks = true`, or every line with
`--pyroscope`) counts the distinct paths of its hits (`comm;main;...;probed
3`, outermost first, as `uprobes stacks --folded` writes them) in a table
the probing thread fills. Every interval the push thread puts a new table
in its place and waits until no hit is being counted (a hit that took the
old table just before the swap has finished with it), then POSTs the old
one to
`URL/ingest?name=APP.hits{probe=...}&from=..&until=..&format=folded`, the
form Pyroscope's ingest API takes by default, one request per probe.

Bounded: a table holds at most MAX_STACKS distinct paths per probe; hits
on a path past that are counted in `uprobes_dropped_total{reason=
"stacks_overflow"}`. A push the server does not take is counted
(`pyroscope_push_failed`, its hits) and the next interval starts afresh:
memory never grows while the server is away, and probing never waits for it.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from uprobes.analysis.stacks import folded_name
from uprobes.model.event import Event

from .metrics import Metrics

MAX_STACKS = 10000
"""Distinct stacks one probe keeps per interval."""

PUSH_TIMEOUT_S = 10.0


class PyroscopeSink:
    """While entered, `hit(ev)` folds each hit's stack and a thread pushes the counts."""

    def __init__(self, metrics: Metrics, url: str, interval_s: float, app: str,
                 note: Callable[[str], object]) -> None:
        self.metrics = metrics
        self.url = url.rstrip("/")
        self.interval_s = interval_s
        self.app = app
        self.note = note
        self._table: dict[str, dict[str, int]] = {}
        self._busy = False  # the probing thread is counting a hit
        self._since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down = False
        self.pushed = 0

    def hit(self, ev: Event) -> None:
        """A hit with its stack (the probing thread)."""
        if not ev.stack:
            return
        path = ";".join([ev.comm.replace(";", ":") or "[unknown]",
                         *(folded_name(f) for f in reversed(ev.stack))])
        self._busy = True
        try:
            table = self._table
            stacks = table.get(ev.probe)
            if stacks is None:
                stacks = table[ev.probe] = {}
            n = stacks.get(path)
            if n is not None:
                stacks[path] = n + 1
            elif len(stacks) < MAX_STACKS:
                stacks[path] = 1
            else:
                self.metrics.drop("stacks_overflow")
        finally:
            self._busy = False

    def __enter__(self) -> PyroscopeSink:
        self._thread = threading.Thread(target=self._run, name="uprobes-pyroscope",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._send(self._take())

    def _take(self) -> dict[str, dict[str, int]]:
        """The table so far, a new one in its place (the push thread)."""
        table, self._table = self._table, {}
        deadline = time.monotonic() + 1.0
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.0002)  # a hit that took the old table finishes with it
        return table

    def _send(self, table: dict[str, dict[str, int]]) -> None:
        """POST `table`, one request per probe (the push thread)."""
        since, until = self._since, time.time()
        self._since = until
        for probe, stacks in table.items():
            if not stacks:
                continue
            name = f"{self.app}.hits{{probe={probe}}}"
            query = urllib.parse.urlencode({
                "name": name, "from": int(since), "until": max(int(until), int(since) + 1),
                "format": "folded", "spyName": "uprobes", "units": "samples",
                "aggregationType": "sum", "sampleRate": 100})
            body = "".join(f"{path} {n}\n" for path, n in stacks.items()).encode()
            request = urllib.request.Request(f"{self.url}/ingest?{query}", data=body,
                                             method="POST",
                                             headers={"Content-Type": "text/plain"})
            try:
                with urllib.request.urlopen(request, timeout=PUSH_TIMEOUT_S) as r:
                    r.read()
                ok = True
            except (urllib.error.URLError, OSError):
                ok = False
            if ok:
                self.pushed += 1
            else:
                self.metrics.drop("pyroscope_push_failed", sum(stacks.values()))
            if ok == self._down:
                self.note("Pyroscope takes pushes again" if ok else
                          f"Pyroscope at {self.url} did not take a push: its hits are counted "
                          "in uprobes_dropped_total{reason=\"pyroscope_push_failed\"}")
            self._down = not ok

    def __exit__(self, *exc: object) -> None:
        """The last push: probing has ended, so the table is ours to take."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PUSH_TIMEOUT_S * 2)
        self._send(self._take())
