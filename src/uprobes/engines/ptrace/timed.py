"""Timing calls in the program (`trapfree="time"`): `latency` with no records.

Each timed function's entry and rets become jump patches whose trampolines
keep the thread's open calls and its histograms in a shared timing block
(engines/trapfree/timing.py). A function too short for two patches (its
entry's and its ret's would overlap) gets one patch of all of it
(fileplan.plan_whole). A site that cannot be patched leaves its function
untimed, with the reason (`Latencies.untimed`): no int3 is placed, since a
function timed at some sites and not others would give wrong durations.

At the end (detach) the blocks are read, a null function is timed by the
same code in this process (timing.calibrate), and its median is taken off
every duration: what `latencies()` returns says how much.
"""

from __future__ import annotations

from uprobes.analysis.histogram import Histogram, Latencies
from uprobes.engines.ptrace.state import TracerState
from uprobes.engines.ptrace.tasks import Thread
from uprobes.engines.trapfree import timing
from uprobes.engines.trapfree.fileplan import plan_for, plan_whole
from uprobes.engines.trapfree.jumppatch import Timed
from uprobes.engines.trapfree.layout import STACK_DEPTH, TIMED_FUNCS, TIMING_ROWS
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.model.registry import Probe
from uprobes.sys import ptrace


class CallTimer(TracerState):
    """The ptrace engine's `Timer` role (engines/base.py)."""

    _latencies: Latencies | None

    def _time_functions(self, probes: list[ResolvedProbe], names: list[str]) -> None:
        """Give each function named by an entry probe of `probes` (display
        names `names`) its index in the timing blocks."""
        self._timed, self._timed_names, self._untimed = {}, [], {}
        self._latencies = None
        self._released: list[tuple[int, dict[int, list[int]]]] = []  # (tid, its histograms)
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

    def _place_timed(self, t: Thread, regs: ptrace.UserRegs, probe: Probe, addr: int,
                     file_offset: int, ident: tuple[int, int] | None) -> None:
        if ident is None:
            return
        if self._by == "comm":
            t.comm  # noqa: B018 (read now: its threads inherit it, and it outlives them)
        at_ret = self._ret_sites.get(probe.key)  # type: ignore[arg-type]
        func_offset = file_offset - (at_ret or 0)
        index = self._timed.get((ident[0], ident[1], func_offset))
        if index is None:
            return  # untimed already (and said why)
        name = self._timed_names[index]
        if name in self._untimed:
            return
        from uprobes.sys import tsc
        why = tsc.usable()
        path = probe.point.path
        whole = plan_whole(path, ident[0], ident[1], func_offset)
        if why is None and not isinstance(whole, str):
            if at_ret is not None:
                return  # the entry's patch covers the whole function and this ret
            why = self._patch(t, regs, whole, name, addr, timed=Timed(index))
        elif why is None:
            others = [p.point.file_offset for p in self.registry.in_inode(*ident)]
            plan = plan_for(path, ident[0], ident[1], file_offset, others,
                            at_return=at_ret is not None)
            if isinstance(plan, str):
                why = plan
            else:
                start = addr - (file_offset - plan.file_offset)
                why = self._patch(t, regs, plan, name, start,
                                  timed=Timed(index, ret=at_ret is not None))
        if why is not None:
            self._untimed[name] = why

    def _thread_done(self, t: Thread) -> None:
        assert self._jumps is not None
        funcs = range(len(self._timed_names)) if self._trapfree == "time" else ()
        for hists in self._jumps.release_thread(t.mm, t.tid, funcs):
            if any(any(b) for b in hists.values()):
                self._released.append((t.tid, hists))

    def _time_snapshot(self) -> None:
        """Read the timing blocks and calibrate, once, at detach (the blocks
        stay readable: the program's views of them are its own)."""
        if self._trapfree != "time" or self._latencies is not None or self._jumps is None:
            return
        self._latencies = self._read_latencies()

    def latencies(self) -> Latencies:
        """The histograms so far (after the run: as read at detach)."""
        if self._latencies is not None:
            return self._latencies
        return self._read_latencies()

    def _read_latencies(self) -> Latencies:
        assert self._jumps is not None
        indices = list(range(len(self._timed_names)))
        funcs = {i: timing.empty_buckets() for i in indices}
        out = Latencies({}, untimed=dict(self._untimed), depth_limit=STACK_DEPTH,
                        row_limit=TIMING_ROWS)
        rows = list(self._released)  # (tid, histograms): threads gone, then live ones
        for block in self._jumps.timing:
            rows += block.by_owner(indices)
            missed = block.missed()
            out.no_row += missed.no_row
            out.too_deep += missed.too_deep
            out.unpaired += missed.unpaired
            out.abandoned += missed.abandoned
        for _, hists in rows:
            for i, buckets in hists.items():
                funcs[i] = [a + b for a, b in zip(funcs[i], buckets)]
        if not self._jumps.timing:
            out.histograms = {n: Histogram() for n in self._timed_names if n not in out.untimed}
            return out
        from uprobes.sys import tsc
        scale = tsc.TscClock().rate()[0]  # ns per tick
        calls = timing.CALIBRATION_CALLS
        null = timing.calibrate(calls)
        out.subtracted_ns = timing.typical_ticks(null) * scale
        out.calibration_calls = calls
        out.tsc_step_ns = timing.tsc_step() * scale
        for i, name in enumerate(self._timed_names):
            if name in out.untimed:
                continue
            if self._by is None:
                out.histograms[name] = _histogram(funcs[i], scale, out.subtracted_ns,
                                                  out.tsc_step_ns)
                continue
            keyed: dict[int | str, list[int]] = {}
            for tid, hists in rows:
                if any(hists[i]):
                    into = keyed.setdefault(self._task_key(tid), timing.empty_buckets())
                    keyed[self._task_key(tid)] = [a + b for a, b in zip(into, hists[i])]
            for key, buckets in sorted(keyed.items(), key=lambda kv: str(kv[0])):
                out.histograms[f"{name} {self._by}={key}"] = _histogram(
                    buckets, scale, out.subtracted_ns, out.tsc_step_ns)
        return out

    def _task_key(self, tid: int) -> int | str:
        """A thread's tid, pid or comm, as `by` asks (threads gone: as they were)."""
        if self._by == "tid":
            return tid
        t = self.threads.get(tid)
        pid, comm = (t.pid, t.comm) if t is not None else self._former_tasks.get(tid, (0, "?"))
        return pid if self._by == "pid" else comm


_SPREAD = 8  # points a reading is spread over when the TSC counts in steps


def _histogram(buckets: list[int], ns_per_tick: float, subtract_ns: float,
               step_ns: float) -> Histogram:
    """Durations in ns, `subtract_ns` off each. A TSC that counts in steps
    of `step_ns` reads a duration as a whole number of steps, off by up to
    one step either way: each reading is spread evenly over the step around
    it, so percentiles fall between steps as the durations do."""
    h = Histogram()
    for ticks, n in timing.bucket_ticks(buckets):
        ns = ticks * ns_per_tick - subtract_ns
        if step_ns <= ns_per_tick * 2 or n < _SPREAD:
            h.add(round(ns), n)
            continue
        part, extra = divmod(n, _SPREAD)
        for k in range(_SPREAD):
            at = ns + step_ns * ((k + 0.5) / _SPREAD - 0.5)
            h.add(round(at), part + (1 if k < extra else 0))
    return h
