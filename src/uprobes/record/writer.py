"""`RecordWriter`: what a run hands its renderer, kept on disk as it came.

It is the renderer of a `trace` run (a `HitRenderer`) and, on the ptrace
engine, the `RawSink` of its trap-free rings: their slots go to events.bin
in one write per ring and read, with no work per record; hits of int3
probes and of the kernel engine go as JSON. `summary()` writes meta.json
last (through a rename); a run that fails writes it too, marked unfinished
(`abandon`); a directory without it was killed (SIGKILL) mid-run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from uprobes.engines.trapfree.reader import Owner, RawSite
from uprobes.engines.trapfree.sharedmem import CPUS
from uprobes.errors import UsageError
from uprobes.model.event import Hit, ProbeInfo
from uprobes.model.probe import ResolvedProbe
from uprobes.record import stream
from uprobes.record.codec import encode
from uprobes.sys.clocks import snapshot

FORMAT = "uprobes-recording 2"
META = "meta.json"
EVENTS = "events.bin"


def prepare(directory: str) -> Path:
    """The directory a recording goes to: made if need be; one that holds
    anything but an earlier recording is refused (nothing is overwritten
    that `record` did not write)."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        left = {p.name for p in path.iterdir()}
    except OSError as e:
        raise UsageError(f"cannot make the recording directory {directory}: "
                         f"{e.strerror}") from e
    if left - {META, EVENTS, META + ".tmp"}:
        raise UsageError(f"{directory} holds other files: record into a new or empty "
                         "directory (or one an earlier `uprobes record` wrote)")
    for name in left:
        (path / name).unlink()
    return path


def _version() -> str | None:
    try:
        return metadata.version("uprobes")
    except metadata.PackageNotFoundError:
        return None


class RecordWriter:
    """A renderer that keeps the run for `uprobes replay` and `report`."""

    def __init__(self, directory: Path, probes: Sequence[ResolvedProbe],
                 infos: dict[str, ProbeInfo], calls: set[str], engine: str,
                 command: list[str] | None, pid: int | None) -> None:
        self.directory = directory
        self.probes = list(probes)
        self.infos = infos
        self.calls = calls
        self.engine = engine
        self.command = command
        self.pid = pid
        self.clock_start = snapshot()
        self._file = open(directory / EVENTS, "wb", buffering=0)
        self._out = stream.ChunkWriter(self._file.fileno())
        self._sites: list[RawSite] = []
        self._rate: tuple[float, int, int] | None = None
        self._closed = False
        self.events_seen = 0  # hits and ring records written (for an unfinished run)

    # ------------------------------------------------------------ HitRenderer

    def hits(self, hits: list[Hit]) -> None:
        self.events_seen += len(hits)
        self._out.write(stream.HITS, stream.dumps(hits))

    # ------------------------------------------------------------ RawSink

    def raw(self, created: int, now: int, read: int, slot_bytes: int, data: memoryview,
            owners: dict[int, Owner | None]) -> None:
        if owners:
            self._out.write(stream.OWNERS, stream.dumps(list(owners.items())))
        self._out.write(stream.RING, stream.RING_HEAD.pack(created, now, read, slot_bytes), data)
        self.events_seen += data.nbytes // slot_bytes

    def sites(self, sites: list[RawSite], rate: tuple[float, int, int]) -> None:
        self._sites = sites
        self._rate = rate

    # ------------------------------------------------------------ the end

    def summary(self, events: int, lost: int, complete: bool = True) -> None:
        """Close events.bin and write meta.json: the recording is complete (or,
        `complete` False, what it holds is readable up to where the run failed)."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        index = {id(p): i for i, p in enumerate(self.probes)}
        meta = {
            "format": FORMAT,
            "complete": complete,
            "uprobes": _version(),
            "engine": self.engine,
            "command": self.command,
            "pid": self.pid,
            "clocks": {"start": self.clock_start.as_dict(), "end": snapshot().as_dict()},
            "events": events,
            "lost": lost,
            "bytes": self._out.bytes,
            "probes": encode(self.probes),
            "infos": encode(self.infos),
            "calls": sorted(self.calls),
            "cpus": CPUS,
            "tsc": None if self._rate is None else dict(zip(("scale", "tsc0", "ns0"),
                                                            self._rate)),
            "sites": [{"lines": [index[id(line)] for line in s.lines],
                       "recipe": encode(s.recipe), "ip": s.ip, "file_base": s.file_base,
                       "func": s.func} for s in self._sites],
        }
        tmp = self.directory / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, self.directory / META)

    def abandon(self, events: int, lost: int) -> None:
        """The run failed (an error, a signal): what was written stays
        readable, marked unfinished."""
        try:
            self.summary(events, lost, complete=False)
        except OSError:  # the disk that failed the run: nothing more to keep
            self._closed = True
            self._file.close()
