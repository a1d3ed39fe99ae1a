"""A word the kernel moves at every rename: what lets `--comm` cache its verdict.

A compiled `--comm` test asked the kernel for the thread's name at each
hit (prctl, ~940 ns). With this word it asks once per thread and keeps
the verdict (filtercode.CommCache) until the word moves. BPF programs on
tracepoints move it, in the renaming thread, before its system call
returns (docs/filters.md, "Why `--comm` asks the kernel at each hit"):

- `task:task_rename` (before the new name is copied): a rename is
  pending (the low 32 bits + 1) and a new generation (the high 32 + 1);
  the thread is marked (a map by tid).
- the exit of a marked thread's system call (prctl, the writes, io_uring,
  exec): the rename is done (low - 1) and a new generation (high + 1).
  Unmarked exits do nothing: the code's own prctl(PR_GET_NAME) exits there.
- `task:task_newtask`: a new generation. A new thread has its creator's
  name and may take a dead thread's tid (pid_max is 32768 here).

The code uses a verdict only while no rename is pending and the
generation is the one it read before asking. A rename whose exit is not
hooked (from an io_uring worker) stays pending: every hit asks the kernel
from then on, slower, never wrong. The programs count every process on
the machine: a rename anywhere costs each traced thread one prctl.

The word is a BPF array map (BPF_F_MMAPABLE) that each traced address
space maps read-only (kernelmaps.py). A fork child inherits the mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from uprobes.engines.trapfree.kernelmaps import attach_program, event_id, hand_over
from uprobes.errors import UprobesError
from uprobes.sys import bpf, ptrace

GENERATION = 1 << 32  # the word: generations in the high 32 bits, renames pending in the low
_RENAME_EXITS = ("prctl", "write", "pwrite64", "writev", "pwritev", "pwritev2",
                 "io_uring_enter", "execve", "execveat")
_MARKS = 4096  # threads renaming at once (a full map: the rename stays pending, safe)


def _tid_key(code: list[bytes]) -> None:
    """r0 = pid_tgid; the tid (its low half) stored at r10-4, the maps' key."""
    code += [bpf.call(bpf.HELPER_GET_CURRENT_PID_TGID), bpf.store_u32(10, -4, 0)]


def _bump(code: list[bytes], word: bpf.BpfMap, by: int) -> None:
    """Atomically add `by` to the word; exit, the event passed on (bpf.PASS)."""
    code += [bpf.load_map_value(1, word.fd, 0), bpf.load_imm64(2, by),
             bpf.atomic_add_u64(1, 0, 2), bpf.mov_imm(0, bpf.PASS), bpf.exit_()]


class RenameWatch:
    """The word, its BPF programs on their tracepoints, owned."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        try:
            self.word = bpf.BpfMap.shared_words(1)
            self._stack.callback(self.word.close)
            # Generation 1 from the start: no verdict is kept under 0, the
            # zero page's (kernelmaps.retire).
            assert self.word.memory is not None
            self.word.memory[:8] = GENERATION.to_bytes(8, "little")
            marks = bpf.BpfMap(bpf.BPF_MAP_TYPE_HASH, 4, 4, _MARKS)
            self._stack.callback(marks.close)
            renamed: list[bytes] = []
            _tid_key(renamed)
            renamed += [bpf.load_map_fd(1, marks.fd), bpf.mov_reg(2, 10), bpf.add_imm(2, -4),
                        bpf.mov_reg(3, 10), bpf.add_imm(3, -4), bpf.mov_imm(4, 0),
                        bpf.call(bpf.HELPER_MAP_UPDATE_ELEM)]
            _bump(renamed, self.word, GENERATION + 1)
            done: list[bytes] = []
            _tid_key(done)
            done += [bpf.load_map_fd(1, marks.fd), bpf.mov_reg(2, 10), bpf.add_imm(2, -4),
                     bpf.call(bpf.HELPER_MAP_DELETE_ELEM),
                     bpf.jump_if_not_zero(0, 5)]  # not marked: to the bump's exit
            _bump(done, self.word, GENERATION - 1)
            born: list[bytes] = []
            _bump(born, self.word, GENERATION)
            attach_program(self._stack, renamed, "comm_renamed", "task/task_rename")
            attach_program(self._stack, born, "comm_born", "task/task_newtask")
            exits = bpf.Program(bpf.BPF_PROG_TYPE_TRACEPOINT, done, "comm_done")
            self._stack.callback(exits.close)
            for name in _RENAME_EXITS:
                self._stack.enter_context(
                    exits.attach_to_tracepoint(event_id(f"syscalls/sys_exit_{name}")))
        except BaseException:
            self._stack.close()
            raise

    @classmethod
    def open(cls) -> RenameWatch | str:
        """The watch, or why the kernel will not run it."""
        try:
            return cls()
        except (UprobesError, OSError) as e:
            return str(e)

    def value(self) -> int:
        return self.word.word(0)

    def hand_over(self, tid: int, regs: ptrace.UserRegs, pid: int, syscall_addr: int,
                  scratch: int, write: Callable[[int, bytes], None],
                  read: Callable[[int, int], bytes], held: list[int]) -> int:
        """Map the word read-only in process `pid` (kernelmaps.hand_over):
        its address there; EngineError if it cannot be made."""
        return hand_over(self.word, "comm", tid, regs, pid, syscall_addr, scratch, write, read,
                         held)

    def close(self) -> None:
        self._stack.close()
