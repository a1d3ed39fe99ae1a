"""The machine's clocks read together, so one trace can be lined up with others.

Every event we stamp is CLOCK_MONOTONIC ns (perf `use_clockid`, the ptrace
engine's `time.monotonic_ns()`, the trap-free rings' TSC mapped onto it).
Other traces use other clocks: ftrace and Perfetto's own data BOOTTIME,
logs REALTIME. A snapshot of the three, taken at the start and the end of a
run, lets a reader convert between them (Perfetto's `ClockSnapshot`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# clock_gettime's clock ids; BOOTTIME has no constant in Python's `time`
# on every version, so all three are spelled out (include/uapi/linux/time.h).
CLOCK_REALTIME = 0
CLOCK_MONOTONIC = 1
CLOCK_BOOTTIME = 7


@dataclass(frozen=True)
class ClockSnapshot:
    """The three clocks at (nearly) one instant, in ns (the tightest of
    three reads, by how long the reading took)."""

    monotonic_ns: int
    realtime_ns: int
    boottime_ns: int

    def as_dict(self) -> dict[str, int]:
        return {"monotonic_ns": self.monotonic_ns, "realtime_ns": self.realtime_ns,
                "boottime_ns": self.boottime_ns}


def snapshot() -> ClockSnapshot:
    """The clocks now."""
    best: tuple[int, ClockSnapshot] | None = None
    for _ in range(3):
        real = time.clock_gettime_ns(CLOCK_REALTIME)
        mono = time.clock_gettime_ns(CLOCK_MONOTONIC)
        boot = time.clock_gettime_ns(CLOCK_BOOTTIME)
        after = time.clock_gettime_ns(CLOCK_MONOTONIC)
        spread = after - mono
        if best is None or spread < best[0]:
            best = (spread, ClockSnapshot(mono, real, boot))
    assert best is not None
    return best[1]
