"""A recording read back into the `Hit` tuples its run saw, in the run's order.

Hits the run wrote as JSON come back as they were. Ring records become hits
as the live reader makes them (engines/trapfree/reader.py): the same
generated function per probe line (`direct_hit`), or the register set and
stack window they stand for through the probe's `ArgFetcher`; stamped by
the TSC rate measured at the end of the run. They are checked by the live
reader's own rule, `valid_records` (a probe id of the run, a thread it
traced, a CPU that exists, a time stamp inside the ring's life): the traced
program could write its ring, and what it cannot have made is left out and
counted in `corrupt`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from uprobes.engines.tracee.fetch import ArgFetcher, FetchContext
from uprobes.engines.trapfree.layout import (
    CPU_MASK,
    REC_AUX,
    REC_PROBE,
    REC_TID,
    REC_TSC,
    REC_VALUES,
    SHAPES,
)
from uprobes.engines.trapfree.reader import (
    Make,
    Owner,
    RecordedSite,
    direct_hit,
    regs_of,
    valid_records,
)
from uprobes.engines.trapfree.recording import SKEW_S, Recipe
from uprobes.errors import RecordingError
from uprobes.model.event import Hit, ProbeInfo
from uprobes.model.filters import HitFilter, TaskView
from uprobes.model.probe import ResolvedProbe
from uprobes.record import stream
from uprobes.record.codec import decode
from uprobes.record.writer import EVENTS, FORMAT, META
from uprobes.sys.clocks import ClockSnapshot


@dataclass(frozen=True)
class _Site:
    makes: tuple[Make, ...]  # one per probe line on the instruction
    words: int  # what its recipe records, each record


class Recording:
    """A directory `uprobes record` wrote, opened: its probes, infos and clocks;
    `batches()` its hits."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META
        try:
            text = meta_path.read_text()
        except FileNotFoundError:
            if (self.directory / EVENTS).exists():
                raise RecordingError(f"{directory}: the recording was not finished (its run "
                                     "was killed before it wrote meta.json)") from None
            raise RecordingError(f"{directory} is not a recording (no {META})") from None
        except OSError as e:
            raise RecordingError(f"cannot read {meta_path}: {e.strerror}") from e
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise RecordingError(f"{meta_path} is not JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RecordingError(f"{meta_path}: not a recording of this uprobes "
                                 f"(format {FORMAT!r} expected)")
        self.meta = meta
        try:
            self._load(meta)
        except RecordingError:
            raise
        except Exception as e:  # the file is input: whatever is wrong in it is one line
            raise RecordingError(f"{meta_path} is not what uprobes record writes "
                                 f"({type(e).__name__}: {e})") from e
        self.complete = meta.get("complete", True) is not False
        """False: the recording run failed or was stopped before its end was
        written (its counts are what it had)."""
        self.corrupt = 0  # ring records no probe's code can have made
        self.truncated: str | None = None  # why the stream ended early, if it did

    def _load(self, meta: dict[str, Any]) -> None:
        probes, infos = decode(meta["probes"]), decode(meta["infos"])
        if not (isinstance(probes, list) and all(isinstance(p, ResolvedProbe) for p in probes)
                and isinstance(infos, dict) and all(
                    isinstance(k, str) and isinstance(i, ProbeInfo) and i.name == k
                    for k, i in infos.items())):
            raise RecordingError("its probes are not probes")
        self.probes = cast(list[ResolvedProbe], probes)
        self.infos = cast(dict[str, ProbeInfo], infos)
        self.calls = {str(c) for c in meta["calls"]}
        self.events, self.lost = _count(meta["events"]), _count(meta["lost"])
        start, end = (ClockSnapshot(*(_count(meta["clocks"][k][f]) for f in (
            "monotonic_ns", "realtime_ns", "boottime_ns"))) for k in ("start", "end"))
        self.clocks = (start, end)
        self._cpus = _count(meta["cpus"])
        tsc = meta["tsc"]
        self._rate = None
        if tsc is not None:
            scale = float(tsc["scale"])
            if not 1e-6 < scale < 1e6:
                raise ValueError(f"a TSC rate of {scale} ns a tick")
            self._rate = (scale, _count(tsc["tsc0"]), _count(tsc["ns0"]))
        self._sites = [self._site(s) for s in meta["sites"]]
        self._probe_ids = frozenset(range(len(self._sites)))
        # Per slot size, the sites whose records its slots cannot hold (none,
        # unless meta.json was altered): a record of one is refused.
        self._too_wide = {slot_bytes: frozenset(i for i, site in enumerate(self._sites)
                                                if site.words > shape.words)
                          for slot_bytes, shape in SHAPES.items()}

    @property
    def clock_start(self) -> ClockSnapshot:
        return self.clocks[0]

    @property
    def clock_end(self) -> ClockSnapshot:
        return self.clocks[1]

    def _site(self, s: dict[str, Any]) -> _Site:
        lines = [self.probes[_count(i)] for i in s["lines"]]
        if any(line.name not in self.infos for line in lines):
            raise RecordingError("a probe id stands for a probe it does not describe")
        recipe = decode(s["recipe"])
        if not isinstance(recipe, Recipe):
            raise TypeError("a site's recipe is not a Recipe")
        ip, file_base = _count(s["ip"]), _count(s["file_base"])
        func = None if s["func"] is None else _count(s["func"])
        makes = []
        for line in lines:
            make = direct_hit(line, recipe, ip, func)
            makes.append(make if make is not None
                         else self._fetching(line, RecordedSite(None, recipe, ip, file_base,
                                                                func=func)))
        return _Site(tuple(makes), recipe.words)

    def _fetching(self, line: ResolvedProbe, site: RecordedSite) -> Make:
        """A record -> hit through the probe's fetcher (what `direct_hit` does
        not write out: arrays of stack words)."""
        info = self.infos[line.name]
        fetcher = ArgFetcher(line)

        def make(rec: tuple[int, ...], ts: int, owner: Owner) -> Hit:
            regs, window = regs_of(site, rec[REC_VALUES:])
            got = fetcher.fetch(regs, window, FetchContext(owner[1], site.file_base))
            ip = site.ip if site.func is None else regs.rip
            return (ts, owner[0], owner[2], rec[REC_AUX] & CPU_MASK, line.name, owner[1],
                    ip, site.func, tuple(got.get(n) for n, _ in info.args))
        return make

    # ------------------------------------------------------------ hits

    def batches(self, keep: HitFilter | None = None) -> Iterator[list[Hit]]:
        """The run's hits in batches, in the order the run delivered them
        (one read's ring records merged by time stamp); `keep`: only the hits
        it passes. A stream cut short ends early and sets `truncated`."""
        test = _hit_test(keep, self.infos)
        path = str(self.directory / EVENTS)
        owners: dict[int, Owner] = {}
        # The current read's ring records, each with its thread's owner as the
        # run knew it then (an OWNR chunk in the middle of a read updates the
        # owners of what follows it, not of what came before).
        pending: list[tuple[tuple[int, ...], Owner]] = []
        rings_seen: set[int] = set()
        read = -1
        try:
            f = open(path, "rb")
        except OSError as e:
            raise RecordingError(f"cannot read {path}: {e.strerror}") from e
        with f:
            try:
                for kind, payload in stream.chunks(f, path):
                    if kind == stream.RING:
                        created, now, this_read, _ = stream.RING_HEAD.unpack_from(payload)
                        if this_read != read:  # the next read began
                            if pending:
                                yield self._filtered(self._ring_hits(pending, rings_seen), test)
                            pending, rings_seen = [], set()
                        read = this_read
                        rings_seen.add(created)
                        pending += self._valid(payload, created, now, owners)
                        continue
                    if pending and kind != stream.OWNERS:  # hits: the read is over
                        yield self._filtered(self._ring_hits(pending, rings_seen), test)
                        pending, rings_seen, read = [], set(), -1
                    try:
                        if kind == stream.OWNERS:
                            for tid, owner in _json(payload, path):
                                if owner is None:
                                    owners.pop(int(tid), None)
                                else:
                                    # (pid, comm[, tid]): a thread in a pid namespace
                                    # records its tid there; the host's follows.
                                    owners[int(tid)] = (int(owner[0]), str(owner[1]),
                                                        int(owner[2] if owner[2:] else tid))
                            continue
                        hits = [self._hit(h) for h in _json(payload, path)]
                    except (TypeError, ValueError, KeyError, OverflowError) as e:
                        raise RecordingError(f"{path}: a {kind.decode()} chunk is not what "
                                             f"uprobes writes ({e!r})") from e
                    yield self._filtered(hits, test)
            except stream.Truncated as e:
                self.truncated = str(e)
        if pending:
            yield self._filtered(self._ring_hits(pending, rings_seen), test)

    def _valid(self, payload: bytes, created: int, now: int, owners: dict[int, Owner]
               ) -> list[tuple[tuple[int, ...], Owner]]:
        """The records of a RING chunk that the probes' code can have written,
        each with its thread's `Owner`."""
        if self._rate is None:
            raise RecordingError(f"{self.directory}: ring records but no clock to read them by")
        skew = int(SKEW_S * 1e9 / self._rate[0])  # ticks, as the live reader's clock.ticks
        slot_bytes = stream.RING_HEAD.unpack_from(payload)[3]
        slots = memoryview(payload)[stream.RING_HEAD.size:]
        if slot_bytes not in SHAPES or len(slots) % slot_bytes:
            raise RecordingError(f"{self.directory / EVENTS}: ring slots of {slot_bytes} "
                                 "bytes, which no ring of uprobes has")
        records = list(SHAPES[slot_bytes].record.iter_unpack(slots))
        good = valid_records(records, self._probe_ids, self._cpus, owners,
                             created - skew, now + skew)
        self.corrupt += len(records) - len(good)
        too_wide = self._too_wide[slot_bytes]
        if too_wide and any(rec[REC_PROBE] in too_wide for rec in good):
            raise RecordingError(f"{self.directory / META}: a site records more words than "
                                 f"its ring's slots of {slot_bytes} bytes hold")
        return [(rec, owners[rec[REC_TID]]) for rec in good]

    def _ring_hits(self, records: list[tuple[tuple[int, ...], Owner]],
                   rings: set[int]) -> list[Hit]:
        """The hits of one read's records: in each ring's order, merged by
        time stamp when several rings gave some (as the live reader does)."""
        assert self._rate is not None
        scale, tsc0, ns0 = self._rate
        if len(rings) > 1:
            records.sort(key=lambda pair: pair[0][REC_TSC])
        sites = self._sites
        out: list[Hit] = []
        for rec, owner in records:
            ts = ns0 + int((rec[REC_TSC] - tsc0) * scale)
            for make in sites[rec[REC_PROBE]].makes:
                out.append(make(rec, ts, owner))
        return out

    def _hit(self, h: list[Any]) -> Hit:
        """A hit as the run wrote it, with the shape renderers rely on."""
        ts, pid, tid, cpu, probe, comm, ip, func, args = h
        if probe not in self.infos or len(args) != len(self.infos[probe].args) or not all(
                type(v) is int for v in (ts, pid, tid, cpu, ip)) or not isinstance(comm, str) \
                or not (func is None or type(func) is int) or not all(map(_arg_value, args)):
            raise ValueError("a hit that no probe of the recording makes")
        return (ts, pid, tid, cpu, probe, comm, ip, func, tuple(args))

    @staticmethod
    def _filtered(hits: list[Hit], test: Callable[[Hit], bool] | None) -> list[Hit]:
        return hits if test is None else [h for h in hits if test(h)]


def _arg_value(v: object) -> bool:
    """Whether `v` is an argument's value as engines make them (ArgValue)."""
    if v is None or type(v) in (int, str):
        return True
    return isinstance(v, list) and all(x is None or type(x) in (int, str) for x in v)


def _count(value: object) -> int:
    """A count, address or stamp of meta.json: an int from 0 to 2**64 - 1."""
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise ValueError(f"{value!r:.40} where a number from 0 to 2**64 - 1 belongs")
    return value


def _hit_test(keep: HitFilter | None,
              infos: dict[str, ProbeInfo]) -> Callable[[Hit], bool] | None:
    """`keep` as a test of one hit tuple (what the live engines test at the hit)."""
    if keep is None:
        return None
    keep.check(list(infos.values()))
    predicate = keep.combined.predicate()
    names = {name: [n for n, _ in info.args] for name, info in infos.items()}

    def test(hit: Hit) -> bool:
        view = TaskView(hit[1], hit[2], hit[5], dict(zip(names[hit[4]], hit[8])))
        return bool(predicate(view))
    return test


def _json(payload: bytes, path: str) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise RecordingError(f"{path}: a chunk is not the JSON uprobes writes ({e})") from e


