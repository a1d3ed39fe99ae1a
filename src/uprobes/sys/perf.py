"""perf_event_open(2): the attr struct, event fds, and the mmap ring buffer.

Tracepoint events (`PERF_TYPE_TRACEPOINT`, `config` = a tracefs event id) are
how the kernel engine receives probe hits: PERF_SAMPLE_RAW carries the trace
record the event's `format` file describes.

Per-CPU vs per-task rings, as measured on 6.18: a per-task event (`pid=PID,
cpu=-1`) can be mmapped only without `inherit` (perf_mmap() refuses EINVAL
for inherited per-task events so children don't all write into one buffer).
To follow children, open one event per CPU with `pid=PID, cpu=N, inherit=1`
and a ring per CPU; several events on the same CPU share one ring through
`set_output()` (the kernel refuses cross-CPU redirection, EINVAL).

Measured on 6.18 (tests/test_sys_perf.py): tracepoint events with inherit do
not disturb the target (pthread_create and fork work, unlike the uprobe PMU
with inherit, see pmu.py); new threads are recorded exactly; a forked child
is recorded, but in about 1 run in 8 part of its samples never arrive while
uprobe_profile counts every hit and no PERF_RECORD_LOST is written.
Without inherit, perf's pid is one thread: other threads' hits are dropped.
`use_clockid` + CLOCK_MONOTONIC stamps match time.clock_gettime_ns().
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from uprobes.errors import KernelError
from uprobes.sys.libc import ioctl, kernel_errors, syscall

PERF_TYPE_TRACEPOINT = 2

# attr.sample_type bits (include/uapi/linux/perf_event.h).
PERF_SAMPLE_IP = 1 << 0
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_ADDR = 1 << 3
PERF_SAMPLE_ID = 1 << 6
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_PERIOD = 1 << 8
PERF_SAMPLE_STREAM_ID = 1 << 9
PERF_SAMPLE_RAW = 1 << 10
PERF_SAMPLE_REGS_USER = 1 << 12
PERF_SAMPLE_STACK_USER = 1 << 13
PERF_SAMPLE_IDENTIFIER = 1 << 16
# The layouts RingBuffer can parse: every field before RAW that it knows, and
# the user registers and stack that come after RAW (`user_tail()` reads them).

# x86-64 perf register numbers (arch/x86/include/uapi/asm/perf_regs.h); a
# sample's registers come in the order of their bits in `sample_regs_user`.
PERF_REG_X86 = {"ax": 0, "bx": 1, "cx": 2, "dx": 3, "si": 4, "di": 5, "bp": 6, "sp": 7,
                "ip": 8, "flags": 9, "cs": 10, "ss": 11, "ds": 12, "es": 13, "fs": 14,
                "gs": 15, **{f"r{n}": 8 + n for n in range(8, 16)}}

# The attr flags word, one named bit each (the C struct's bitfield, in order).
ATTR_DISABLED = 1 << 0
ATTR_INHERIT = 1 << 1
ATTR_PINNED = 1 << 2
ATTR_EXCLUSIVE = 1 << 3
ATTR_EXCLUDE_USER = 1 << 4
ATTR_EXCLUDE_KERNEL = 1 << 5
ATTR_EXCLUDE_HV = 1 << 6
ATTR_EXCLUDE_IDLE = 1 << 7
ATTR_MMAP = 1 << 8
ATTR_COMM = 1 << 9
ATTR_FREQ = 1 << 10
ATTR_INHERIT_STAT = 1 << 11
ATTR_ENABLE_ON_EXEC = 1 << 12
ATTR_TASK = 1 << 13
ATTR_WATERMARK = 1 << 14
ATTR_MMAP_DATA = 1 << 17
ATTR_SAMPLE_ID_ALL = 1 << 18
ATTR_MMAP2 = 1 << 23
ATTR_USE_CLOCKID = 1 << 25
ATTR_CONTEXT_SWITCH = 1 << 26
ATTR_WRITE_BACKWARD = 1 << 27
ATTR_INHERIT_THREAD = 1 << 35
ATTR_REMOVE_ON_EXEC = 1 << 36

PERF_FLAG_FD_CLOEXEC = 1 << 3

# ioctl requests: _IO('$', n) and _IOW('$', 6, char *).
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_RESET = 0x2403
PERF_EVENT_IOC_SET_OUTPUT = 0x2405
PERF_EVENT_IOC_SET_FILTER = 0x40082406

PERF_RECORD_LOST = 2
PERF_RECORD_FORK = 7  # the mmap attr bits bring it too (perf_event_task_match)
PERF_RECORD_SAMPLE = 9
PERF_RECORD_MMAP2 = 10
PERF_RECORD_SWITCH = 14
PERF_RECORD_SWITCH_CPU_WIDE = 15  # the same, of a per-CPU event: also names the other task
# perf_event_header.misc of a PERF_RECORD_SWITCH: the task left the CPU
# (else it came on), and it left runnable (preempted), not blocked.
PERF_RECORD_MISC_SWITCH_OUT = 1 << 13
PERF_RECORD_MISC_SWITCH_OUT_PREEMPT = 1 << 14

PERF_ATTR_SIZE_VER8 = 136
PAGE_SIZE = mmap.PAGESIZE
# struct perf_event_mmap_page: data_head, data_tail, data_offset, data_size.

_OPEN_HINTS: Mapping[int, str] = {
    errno.EACCES: "need root or CAP_PERFMON (perf_event_paranoid is too strict)",
    errno.EPERM: "need root or CAP_PERFMON (perf_event_paranoid is too strict)",
    errno.ESRCH: "no such process",
    errno.ENOENT: "no such event (was the tracefs event removed?)",
    errno.EINVAL: "the kernel refused these perf attributes",
    errno.EMFILE: "too many open files: raise `ulimit -n` (one fd per probe per CPU)",
}


class PerfEventAttr(ctypes.Structure):
    """`struct perf_event_attr`, PERF_ATTR_SIZE_VER8 (136 bytes).

    The C bitfield is one u64 `flags`; set bits with the `ATTR_*` constants.
    """

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),  # union with sample_freq
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),  # union with wakeup_watermark
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),  # uprobe_path for the uprobe PMU
        ("config2", ctypes.c_uint64),  # probe_offset for the uprobe PMU
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("aux_action", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PerfEventAttr) == PERF_ATTR_SIZE_VER8


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int = -1,
                    flags: int = PERF_FLAG_FD_CLOEXEC, *, what: str = "perf_event_open",
                    hints: Mapping[int, str] | None = None) -> int:
    """The raw call; returns the new fd. Retries once with the kernel's own
    attr size when it answers E2BIG (an older kernel; it writes its size back)."""
    attr.size = attr.size or ctypes.sizeof(attr)
    merged = {**_OPEN_HINTS, **(hints or {})}
    try:
        return syscall("perf_event_open", ctypes.addressof(attr), pid, cpu, group_fd, flags,
                       what=what, hints=merged)
    except KernelError as e:
        if e.errno != errno.E2BIG or attr.size >= ctypes.sizeof(attr):
            raise
    return syscall("perf_event_open", ctypes.addressof(attr), pid, cpu, group_fd, flags,
                   what=what, hints=merged)


class PerfEvent:
    """One perf event fd, owned: closed on exit."""

    def __init__(self, fd: int, attr: PerfEventAttr, pid: int, cpu: int, what: str) -> None:
        self.fd = fd
        self.attr = attr
        self.pid = pid
        self.cpu = cpu
        self.what = what

    @classmethod
    def open(cls, attr: PerfEventAttr, *, pid: int = -1, cpu: int = -1,
             what: str = "opening perf event",
             hints: Mapping[int, str] | None = None) -> PerfEvent:
        """Open an event with `attr` for task `pid` (-1: all) on `cpu` (-1: any)."""
        fd = perf_event_open(attr, pid, cpu, what=what, hints=hints)
        return cls(fd, attr, pid, cpu, what)

    def fileno(self) -> int:
        return self.fd

    def _ioctl(self, request: int, arg: int, what: str) -> None:
        ioctl(self.fd, request, arg, what=f"{what} ({self.what})", hints=_OPEN_HINTS)

    def enable(self) -> None:
        """PERF_EVENT_IOC_ENABLE."""
        self._ioctl(PERF_EVENT_IOC_ENABLE, 0, "enabling perf event")

    def disable(self) -> None:
        """PERF_EVENT_IOC_DISABLE."""
        self._ioctl(PERF_EVENT_IOC_DISABLE, 0, "disabling perf event")

    def reset(self) -> None:
        """PERF_EVENT_IOC_RESET: the counter back to zero."""
        self._ioctl(PERF_EVENT_IOC_RESET, 0, "resetting perf event")

    def set_output(self, target: PerfEvent) -> None:
        """Send this event's records to `target`'s ring (same CPU only)."""
        self._ioctl(PERF_EVENT_IOC_SET_OUTPUT, target.fd, "redirecting perf event output")

    def set_filter(self, expr: str) -> None:
        """PERF_EVENT_IOC_SET_FILTER: an ftrace filter expression on a tracepoint event."""
        buf = ctypes.create_string_buffer(os.fsencode(expr))
        self._ioctl(PERF_EVENT_IOC_SET_FILTER, ctypes.addressof(buf), "setting perf filter")

    def read_count(self) -> int:
        """The counter value (read_format 0: one u64)."""
        with kernel_errors(f"reading counter ({self.what})"):
            data = os.read(self.fd, 8)
        if len(data) != 8:
            raise KernelError(f"reading counter ({self.what}): short read of {len(data)} bytes")
        return int(struct.unpack("<Q", data)[0])

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> PerfEvent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# What a tracepoint sample carries by default: the raw record, who, when, which CPU.
TRACE_SAMPLE_TYPE = PERF_SAMPLE_RAW | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_CPU


def tracepoint_attr(event_id: int, *, inherit: bool = False, wakeup_events: int = 1,
                    watermark_bytes: int = 0, clockid: int | None = time.CLOCK_MONOTONIC,
                    sample_type: int = TRACE_SAMPLE_TYPE, user_regs: int = 0,
                    user_stack_bytes: int = 0, track_mmaps: bool = False,
                    context_switch: bool = False, enable_on_exec: bool = False,
                    ) -> PerfEventAttr:
    """Attr for a sampling tracepoint event: every hit is one record.

    Timestamps come from `clockid` (CLOCK_MONOTONIC by default, via
    `use_clockid`); None keeps perf's default local_clock. With
    `watermark_bytes` the reader is woken per that many bytes instead of
    per `wakeup_events` records. `user_regs` (a mask of PERF_REG_X86 bits)
    and `user_stack_bytes` (a multiple of 8) add the user registers and a
    copy of the user stack at the hit to each sample. `track_mmaps`: the
    ring also gets a PERF_RECORD_MMAP2 for every executable mapping the
    tasks make (exec's included; one event per ring should ask, or each
    asking event writes its own copy). `context_switch`: the ring also gets
    a PERF_RECORD_SWITCH each time a task of the event comes on or leaves
    a CPU, stamped by a sample_id trailer of the TID, TIME and CPU sample
    bits. `enable_on_exec`: the event starts counting at the task's next
    exec. Starts disabled.
    """
    attr = PerfEventAttr()
    attr.size = ctypes.sizeof(attr)
    attr.type = PERF_TYPE_TRACEPOINT
    attr.config = event_id
    attr.sample_period = 1
    attr.sample_type = sample_type
    if user_regs:
        attr.sample_type |= PERF_SAMPLE_REGS_USER
        attr.sample_regs_user = user_regs
    if user_stack_bytes:
        attr.sample_type |= PERF_SAMPLE_STACK_USER
        attr.sample_stack_user = user_stack_bytes
    attr.flags = ATTR_DISABLED | (ATTR_INHERIT if inherit else 0)
    if track_mmaps:
        attr.flags |= ATTR_MMAP | ATTR_MMAP2
    if context_switch:
        attr.flags |= ATTR_CONTEXT_SWITCH | ATTR_SAMPLE_ID_ALL
    if enable_on_exec:
        attr.flags |= ATTR_ENABLE_ON_EXEC
    if watermark_bytes:
        attr.flags |= ATTR_WATERMARK
        attr.wakeup_events = watermark_bytes
    else:
        attr.wakeup_events = wakeup_events
    if clockid is not None:
        attr.flags |= ATTR_USE_CLOCKID
        attr.clockid = clockid
    return attr


def open_tracepoint(event_id: int, *, pid: int = -1, cpu: int = -1, inherit: bool = False,
                    wakeup_events: int = 1, watermark_bytes: int = 0,
                    clockid: int | None = time.CLOCK_MONOTONIC, user_regs: int = 0,
                    user_stack_bytes: int = 0, track_mmaps: bool = False) -> PerfEvent:
    """Open a (disabled) sampling event on tracepoint `event_id`.

    `pid=-1, cpu=N`: system-wide on CPU N. `pid=P, cpu=-1`: task P on every
    CPU (mmap needs `inherit=False`). `pid=P, cpu=N, inherit=True`: P and
    its future children, on CPU N.
    """
    if pid == -1 and cpu == -1:
        raise KernelError("a system-wide perf event needs a CPU: open one per CPU", errno.EINVAL)
    attr = tracepoint_attr(event_id, inherit=inherit, wakeup_events=wakeup_events,
                           watermark_bytes=watermark_bytes, clockid=clockid,
                           user_regs=user_regs, user_stack_bytes=user_stack_bytes,
                           track_mmaps=track_mmaps)
    return PerfEvent.open(attr, pid=pid, cpu=cpu,
                          what=f"tracepoint {event_id} pid {pid} cpu {cpu}")


def open_counting(event_id: int, *, pid: int = -1, cpu: int = -1, inherit: bool = False,
                  inherit_thread: bool = False, enable_on_exec: bool = False) -> PerfEvent:
    """Open a (disabled) counting event on tracepoint `event_id`: no
    samples, `read_count()` gives the hits. `pid=P`: task P on every CPU
    (`inherit`: and the tasks it creates after the open, their counts summed
    into its own; `inherit_thread`: its threads only, not its children;
    `enable_on_exec`: counting from the task's next exec); `pid=-1, cpu=N`:
    every task on CPU N."""
    attr = PerfEventAttr()
    attr.size = ctypes.sizeof(attr)
    attr.type = PERF_TYPE_TRACEPOINT
    attr.config = event_id
    attr.sample_period = 0
    attr.sample_type = 0
    attr.flags = ATTR_DISABLED | (ATTR_INHERIT if inherit else 0) | (
        ATTR_INHERIT_THREAD if inherit and inherit_thread else 0) | (
        ATTR_ENABLE_ON_EXEC if enable_on_exec else 0)
    return PerfEvent.open(attr, pid=pid, cpu=cpu,
                          what=f"counting tracepoint {event_id} on task {pid} cpu {cpu}")


def online_cpus() -> list[int]:
    """CPUs in /sys/devices/system/cpu/online (`0-3,5`)."""
    return _cpu_list("online")


def possible_cpus() -> list[int]:
    """Every CPU this boot can ever have, hot-plugged ones too (`possible`)."""
    return _cpu_list("possible")


def _cpu_list(which: str) -> list[int]:
    with kernel_errors(f"reading the list of {which} CPUs"):
        text = Path(f"/sys/devices/system/cpu/{which}").read_text().strip()
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def raise_fd_limit(need: int, spare: int = 64) -> None:
    """Perf events take one fd per event, task and CPU: lift the soft limit
    on open files toward the hard one when `need` (+ `spare`) exceeds it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
