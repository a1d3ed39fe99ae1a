"""A periodic POSIX timer that signals one thread (timer_create(2) with
SIGEV_THREAD_ID).

A tracer outside the main thread blocks in waitid() for its tracees'
stops; this timer bounds that wait: its signal, caught by a handler
installed without SA_RESTART, makes the wait return EINTR every period, on
that thread alone (setitimer's SIGALRM goes to the whole process).
"""

from __future__ import annotations

import ctypes
from types import TracebackType

from uprobes.sys.libc import kernel_error, libc

CLOCK_MONOTONIC = 1
SIGEV_THREAD_ID = 4  # deliver to the thread in sigev_notify_thread_id (linux/signal.h)


class _SigEvent(ctypes.Structure):
    """glibc's `struct sigevent` (64 bytes): value, signo, notify, then the
    union whose first int is the target thread id."""

    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("thread_id", ctypes.c_int),
                ("_pad", ctypes.c_int * 11)]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


def _timespec(seconds: float) -> _TimeSpec:
    ns = max(1, round(seconds * 1e9))
    return _TimeSpec(ns // 1_000_000_000, ns % 1_000_000_000)


class ThreadTimer:
    """While entered, thread `tid` (a native id) of this process receives
    `signo` every `period` seconds. The signal's handler must be in place
    first: a signal with no handler ends the process."""

    def __init__(self, tid: int, signo: int, period: float) -> None:
        self.tid = tid
        self.signo = signo
        self.period = period
        self._timer = ctypes.c_void_p(None)
        self._armed = False

    def __enter__(self) -> ThreadTimer:
        lib = libc()
        event = _SigEvent(sigev_signo=self.signo, sigev_notify=SIGEV_THREAD_ID,
                          thread_id=self.tid)
        ctypes.set_errno(0)
        if lib.function("timer_create")(CLOCK_MONOTONIC, ctypes.byref(event),
                                        ctypes.byref(self._timer)) != 0:
            raise kernel_error("timer_create", ctypes.get_errno())
        self._armed = True
        every = _timespec(self.period)
        spec = _ITimerSpec(every, every)
        if lib.function("timer_settime")(self._timer, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            self._delete()
            raise kernel_error("timer_settime", err)
        return self

    def _delete(self) -> None:
        if self._armed:
            self._armed = False
            libc().function("timer_delete")(self._timer)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._delete()
