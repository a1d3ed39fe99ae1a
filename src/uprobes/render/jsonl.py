"""JSON Lines: one object per hit, then one summary object.

`{"probe": "GRP/EVENT", "kind": "p"|"r", "pid", "tid", "comm", "cpu",
"ts_ns", "ip", "func" (return probes only), "args": {name: value}}`.
Integers are JSON numbers (a `char` too: its byte value), strings are
strings, a faulted string fetch is null, an array a list. The last line is
`{"summary": {"events": N, "lost": M}}`: scripts tell it apart by its only
key, and learn whether the kernel dropped records (lost > 0).
"""

from __future__ import annotations

import json
from typing import TextIO

from uprobes.engines.event import Event, ProbeInfo

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def event_doc(event: Event) -> dict[str, object]:
    doc: dict[str, object] = {
        "probe": event.probe, "kind": event.kind, "pid": event.pid, "tid": event.tid,
        "comm": event.comm, "cpu": event.cpu, "ts_ns": event.ts_ns, "ip": event.ip,
    }
    if event.kind == "r":
        doc["func"] = event.func
    doc["args"] = event.args
    return doc


class JsonLinesRenderer:
    """Writes one JSON object per event and a summary object at the end."""

    def __init__(self, out: TextIO, probes: dict[str, ProbeInfo]) -> None:
        self.out = out
        self.probes = probes

    def event(self, event: Event) -> None:
        self.out.write(_dumps(event_doc(event)) + "\n")

    def summary(self, events: int, lost: int) -> None:
        self.out.write(_dumps({"summary": {"events": events, "lost": lost}}) + "\n")
