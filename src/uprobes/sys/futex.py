"""futex(2) wake-ups of waiters in another process's shared memory.

A trap-free recording probe whose ring is full makes its thread sleep in
FUTEX_WAIT on the ring's `tail` word (engines/trapfree/recording.py; the
trampoline issues that call itself). The reader wakes them after it frees
space. The ring is a MAP_SHARED memfd, so the futex is a shared one (no
FUTEX_PRIVATE_FLAG): the kernel keys it by the page's inode and offset,
the same in both processes whatever the addresses.
"""

from __future__ import annotations

from uprobes.sys.libc import syscall

FUTEX_WAIT = 0
FUTEX_WAKE = 1
WAKE_ALL = 0x7FFFFFFF


def wake(addr: int, count: int = WAKE_ALL) -> int:
    """Wake up to `count` threads waiting on the u32 at `addr` (our address
    of the shared word); how many were woken."""
    return syscall("futex", addr, FUTEX_WAKE, count, 0, 0, 0, what="futex wake")
