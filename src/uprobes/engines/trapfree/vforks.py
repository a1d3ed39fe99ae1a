"""vfork children in their parent's memory: which of the parent's records
are the child's.

A vfork child (posix_spawn's too) runs in its parent's memory on its
parent's thread pointer until it execs or exits, so trap-free code that
reads the tid where glibc keeps it (recording.py) records the vforking
thread's tid. That thread waits for the child meanwhile: every record
holding its tid made from its vfork event (the child not yet run) to its
VFORK_DONE stop (the child gone from the memory) is the child's.
`VforkWindows` keeps those spans, in TSC ticks, and gives such records
their child's tid (reader.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from uprobes.engines.trapfree.layout import REC_TID, REC_TSC


@dataclass
class _Window:
    start: int
    end: int | None  # None: the child still runs in the memory
    child: int       # the child's own tid (what gettid says to it)
    lender: int      # the vforking thread's own tid


class VforkWindows:
    """The vforks under way or lately over, by the tid their child's records hold."""

    def __init__(self) -> None:
        self._by_tid: dict[int, list[_Window]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_tid)

    def lent(self, lender: int, child: int, now: int) -> None:
        """Thread `lender` vforked `child` (own tids); `now`: a TSC stamp
        taken at the event, the lender stopped and the child not yet run."""
        carried = lender  # a child that vforks in turn holds its parent's tid
        for tid, windows in self._by_tid.items():
            if any(w.end is None and w.child == lender for w in windows):
                carried = tid
                break
        self._by_tid.setdefault(carried, []).append(_Window(now, None, child, lender))

    def returned(self, lender: int, now: int) -> None:
        """`lender`'s vfork is over at TSC `now` (its VFORK_DONE stop, or it is gone)."""
        for windows in self._by_tid.values():
            for w in windows:
                if w.lender == lender and w.end is None:
                    w.end = now

    def settled(self, before: int) -> None:
        """Every record made before TSC `before` has been read: the windows
        over by then are forgotten."""
        for tid in list(self._by_tid):
            kept = [w for w in self._by_tid[tid] if w.end is None or w.end >= before]
            if kept:
                self._by_tid[tid] = kept
            else:
                del self._by_tid[tid]

    def retag(self, records: list[tuple[int, ...]], tids: set[int]) -> list[tuple[int, ...]]:
        """`records` (holding `tids`), each made in a window with its
        child's tid (the latest vfork's, when one child vforked in turn)."""
        by_tid = self._by_tid
        if tids.isdisjoint(by_tid):
            return records
        out = []
        for rec in records:
            windows = by_tid.get(rec[REC_TID])
            if windows:
                ts = rec[REC_TSC]
                inside = [w for w in windows if w.start <= ts and (w.end is None or ts <= w.end)]
                if inside:
                    child = max(inside, key=lambda w: w.start).child
                    rec = (*rec[:REC_TID], child, *rec[REC_TID + 1:])
            out.append(rec)
        return out
