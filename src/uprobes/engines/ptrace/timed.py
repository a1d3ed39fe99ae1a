"""Timing calls in the program (`trapfree="time"`): `latency` with no records.

Each timed function's entry and rets become jump patches whose trampolines
keep the thread's open calls and its histograms in a shared timing block
(engines/trapfree/timing.py). A function too short for two patches (its
entry's and its ret's would overlap) gets one patch of all of it
(fileplan.plan_whole). A site that cannot be patched leaves its function
untimed, with the reason (`Latencies.untimed`): no int3 is placed, since a
function timed at some sites and not others would give wrong durations.
(A site the file already says no jump can cover, `bykey.jump_problem`,
leaves the run to events beforehand: `open_timer` gives None.)

`latencies()` reads the blocks (at the end: as read at detach), and a null
function timed by the same code in this process (timing.calibration, once
per process) gives what is taken off every duration; what it returns says
how much. A thread's row is summed per function when it exits, so what is
kept of threads gone does not grow with their number.

`by` a fetcharg's name (`latency --by ARG`): each entry keeps the value
(a register or a stack word, as `count --by` keys) with its open call, and
its return adds the duration to the block's histogram of (function,
value), a bounded table shared by the threads; a pair that finds no place
is counted (`Latencies.unkeyed`), never dropped unsaid. `key_problem` says
beforehand why a function's key cannot be read in the program.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial

from uprobes.analysis.histogram import Histogram, Latencies
from uprobes.analysis.keyed import TASK_KEYS
from uprobes.engines.ptrace.state import TracerState
from uprobes.engines.ptrace.tasks import Thread, owner_of
from uprobes.engines.trapfree import timing
from uprobes.engines.trapfree.fileplan import plan_for, plan_whole
from uprobes.engines.trapfree.filtercode import Check, compile_check
from uprobes.engines.trapfree.jumppatch import Timed
from uprobes.engines.trapfree.keyed import COMM, Source, comm_name, source_of
from uprobes.engines.trapfree.layout import KEYED_HISTS, STACK_DEPTH, TIMED_FUNCS, TIMING_ROWS
from uprobes.model.filters import HitFilter
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.model.registry import Probe
from uprobes.sys import ptrace


class CallTimer(TracerState):
    """The ptrace engine's `Timer` role (engines/base.py)."""

    _final: _Rows | None

    def _time_functions(self, probes: list[ResolvedProbe], names: list[str]) -> None:
        """Give each function named by an entry probe of `probes` (display
        names `names`) its index in the timing blocks."""
        self._timed, self._timed_names, self._untimed = {}, [], {}
        self._timed_lines: list[ResolvedProbe] = []  # each timed function's entry probe
        self._final: _Rows | None = None  # as read at detach
        self._rows_lock = threading.Lock()  # a release against a read in another thread
        self._released: dict[_Key, dict[int, list[int]]] = {}  # the rows of threads gone,
        # summed by key: bounded by the keys, never by the number of threads
        for p, name in zip(probes, names):
            if p.is_return:
                continue
            if not isinstance(p.key, InodeKey):
                self._untimed[name] = "not in a file (the vDSO)"
                continue
            if len(self._timed_names) >= TIMED_FUNCS:
                self._untimed[name] = f"more than {TIMED_FUNCS} functions timed at once"
                continue
            self._timed[(p.key.dev, p.key.ino, p.file_offset)] = len(self._timed_names)
            self._timed_names.append(name)
            self._timed_lines.append(p)

    def _place_timed(self, t: Thread, regs: ptrace.UserRegs, probe: Probe, addr: int,
                     file_offset: int, ident: tuple[int, int] | None) -> None:
        if ident is None:
            return
        at_ret = self._ret_sites.get(probe.key)  # type: ignore[arg-type]
        func_offset = file_offset - (at_ret or 0)
        index = self._timed.get((ident[0], ident[1], func_offset))
        if index is None:
            return  # untimed already (and said why)
        name = self._timed_names[index]
        if name in self._untimed:
            return
        key = self._timing_key(index)
        compiled = self._timing_check(index)
        check = None if isinstance(compiled, str) else compiled
        if isinstance(compiled, str):
            key = f"its filter cannot be tested in the program ({compiled})"
        elif key is COMM or check is not None:
            refused = self._comm_refused(t, None if key is COMM else check)
            if refused is not None:
                key = f"the thread's name cannot be asked for in the program ({refused})"
        if isinstance(key, str):
            self._untimed[name] = key
            return
        from uprobes.sys import tsc
        why = tsc.usable()
        path = probe.point.path
        whole = plan_whole(path, ident[0], ident[1], func_offset)
        if why is None and not isinstance(whole, str):
            if at_ret is not None:
                return  # the entry's patch covers the whole function and this ret
            why = self._patch(t, regs, whole, name, addr, timed=Timed(index, key=key,
                                                                      check=check))
        elif why is None:
            others = [p.point.file_offset for p in self.registry.in_inode(*ident)]
            plan = plan_for(path, ident[0], ident[1], file_offset, others,
                            at_return=at_ret is not None)
            if isinstance(plan, str):
                why = plan
            else:
                start = addr - (file_offset - plan.file_offset)
                why = self._patch(t, regs, plan, name, start,
                                  timed=Timed(index, ret=at_ret is not None, key=key,
                                              check=check))
        if why is not None:
            self._untimed[name] = why

    def _timing_key(self, index: int) -> Source | str | None:
        """Where timed function `index`'s key is at its entry (`by` a
        fetcharg, or the thread's name then: `comm`), None (no key, or the
        thread's row's tid), or why it cannot be read."""
        if self._by == "comm":
            return COMM
        if self._by is None or self._by in TASK_KEYS:
            return None
        return source_of(self._timed_lines[index], self._by, False)

    def _timing_check(self, index: int) -> Check | str | None:
        """The run's filter as timed function `index`'s entry code tests it
        (None: no filter), or why it cannot (open_timer asked beforehand)."""
        if self.hit_filter is None:
            return None
        return compile_check(self.hit_filter.combined.root,
                             partial(_entry_source, self._timed_lines[index]))

    def _row_funcs(self) -> list[int]:
        """The timed functions whose calls go to the thread's row (by thread,
        or all calls): a function keyed by a value or a name has its
        histograms in the block's keyed table, and what its row slots hold
        can only be the program's writing."""
        return [i for i in range(len(self._timed_names)) if self._timing_key(i) is None]

    def _thread_done(self, t: Thread) -> None:
        assert self._jumps is not None
        funcs = self._row_funcs() if self._trapfree == "time" else []
        key = None if self._by is None else self._key_of(t.tid, t.pid, t.comm)
        # Taking the row out and adding it to the sum is one step for a reader
        # in another thread: else it could see the row in both or in neither.
        with self._rows_lock:
            for hists in self._jumps.release_thread(t.mm, t.ns_tid, funcs):
                _add_into(self._released, key, hists)

    def _time_snapshot(self) -> None:
        """Read the timing blocks once, at detach (the blocks stay readable:
        the program's views of them are its own)."""
        if self._trapfree != "time" or self._final is not None or self._jumps is None:
            return
        self._final = self._read_rows()

    def latencies(self) -> Latencies:
        """The histograms so far (after the run: as read at detach). Callable
        from another thread while `count` runs; every read converts ticks
        with the same calibration (timing.calibration), so a read after
        another has no bucket with fewer calls."""
        rows = self._final if self._final is not None else self._read_rows()
        return self._convert(rows)

    def _read_rows(self) -> _Rows:
        """What the blocks hold now: the rows of the threads gone, summed, and
        those of the live ones, by key (`by`; None without it)."""
        assert self._jumps is not None
        indices = list(range(len(self._timed_names)))
        rowed = self._row_funcs()
        out = _Rows({}, timing.Missed(), bool(self._jumps.timing))
        with self._rows_lock:
            for key, hists in self._released.items():
                _add_into(out.keyed, key, hists)
            for block in list(self._jumps.timing):
                for tid, hists in block.by_owner(rowed):
                    _add_into(out.keyed, None if self._by is None else self._task_key(tid), hists)
                for (func, raw), buckets in block.keyed().items():
                    if func < len(indices):
                        _add_into(out.keyed, self._shown_key(func, raw), {func: buckets})
                missed = block.missed()
                out.missed.no_row += missed.no_row
                out.missed.too_deep += missed.too_deep
                out.missed.unpaired += missed.unpaired
                out.missed.abandoned += missed.abandoned
                out.missed.unkeyed += missed.unkeyed
        return out

    def _shown_key(self, func: int, raw: int) -> int | str:
        """A keyed histogram's raw key as the fetcharg's type reads it (or a name)."""
        src = self._timing_key(func)
        if src is COMM:
            return comm_name(raw)
        if isinstance(src, Source) and src.signed and raw >= 1 << 63:
            return raw - (1 << 64)
        return raw

    def _convert(self, rows: _Rows) -> Latencies:
        """Histograms in ns of what `rows` holds."""
        missed = rows.missed
        out = Latencies({}, untimed=dict(self._untimed), depth_limit=STACK_DEPTH,
                        row_limit=TIMING_ROWS, no_row=missed.no_row, too_deep=missed.too_deep,
                        unpaired=missed.unpaired, abandoned=missed.abandoned,
                        unkeyed=missed.unkeyed, key_limit=KEYED_HISTS)
        if not rows.placed:
            out.histograms = {n: Histogram() for n in self._timed_names if n not in out.untimed}
            return out
        cal = timing.calibration()
        out.subtracted_ns = cal.subtracted_ns
        out.calibration_calls = cal.calls
        out.tsc_step_ns = cal.step_ns
        for i, name in enumerate(self._timed_names):
            if name in out.untimed:
                continue
            if self._by is None:
                buckets = rows.keyed.get(None, {}).get(i) or timing.empty_buckets()
                out.histograms[name] = _histogram(buckets, cal)
                continue
            for key, hists in sorted(rows.keyed.items(), key=_key_order):
                if i in hists:
                    out.histograms[f"{name} {self._by}={key}"] = _histogram(hists[i], cal)
        return out

    def _key_of(self, tid: int, pid: int, comm: str) -> int | str:
        return tid if self._by == "tid" else pid if self._by == "pid" else comm

    def _task_key(self, own_tid: int) -> int | str:
        """The tid, pid or comm, as `by` asks, of the thread that calls itself
        `own_tid` (what the program's code reads: tasks.admit); threads
        gone: as they were."""
        pid, comm, tid = owner_of(self.threads, self._nested, self._former_tasks, own_tid)
        return self._key_of(tid, pid, comm)


_Key = int | str | None  # what a histogram is of: a tid, pid or comm (`by`), or all calls


@dataclass
class _Rows:
    """The timing blocks' counts as read: per key, per function index, the
    buckets of ticks (timing.hist_bucket) with calls in them."""

    keyed: dict[_Key, dict[int, list[int]]]
    missed: timing.Missed
    placed: bool  # a timing block was mapped


def _key_order(item: tuple[_Key, object]) -> tuple[int, int, str]:
    """Numbers in numeric order, then names."""
    key = item[0]
    return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


def filter_problem(probes: list[ResolvedProbe], hit_filter: HitFilter) -> str | None:
    """Why `hit_filter` cannot be tested at the entries of the timed
    functions of `probes` (entry and return probe pairs), or None."""
    for p in probes:
        if not p.is_return:
            got = compile_check(hit_filter.combined.root, partial(_entry_source, p))
            if isinstance(got, str):
                return got
    return None


def _entry_source(line: ResolvedProbe, field: str) -> Source | str:
    return source_of(line, field, False)


def key_problem(probes: list[ResolvedProbe], by: str) -> str | None:
    """Why the timed functions of `probes` (entry and return probe pairs)
    cannot be keyed by fetcharg `by` in the program, or None."""
    for p in probes:
        if not p.is_return:
            where = source_of(p, by, False)
            if isinstance(where, str):
                return where
    return None


def _add_into(into: dict[_Key, dict[int, list[int]]], key: _Key,
              hists: dict[int, list[int]]) -> None:
    """Add each function's buckets with calls in them to `into[key]`."""
    for f, buckets in hists.items():
        if not any(buckets):
            continue
        mine = into.setdefault(key, {})
        total = mine.get(f)
        mine[f] = list(buckets) if total is None else [a + b for a, b in zip(total, buckets)]


_SPREAD = 8  # points a reading is spread over when the TSC counts in steps
_FILL = sorted(range(_SPREAD), key=lambda k: abs(k - (_SPREAD - 1) / 2))  # middle ones first


def _histogram(buckets: list[int], cal: timing.Calibration) -> Histogram:
    """Durations in ns, the probes' cost off each. A TSC that counts in
    steps reads a duration as a whole number of steps, off by up to one
    step either way: each reading is spread evenly over the step around it,
    so percentiles fall between steps as the durations do. The calls of a
    bucket go to its points middle ones first, so a point's share never
    shrinks as the bucket's count grows (reads during a run only grow)."""
    h = Histogram()
    step_ns = cal.step_ns
    for ticks, n in timing.bucket_ticks(buckets):
        ns = ticks * cal.ns_per_tick - cal.subtracted_ns
        if step_ns <= cal.ns_per_tick * 2:
            h.add(round(ns), n)
            continue
        part, extra = divmod(n, _SPREAD)
        for rank, k in enumerate(_FILL):
            share = part + (1 if rank < extra else 0)
            if share:
                h.add(round(ns + step_ns * ((k + 0.5) / _SPREAD - 0.5)), share)
    return h
