"""A word the kernel moves when a traced process sandboxes itself: the guard
of the system calls our code makes inside the program.

Code we place in a program that makes system calls of its own (the Python
walk's getpid and process_vm_readv, pywalk.py; a name test's prctl,
timing.comm_into) is judged against the
program's seccomp filters when it is placed. A filter the program installs
later is judged by no one: one that kills on process_vm_readv would kill
the program at its next hit. So BPF programs on the entries of `seccomp`
and of `prctl(PR_SET_SECCOMP)` move a word, in the installing thread,
before the kernel installs anything (its filter is copied and attached
later in the same call, and takes effect on the threads a
SECCOMP_FILTER_FLAG_TSYNC names only then), for the processes we trace (a
hash map of their pids, filled by the tracer before their first
instruction: at placement and at each fork's first stop):

    word 0   SECCOMP_OPEN (1, layout.py) until a traced process enters
             seccomp() or prctl(PR_SET_SECCOMP) for an operation that can
             install (strict mode, filters; not SECCOMP_GET_ACTION_AVAIL):
             then 0, for good
    word 1   the pid of the last one

The code reads word 0 before each of its system calls and, unless it is
open, makes none (pywalk.py: the hit is recorded without its Python
frames, and counted; comm_into: the name is not read, as if the call
failed). Closed is 0 so that the zero page that takes the map's place at
detach (kernelmaps.retire) keeps a thread still in our code from calling.
What is left: a thread that read the word open and is about to enter its
call while another thread of its process installs a filter with TSYNC in
between (a few instructions, unless it is preempted there) is judged by
the new filter. A 32-bit `int 0x80` seccomp call is not seen
(the `syscalls` tracepoints skip compat calls).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial

from uprobes.engines.trapfree.kernelmaps import attach_program
from uprobes.engines.trapfree.layout import SECCOMP_OPEN
from uprobes.errors import KernelError, UprobesError
from uprobes.sys import bpf

SECCOMP_OPS = 1  # SECCOMP_SET_MODE_STRICT (0) and SECCOMP_SET_MODE_FILTER (1) install
PR_SET_SECCOMP = 22
_TRACED = 16384  # processes followed; past them, the word moves (every guard closes)
_ARG0 = 16  # the first argument in a sys_enter record (after the common fields and nr)


class SeccompWatch:
    """The word, the traced processes, the programs on their tracepoints, owned."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        try:
            self.words = bpf.BpfMap.shared_words(2)
            self._stack.callback(self.words.close)
            self._set(SECCOMP_OPEN)
            self._traced = bpf.BpfMap(bpf.BPF_MAP_TYPE_HASH, 4, 4, _TRACED)
            self._stack.callback(self._traced.close)
            attach_program(self._stack, self._program(partial(bpf.jump_if_above, 2, SECCOMP_OPS)),
                           "seccomp_entered", "syscalls/sys_enter_seccomp")
            attach_program(self._stack,
                           self._program(partial(bpf.jump_if_not_equal, 2, PR_SET_SECCOMP)),
                           "seccomp_prctl", "syscalls/sys_enter_prctl")
        except BaseException:
            self._stack.close()
            raise

    def _program(self, skip_unless: Callable[[int], bytes]) -> list[bytes]:
        """For the calls whose first argument (in r2, its low 32 bits: the
        kernel's `int`) passes a test (`skip_unless(n)`: a jump over n slots
        when it fails), made by a traced process: word 0 closed, word 1 its pid."""
        tail = [
            bpf.call(bpf.HELPER_GET_CURRENT_PID_TGID), bpf.rsh_imm(0, 32),
            bpf.store_u32(10, -4, 0), bpf.mov_reg(6, 0),
            bpf.load_map_fd(1, self._traced.fd), bpf.mov_reg(2, 10), bpf.add_imm(2, -4),
            bpf.call(bpf.HELPER_MAP_LOOKUP_ELEM),
            bpf.jump_if_zero(0, 4),
            bpf.load_map_value(1, self.words.fd, 0), bpf.store_imm_u64(1, 0, 0),
            bpf.store_u64(1, 8, 6),
        ]
        slots = sum(len(i) // 8 for i in tail)
        return [bpf.load_u32(2, 1, _ARG0), skip_unless(slots), *tail, bpf.mov_imm(0, bpf.PASS),
                bpf.exit_()]

    @classmethod
    def start(cls) -> SeccompWatch | str:
        """The watch, or why the kernel will not run it."""
        try:
            return cls()
        except (UprobesError, OSError) as e:
            return str(e)

    def follow(self, pid: int) -> None:
        """Process `pid` (not running: stopped before placement, or a fork
        child before its first instruction) is traced: its calls move the
        word. A full table of them moves the word itself."""
        try:
            self._traced.update(struct.pack("<I", pid), struct.pack("<I", 1))
        except KernelError as e:
            if e.errno not in (errno.E2BIG, errno.ENOMEM):
                raise
            self.close_guards()

    def _set(self, value: int) -> None:
        assert self.words.memory is not None
        struct.pack_into("<Q", self.words.memory, 0, value)

    def close_guards(self) -> None:
        """Close the word from here: every guard closes."""
        self._set(0)

    @property
    def open(self) -> bool:
        """No traced process has entered a call that may install a filter."""
        return self.words.word(0) == SECCOMP_OPEN

    def last(self) -> int:
        """The pid of the last of them (word 1)."""
        return self.words.word(1)

    def close(self) -> None:
        self._stack.close()
