"""A latency histogram with bounded memory: exact count, sum, min and max;
log2 buckets for the picture (funclatency's), and percentiles from
log-linear buckets 1/64 of a power of two wide (within 1.6% of the true
value, then clamped to [min, max]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUB_BITS = 6
SUB = 1 << SUB_BITS


def _fine_index(v: int) -> int:
    if v < SUB:
        return v
    e = v.bit_length() - 1
    return ((e - SUB_BITS + 1) << SUB_BITS) + ((v >> (e - SUB_BITS)) & (SUB - 1))


def _fine_bounds(i: int) -> tuple[int, int]:
    """The [lo, hi] values fine bucket `i` holds."""
    if i < SUB:
        return i, i
    e = (i >> SUB_BITS) + SUB_BITS - 1
    lo = (1 << e) + ((i & (SUB - 1)) << (e - SUB_BITS))
    return lo, lo + (1 << (e - SUB_BITS)) - 1


@dataclass
class Histogram:
    """Durations in ns."""

    count: int = 0
    total: int = 0
    min: int | None = None
    max: int = 0
    _fine: dict[int, int] = field(default_factory=dict)

    def add(self, ns: int, times: int = 1) -> None:
        """`times` calls of `ns` each."""
        ns = max(ns, 0)
        self.count += times
        self.total += ns * times
        if self.min is None or ns < self.min:
            self.min = ns
        if ns > self.max:
            self.max = ns
        i = _fine_index(ns)
        self._fine[i] = self._fine.get(i, 0) + times

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, p: float) -> int:
        """The value under which `p` percent of the durations fall."""
        if not self.count:
            return 0
        rank = max(1, -(-self.count * p // 100))  # ceil, at least the first
        seen = 0
        for i in sorted(self._fine):
            seen += self._fine[i]
            if seen >= rank:
                lo, hi = _fine_bounds(i)
                assert self.min is not None
                return int(min(max((lo + hi) // 2, self.min), self.max))
        return self.max

    def spans(self) -> list[tuple[int, int, int]]:
        """(lo, hi, count) of each fine bucket with calls, lowest first."""
        return [(*_fine_bounds(i), self._fine[i]) for i in sorted(self._fine)]

    def log2_buckets(self) -> list[tuple[int, int, int]]:
        """(lo, hi, count) for each power-of-two range (0 -> 1, 2 -> 3, 4 -> 7,
        ...) from the first used to the last used, empty ones between kept."""
        counts: dict[int, int] = {}
        for i, n in self._fine.items():
            lo, _ = _fine_bounds(i)
            b = max(lo.bit_length(), 1)  # row 1 holds 0 and 1
            counts[b] = counts.get(b, 0) + n
        if not counts:
            return []
        return [(0 if b == 1 else 1 << (b - 1), (1 << b) - 1, counts.get(b, 0))
                for b in range(min(counts), max(counts) + 1)]


@dataclass
class Latencies:
    """Calls timed in the program (the ptrace engine's trap-free timing):
    a histogram per function, with the probes' own cost per call taken off
    each duration (`subtracted_ns`, measured on the spot: the mean of the
    fastest 90% of `calibration_calls` calls of an empty function timed by
    the same code),
    what could not be timed, and the functions left untimed (and why)."""

    histograms: dict[str, Histogram]
    subtracted_ns: float = 0.0
    calibration_calls: int = 0
    tsc_step_ns: float = 0.0  # the clock's step here: a duration is read to within one
    no_row: int = 0      # calls of threads that found no free row
    too_deep: int = 0    # calls beyond a thread's deepest stack of open calls
    unpaired: int = 0    # returns with no entry (begun before the probes, or left)
    abandoned: int = 0   # calls left without returning (longjmp, an exception, a tail call)
    unkeyed: int = 0     # calls timed by a key (`--by ARG`) that found no place in its table
    untimed: dict[str, str] = field(default_factory=dict)
    depth_limit: int = 0  # open calls a thread's row holds
    row_limit: int = 0    # threads timed at once
    key_limit: int = 0    # (function, key) histograms a block holds (`--by ARG`)
