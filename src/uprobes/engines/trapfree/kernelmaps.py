"""A BPF map's words, mapped read-only into a traced process, and taken out
again; the tracepoint programs that move them.

The words BPF programs move in the kernel (renames.py's rename word,
sandboxes.py's seccomp word) are read by the code we place in a program,
with no system call: the map (made with BPF_F_MMAPABLE) is mapped there.
A map's fd cannot be opened through /proc/TRACER/fd/N (ENXIO), so it is
handed over through a unix socket (SCM_RIGHTS): injected `socket`,
`connect` and `recvmsg`, then `mmap` (read-only: the program cannot move
the words) and `close`. While we run, the program has one mapping
(`anon_inode:bpf-map`) and no fd. At detach `retire` puts a page of zeros
in its place (an injected mmap with MAP_FIXED): the map is no longer held
by the program (each run's would be, for as long as it lives), and a thread
still inside our code (a trampoline stays: it may be running it) reads 0,
which the words' readers take as "ask the kernel" (the rename word: no
kept verdict has generation 0) or "make no call" (the seccomp word). A fork
child inherits the mapping; after an exec the new image gets its own.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from uprobes.engines.tracee.xol import remote_syscall
from uprobes.errors import EngineError
from uprobes.sys import bpf, ptrace

_NR_SOCKET, _NR_CONNECT, _NR_RECVMSG, _NR_MMAP, _NR_CLOSE, _NR_MUNMAP = 41, 42, 47, 9, 3, 11
_MSG_CMSG_CLOEXEC = 0x40000000
_PROT_READ, _MAP_SHARED, _MAP_PRIVATE_ANON_FIXED = 1, 1, 0x02 | 0x20 | 0x10
Call = Callable[[int, tuple[int, ...]], int]  # an injected system call: (nr, args) -> result
SCRATCH_BYTES = 384  # the tracee memory `hand_over` writes its messages into


def attach_program(stack: ExitStack, code: list[bytes], name: str, event: str) -> None:
    """Load tracepoint program `code` as `name` and run it at every hit of
    tracepoint `event` (`group/event`) until `stack` closes."""
    program = bpf.Program(bpf.BPF_PROG_TYPE_TRACEPOINT, code, name)
    stack.callback(program.close)
    stack.enter_context(program.attach_to_tracepoint(event_id(event)))


def event_id(name: str) -> int:
    return int(Path(f"/sys/kernel/tracing/events/{name}/id").read_text())


def size(words: bpf.BpfMap) -> int:
    """The bytes a process maps of `words`."""
    return len(words.memory or b"")


def hand_over(words: bpf.BpfMap, tag: str, tid: int, regs: ptrace.UserRegs, pid: int,
              syscall_addr: int, scratch: int, write: Callable[[int, bytes], None],
              read: Callable[[int, int], bytes], held: list[int]) -> int:
    """Map `words` read-only in process `pid` (through its stopped thread
    `tid`); `scratch`: SCRATCH_BYTES of its memory we may write
    (`write`/`read`: its memory at an address); `tag` names the socket.
    Its address there; EngineError if it cannot be made."""
    def call(nr: int, *args: int) -> int:
        return remote_syscall(tid, regs, syscall_addr, nr, args, held)
    name = f"\0uprobes-{tag}-{os.urandom(8).hex()}".encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as lsn:
        lsn.bind(name)
        lsn.listen(1)
        lsn.settimeout(5.0)  # connect was queued before accept: it never waits
        there = call(_NR_SOCKET, socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC, 0)
        if there < 0:
            raise EngineError(f"process {pid}: socket failed (errno {-there})")
        try:
            sockaddr = struct.pack("<H", socket.AF_UNIX) + name
            write(scratch, sockaddr)
            got = call(_NR_CONNECT, there, scratch, len(sockaddr))
            if got < 0:
                raise EngineError(f"process {pid}: connect failed (errno {-got})")
            conn, _ = lsn.accept()
            with conn:
                conn.sendmsg([b"w"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [words.fd]))])
            iov, data, cmsg, msg = scratch + 128, scratch + 144, scratch + 160, scratch + 224
            write(iov, struct.pack("<QQ", data, 1))
            write(cmsg, bytes(64))
            write(msg, struct.pack("<QI4xQQQQi4x", 0, 0, iov, 1, cmsg, 64, 0))
            got = call(_NR_RECVMSG, there, msg, _MSG_CMSG_CLOEXEC)
            length, level, kind, fd = struct.unpack("<QiiI", read(cmsg, 20))
            if got != 1 or (level, kind) != (socket.SOL_SOCKET, socket.SCM_RIGHTS) \
                    or length != 20:
                raise EngineError(f"process {pid}: the word's file did not arrive "
                                  f"(recvmsg {got})")
            try:
                at = call(_NR_MMAP, 0, size(words), _PROT_READ, _MAP_SHARED, fd, 0)
            finally:
                call(_NR_CLOSE, fd)
            if at < 0 and at > -4096:
                raise EngineError(f"process {pid}: mmap of the word failed (errno {-at})")
            return at & ((1 << 64) - 1)
        finally:
            call(_NR_CLOSE, there)


def retire(call: Call, runtime_addr: int, words: bpf.BpfMap) -> bool:
    """`words`' mapping at `runtime_addr` in a stopped process (`call`
    runs its system calls) replaced by a read-only page of zeros: whether
    it was."""
    return call(_NR_MMAP, (runtime_addr, size(words), _PROT_READ, _MAP_PRIVATE_ANON_FIXED,
                           -1, 0)) & ((1 << 64) - 1) == runtime_addr
