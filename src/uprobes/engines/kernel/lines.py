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

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from operator import add

from uprobes.engines.kernel.batches import agreeing, phase_offsets
from uprobes.engines.kernel.records import RecordDecoder, RetSiteDecoder
from uprobes.engines.kernel.rows import RowPlan, row_plan
from uprobes.model.event import Hit
from uprobes.render.protocol import LineRenderer
from uprobes.render.rows import Rows, RowShape
from uprobes.sys.perf import TRACE_SAMPLE_TYPE
from uprobes.sys.perf_ring import SampleLayout

RAW_AT = SampleLayout.of(TRACE_SAMPLE_TYPE).size  # a sample's raw record: common_type first
ALIKE = (8 + RAW_AT,)  # runs share the record's common_type (u16): one event each
PERIODS = 4  # records that alternate among up to 4 events (f, g, and their returns)
MIN_ROWS = 4  # shorter pieces are decoded hit by hit (a template costs more to choose)
CHUNK = 32  # rows one % fills with a template repeated: a call and a string for 32 lines

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
        self._writers: dict[RowShape, str | Callable[[Rows], list[str]] | None] = {}
        self._chunk_fills: dict[str, Callable[[tuple[int, ...]], str]] = {}
        self._window = 1
        self._chunked = False  # self.lines holds chunks: CHUNK lines in one, then "" for the rest
        self.templated = 0  # lines written from a template (the rest: hit by hit)

    def read(self, batches: Iterable[tuple[bytes, list[tuple[int, int, int, int]]]]) -> None:
        """Add the lines of every run in `batches` (`CpuStreams.read_runs(ALIKE, PERIODS)`)."""
        ts_parts, line_parts = [self.ts], [self.lines]
        for data, runs in batches:
            if not runs:
                continue
            with memoryview(data) as view:
                u64 = view.cast("Q") if not len(data) % 8 else None
                short: list[int] = []  # bodies of short runs in a row: decoded together
                for start, count, size, period in runs:
                    if period == 1 and count < MIN_ROWS:
                        short.extend(range(start + 8, start + count * size, size))
                        continue
                    if short:
                        self._hit_by_hit(data, short, ts_parts, line_parts)
                        short = []
                    if period == 1:
                        self._phase(view, u64, start, count, size, size, ts_parts, line_parts)
                    else:
                        self._periodic(view, u64, start, count, size, period, ts_parts,
                                       line_parts)
                if short:
                    self._hit_by_hit(data, short, ts_parts, line_parts)
                if u64 is not None:
                    u64.release()
        if len(ts_parts) == 1:
            return
        self.ts, self.lines = self._merged(ts_parts, line_parts)

    def _merged(self, ts_parts: list[list[int]],
                line_parts: list[list[str]]) -> tuple[list[int], list[str]]:
        """The parts as one list of stamps and one of lines, in the order a
        stable sort by time of their concatenation gives (held lines first,
        then each ring's). Each part is in time order, so they merge block
        by block: the part whose next line comes first gives every line up
        to the next line of another (a bisect), which is a few blocks when
        a thread migrates between CPUs. Parts that interleave line by line
        (CPUs busy at once) are sorted whole instead."""
        parts = [p for p in zip(ts_parts, line_parts) if p[0]]
        ts: list[int] = []
        lines: list[str] = []
        heads = [0] * len(parts)
        live = list(range(len(parts)))
        blocks, most = 0, 8 + sum(len(t) for t in ts_parts) // 64
        while len(live) > 1 and blocks < most:
            first, second = sorted(live, key=lambda j: (parts[j][0][heads[j]], j))[:2]
            t, ln = parts[first]
            at, bound = heads[first], parts[second][0][heads[second]]
            end = (bisect_right if first < second else bisect_left)(t, bound, at)
            _boundary(ln, end)
            ts += t[at:end]
            lines += ln[at:end]
            heads[first] = end
            if end == len(t):
                live.remove(first)
            blocks += 1
        for j in live:
            ts += parts[j][0][heads[j]:]
            lines += parts[j][1][heads[j]:]
        in_order = sorted(ts)
        if in_order == ts and blocks < most:
            return ts, lines
        ts, lines = [], []
        for t, ln in zip(ts_parts, line_parts):
            ts += t
            lines += ln
        if self._chunked:  # a line each, to be reordered
            split = "".join(lines).split("\n")
            split.pop()
            lines = list(map(add, split, repeat("\n")))
            self._chunked = False
        order = sorted(range(len(ts)), key=ts.__getitem__)  # stable: held ones first
        return sorted(ts), list(map(lines.__getitem__, order))

    def _hit_by_hit(self, data: bytes, bodies: list[int], ts_parts: list[list[int]],
                    line_parts: list[list[str]]) -> None:
        """Records of any events (sample bodies at `bodies`), decoded one by one."""
        hits = []
        functions = self._hits
        for body in bodies:
            at = body + RAW_AT
            hit = functions.get(data[at] | data[at + 1] << 8)
            if hit is not None:
                hits.append(hit(data, body))
        ts_parts.append([h[0] for h in hits])
        line_parts.append(self._renderer.lines(hits))

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
                line_parts.append(self._rows_lines(write, plan, view, pos, n, size, stride))
                self.templated += n
            pos += n * stride
            left -= n

    def _rows_lines(self, write: str | Callable[[Rows], list[str]], plan: RowPlan,
                    view: memoryview, pos: int, n: int, size: int, stride: int) -> list[str]:
        """The lines of `n` rows from `pos`, `stride` apart. A template fills
        CHUNK rows at a time where records are contiguous: the chunk's text
        stands for its first line, "" for the others (see `take`)."""
        st = plan.struct(size, stride)
        assert st is not None
        # The last record's stride may run past the data: unpacked apart.
        whole = n if pos + n * stride <= len(view) else n - 1
        groups = whole // CHUNK if isinstance(write, str) and stride == size else 0
        done = groups * CHUNK * stride
        rows: Iterable[tuple[int, ...]] = st.iter_unpack(view[pos + done:pos + whole * stride])
        if whole < n:
            last = plan.struct(size, size)
            assert last is not None
            rows = chain(rows, (last.unpack_from(view, pos + whole * stride),))
        if not isinstance(write, str):
            return write(rows)
        if not groups:
            return list(map(write.__mod__, rows))
        big = plan.struct(size, stride, CHUNK)
        assert big is not None
        lines = [""] * n
        lines[0:groups * CHUNK:CHUNK] = map(self._chunk_fill(write),
                                            big.iter_unpack(view[pos:pos + done]))
        lines[groups * CHUNK:] = map(write.__mod__, rows)
        self._chunked = True
        return lines

    def _chunk_fill(self, template: str) -> Callable[[tuple[int, ...]], str]:
        fill = self._chunk_fills.get(template)
        if fill is None:
            fill = self._chunk_fills[template] = (template * CHUNK).__mod__
        return fill

    def _writer(self, shape: RowShape) -> str | Callable[[Rows], list[str]] | None:
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
        _boundary(self.lines, cut)
        lines = self.lines[:cut]
        del self.ts[:cut], self.lines[:cut]
        return lines


def _boundary(lines: list[str], at: int) -> None:
    """Make `at` a line boundary of `lines`: a chunk it falls within (its
    text at its first line, "" at the others; see `LineQueue._rows_lines`)
    is split into its lines, in place."""
    if at < len(lines) and not lines[at]:
        head = at - 1
        while not lines[head]:
            head -= 1
        parts = lines[head].split("\n")
        parts.pop()
        lines[head:head + len(parts)] = map(add, parts, repeat("\n"))
