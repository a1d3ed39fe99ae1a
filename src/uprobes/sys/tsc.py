"""The CPU's time-stamp counter, read here and mapped to CLOCK_MONOTONIC.

Trap-free recording probes (engines/trapfree/recording.py) stamp each hit
with `rdtscp` inside the traced program: no system call, and
the CPU number comes along (Linux keeps `cpu | node << 12` in TSC_AUX).
The reader turns those counts into the same clock the int3 path stamps
with (`time.monotonic_ns()`), so trap-free and trapped hits interleave.

Reading the TSC from Python takes a machine-code function: 13 bytes
(`rdtscp; shl rdx,32; or rax,rdx; mov [rdi],ecx; ret`) in an executable anonymous
mapping, called through ctypes. `TscClock` pairs TSC readings with
CLOCK_MONOTONIC at its creation and again at each `to_ns` batch, and
converts by the slope between the first pair and the newest: a hit is
never older than the first pair, so the slope's error (a microsecond of
jitter over the span) moves a stamp by at most about a microsecond.
This assumes an invariant TSC (`constant_tsc` and `nonstop_tsc` in
/proc/cpuinfo), which `usable()` checks along with `rdtscp`.
"""

from __future__ import annotations

import ctypes
import mmap
import time

_RDTSCP_FN = bytes.fromhex("0f01f9" "48c1e220" "4809d0" "890f" "c3")
"""rdtscp; shl rdx,32; or rax,rdx; mov [rdi],ecx; ret"""
_NEEDED_FLAGS = ("rdtscp", "constant_tsc", "nonstop_tsc")

_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_code: mmap.mmap | None = None


def usable() -> str | None:
    """None when the TSC can stamp hits here, else why not."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError as e:
        return f"cannot read /proc/cpuinfo: {e.strerror}"
    missing = [flag for flag in _NEEDED_FLAGS if flag not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)} (no invariant time-stamp counter)"
    return None


def read() -> int:
    """The TSC of the CPU this thread runs on, now."""
    return read_aux()[0]


def read_aux() -> tuple[int, int]:
    """(the TSC now, TSC_AUX: `cpu | node << 12` of the CPU this thread runs on)."""
    global _fn, _code
    if _fn is None:
        _code = mmap.mmap(-1, mmap.PAGESIZE,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        _code.write(_RDTSCP_FN)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(_code))
        _fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)(addr)
    aux = ctypes.c_uint32()
    return int(_fn(ctypes.byref(aux))), aux.value


def _pair() -> tuple[int, int]:
    """(tsc, monotonic ns) read as close together as we can: the tightest of three."""
    best: tuple[int, int, int] | None = None
    for _ in range(3):
        before = time.monotonic_ns()
        tsc = read()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, tsc, (before + after) // 2)
    assert best is not None
    return best[1], best[2]


class TscClock:
    """TSC counts -> CLOCK_MONOTONIC nanoseconds."""

    def __init__(self) -> None:
        self._tsc0, self._ns0 = _pair()
        time.sleep(0.002)  # a first rate good to ~0.1% (for `ticks`), refined later
        self._scale = 0.0  # ns per count
        self.refresh()

    def refresh(self) -> None:
        """Re-measure the rate against the first pair (call before converting a batch)."""
        tsc, ns = _pair()
        if tsc > self._tsc0 and ns > self._ns0:
            self._scale = (ns - self._ns0) / (tsc - self._tsc0)

    def to_ns(self, tsc: int) -> int:
        return self._ns0 + int((tsc - self._tsc0) * self._scale)

    def rate(self) -> tuple[float, int, int]:
        """(ns per count, tsc0, ns0): ns = ns0 + (tsc - tsc0) * rate, inlined by batch readers."""
        return self._scale, self._tsc0, self._ns0

    def ticks(self, seconds: float) -> int:
        """About how many counts `seconds` take."""
        return int(seconds * 1e9 / (self._scale or 1.0))
