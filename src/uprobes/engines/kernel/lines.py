"""The kernel engine's fast path to text and JSON lines: records to lines in C.

A busy probe fills its ring with records that differ only in their numbers
(time, ip, arguments): same size, same event, same comm. `read_runs` finds
such runs without reading headers one by one; each run is unpacked by one
`struct.iter_unpack` into rows, split where rows stop sharing their comm
and probe (`RowPlan.key`), and each piece is written by the renderer's
template for it (`row_lines`): an itemgetter orders a row's numbers, the
template's `%` writes them, both mapped over the rows in C. What cannot go
that way (string or array arguments, runs of one) is decoded hit by hit.

Lines are held back in time order exactly as `KernelTracer.run_hits` holds
hits: stamps and lines in two lists, sorted (stably, held ones first) only
when a round's pieces are not already in order.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Protocol, runtime_checkable

from uprobes.engines.event import Hit, RowShape
from uprobes.engines.kernel.records import RecordDecoder, RetSiteDecoder
from uprobes.engines.kernel.rows import RowPlan, row_plan
from uprobes.sys.perf import TRACE_SAMPLE_TYPE, SampleLayout, agreeing, phase_offsets

RAW_AT = SampleLayout.of(TRACE_SAMPLE_TYPE).size  # a sample's raw record: common_type first
ALIKE = (8 + RAW_AT,)  # runs share the record's common_type (u16): one event each
PERIODS = 4  # records that alternate among up to 4 events (f, g, and their returns)
MIN_ROWS = 4  # shorter pieces are decoded hit by hit (a template costs more to choose)

Rows = Iterable[tuple[int, ...]]


class HitRenderer(Protocol):
    """A renderer that takes batches of hits (every trace renderer)."""

    def hits(self, hits: list[Hit]) -> None: ...


@runtime_checkable
class LineRenderer(HitRenderer, Protocol):
    """What the fast path needs of a renderer (text and JSON lines have it)."""

    def row_lines(self, shape: RowShape) -> Callable[[Rows], list[str]] | None: ...

    def lines(self, hits: list[Hit]) -> list[str]: ...

    def write_lines(self, lines: list[str]) -> None: ...


class LineQueue:
    """Lines made from the rings, held until `take` releases those older
    than a time: `ts` and `lines` are parallel, in time order."""

    def __init__(self, decoders: dict[int, RecordDecoder | RetSiteDecoder],
                 hit_functions: dict[int, Callable[[bytes, int], Hit]],
                 renderer: LineRenderer) -> None:
        self.ts: list[int] = []
        self.lines: list[str] = []
        self._decoders = decoders
        self._hits = hit_functions
        self._renderer = renderer
        self._plans: dict[int, RowPlan | None] = {}
        self._writers: dict[RowShape, Callable[[Iterable[tuple[int, ...]]], list[str]] | None] = {}
        self._window = 1
        self.templated = 0  # lines written from a template (the rest: hit by hit)

    def read(self, batches: Iterable[tuple[bytes, list[tuple[int, int, int, int]]]]) -> None:
        """Add the lines of every run in `batches` (`CpuStreams.read_runs(ALIKE, PERIODS)`)."""
        ts_parts, line_parts = [self.ts], [self.lines]
        for data, runs in batches:
            if not runs:
                continue
            with memoryview(data) as view:
                u64 = view.cast("Q") if not len(data) % 8 else None
                for start, count, size, period in runs:
                    if period == 1:
                        self._phase(view, u64, start, count, size, size, ts_parts, line_parts)
                    else:
                        self._periodic(view, u64, start, count, size, period, ts_parts,
                                       line_parts)
                if u64 is not None:
                    u64.release()
        if len(ts_parts) == 1:
            return
        ts: list[int] = []
        lines: list[str] = []
        for t, ln in zip(ts_parts, line_parts):
            ts += t
            lines += ln
        in_order = sorted(ts)
        if in_order != ts:
            order = sorted(range(len(ts)), key=ts.__getitem__)  # stable: held ones first
            lines = list(map(lines.__getitem__, order))
        self.ts, self.lines = in_order, lines

    def _periodic(self, view: memoryview, u64: memoryview | None, start: int, count: int,
                  stride: int, period: int, ts_parts: list[list[int]],
                  line_parts: list[list[str]]) -> None:
        """A run whose records alternate: each phase (every `period`-th
        record) like a run of its own, their lines interleaved back."""
        data = view.obj
        assert isinstance(data, bytes)
        offsets = phase_offsets(data, start, period)
        phases: list[tuple[list[list[int]], list[list[str]]]] = []
        for k in range(period):
            phase: tuple[list[list[int]], list[list[str]]] = ([], [])
            self._phase(view, u64, start + offsets[k], (count - k + period - 1) // period,
                        offsets[k + 1] - offsets[k], stride, *phase)
            phases.append(phase)
        if all(len(t) == 1 for t, _ in phases):
            ts: list[int] = [0] * count
            lines: list[str] = [""] * count
            for k, (t, ln) in enumerate(phases):
                ts[k::period] = t[0]
                lines[k::period] = ln[0]
            ts_parts.append(ts)
            line_parts.append(lines)
        else:  # phases in pieces: read() sorts them by time
            for t, ln in phases:
                ts_parts += t
                line_parts += ln

    def _phase(self, view: memoryview, u64: memoryview | None, start: int, count: int,
               size: int, stride: int, ts_parts: list[list[int]],
               line_parts: list[list[str]]) -> None:
        """The lines of `count` records of one event, of `size` bytes,
        `stride` bytes apart: pieces whose rows share all but time and
        arguments by their template, the rest hit by hit."""
        data = view.obj
        assert isinstance(data, bytes)
        at = start + 8 + RAW_AT
        event_id = data[at] | data[at + 1] << 8
        hit = self._hits.get(event_id)
        if hit is None:
            return
        plan = self._plan(event_id)
        st = plan.struct(size, stride) if plan is not None and u64 is not None else None
        pos, left = start, count
        while left:
            n, write = 0, None
            if st is not None and left >= MIN_ROWS:
                assert plan is not None
                n = self._window = agreeing(data, pos, stride, left,
                                            plan.shared(data, pos, size), self._window)
                if n >= MIN_ROWS:
                    write = self._writer(plan.shape(hit(data, pos + 8)))
            if write is None:
                # A short piece: these and a few more hit by hit, so that
                # records which alternate do not each cost a comparison.
                n = min(left, max(n, MIN_ROWS * 4))
                hits = [hit(data, body) for body in range(pos + 8, pos + n * stride, stride)]
                ts_parts.append([h[0] for h in hits])
                line_parts.append(self._renderer.lines(hits))
            else:
                assert u64 is not None and plan is not None and st is not None
                first = (pos + plan.ts_at) // 8
                ts_parts.append(u64[first:first + n * (stride // 8):stride // 8].tolist())
                # The last record's stride may run past the data: unpacked apart.
                whole = n if pos + n * stride <= len(data) else n - 1
                rows = st.iter_unpack(view[pos:pos + whole * stride])
                if whole < n:
                    last = plan.struct(size, size)
                    assert last is not None
                    rows = chain(rows, (last.unpack_from(data, pos + whole * stride),))
                line_parts.append(write(rows))
                self.templated += n
            pos += n * stride
            left -= n

    def _writer(self, shape: RowShape) -> Callable[[Iterable[tuple[int, ...]]], list[str]] | None:
        if shape not in self._writers:
            self._writers[shape] = self._renderer.row_lines(shape)
        return self._writers[shape]

    def _plan(self, event_id: int) -> RowPlan | None:
        if event_id not in self._plans:
            self._plans[event_id] = row_plan(self._decoders[event_id])
        return self._plans[event_id]

    def take(self, before: int | None) -> list[str]:
        """The lines stamped before `before` (None: all), in time order."""
        cut = len(self.ts) if before is None else bisect_left(self.ts, before)
        if not cut:
            return []
        lines = self.lines[:cut]
        del self.ts[:cut], self.lines[:cut]
        return lines
