"""bpf(2): a tracepoint program bumps a word that processes map (the
mechanism a cached `--comm` verdict would need, docs/filters.md)."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import need
from test_sys_support import no_fd_leak  # noqa: F401

from uprobes.errors import KernelError
from uprobes.sys import bpf
from uprobes.sys.libc import libc

pytestmark = pytest.mark.root
PR_SET_NAME, PR_GET_NAME = 15, 16


def _event_id(name: str) -> int:
    return int(Path(f"/sys/kernel/tracing/events/{name}/id").read_text())


def _rename_counter(tgids: bpf.BpfMap, words: bpf.BpfMap) -> bpf.Program:
    """Adds one to word 0 at each `task:task_rename` of a process in `tgids`."""
    return bpf.Program(bpf.BPF_PROG_TYPE_TRACEPOINT, [
        bpf.call(bpf.HELPER_GET_CURRENT_PID_TGID),
        bpf.rsh_imm(0, 32),
        bpf.store_u32(10, -4, 0),                   # the tgid, the lookup's key
        bpf.load_map_fd(1, tgids.fd),
        bpf.mov_reg(2, 10),
        bpf.add_imm(2, -4),
        bpf.call(bpf.HELPER_MAP_LOOKUP_ELEM),
        bpf.jump_if_zero(0, 4),                     # not a process of ours
        bpf.load_map_value(1, words.fd, 0),
        bpf.mov_imm(2, 1),
        bpf.atomic_add_u64(1, 0, 2),
        bpf.mov_imm(0, 0),
        bpf.exit_(),
    ], "renames")


@pytest.fixture
def counted() -> Iterator[tuple[bpf.BpfMap, bpf.BpfMap]]:
    need(os.geteuid() == 0, "BPF programs need root")
    with ExitStack() as stack:
        tgids = bpf.BpfMap(bpf.BPF_MAP_TYPE_HASH, 4, 4, 64)
        stack.callback(tgids.close)
        words = bpf.BpfMap.shared_words(2)
        stack.callback(words.close)
        program = _rename_counter(tgids, words)
        stack.callback(program.close)
        stack.enter_context(program.attach_to_tracepoint(_event_id("task/task_rename")))
        yield tgids, words


def test_a_rename_moves_the_word_in_a_fork_child_that_maps_it(
        counted: tuple[bpf.BpfMap, bpf.BpfMap]) -> None:
    tgids, words = counted
    go_r, go_w = os.pipe()
    seen_r, seen_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: renames itself by prctl and by /proc, reads its inherited mapping
        os.read(go_r, 1)
        seen = [words.word(0)]
        libc().function("prctl")(PR_SET_NAME, b"bpf-renamed", 0, 0, 0)
        seen.append(words.word(0))
        Path(f"/proc/self/task/{os.getpid()}/comm").write_text("bpf-proc")
        seen.append(words.word(0))
        name = ctypes.create_string_buffer(16)
        libc().function("prctl")(PR_GET_NAME, name, 0, 0, 0)   # a read: no bump
        seen.append(words.word(0))
        os.write(seen_w, struct.pack("<4Q", *seen))
        os._exit(0)
    os.close(go_r)
    os.close(seen_w)
    try:
        tgids.update(struct.pack("<I", pid), struct.pack("<I", 1))
        os.write(go_w, b"x")
        seen = struct.unpack("<4Q", os.read(seen_r, 32))
    finally:
        os.close(go_w)
        os.close(seen_r)
        os.waitpid(pid, 0)
    # The word moves in the renaming system call, before it returns, and
    # only for the process in the map (other renames on the machine do not count).
    assert seen == (0, 1, 2, 2)
    assert words.word(0) == 2
    assert tgids.delete(struct.pack("<I", pid)) and not tgids.delete(struct.pack("<I", pid))


def test_a_refused_program_names_the_verifiers_complaint() -> None:
    need(os.geteuid() == 0, "BPF programs need root")
    with pytest.raises(KernelError, match="the verifier says: R2 !read_ok"):
        bpf.Program(bpf.BPF_PROG_TYPE_TRACEPOINT, [bpf.mov_reg(0, 2), bpf.exit_()], "bad")


def test_the_kernel_words_programs_hide_no_event_from_perf() -> None:
    """A tracepoint program's result decides whether perf gets the hit, for
    every perf event of that tracepoint (0: none). The programs that move
    `--comm`'s rename word and the seccomp word (trapfree/renames.py,
    sandboxes.py) pass every hit on: another tool counting these
    tracepoints for a process, while uprobes runs, counts its renames,
    prctl calls and forks (all were 0 when they returned 0)."""
    need(os.geteuid() == 0, "BPF programs need root")
    from uprobes.engines.trapfree.renames import RenameWatch
    from uprobes.engines.trapfree.sandboxes import SeccompWatch
    from uprobes.sys import perf
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # renames itself by prctl, then forks a child that ends at once
        os.read(go_r, 1)
        libc().function("prctl")(PR_SET_NAME, b"bpf-counted", 0, 0, 0)
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        os._exit(0)
    os.close(go_r)
    watches = [RenameWatch(), SeccompWatch()]
    events = ("task/task_rename", "task/task_newtask", "syscalls/sys_enter_prctl",
              "syscalls/sys_exit_prctl")
    try:
        with ExitStack() as stack:
            counters = [stack.enter_context(perf.open_counting(_event_id(e), pid=pid))
                        for e in events]
            for c in counters:
                c.enable()
            os.write(go_w, b"g")
            assert os.waitpid(pid, 0)[1] == 0
            assert {e: c.read_count() >= 1 for e, c in zip(events, counters)} == \
                dict.fromkeys(events, True)
    finally:
        os.close(go_w)
        for w in watches:
            w.close()
