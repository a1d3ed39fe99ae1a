"""The kernel's process events: the netlink process connector (cn_proc).

A socket of the NETLINK_CONNECTOR family, joined to the CN_IDX_PROC group
and switched on with PROC_CN_MCAST_LISTEN, receives a message for each
fork, exec, exit (and a few more) on the machine as it happens, with no
polling of /proc (include/uapi/linux/cn_proc.h, drivers/connector/cn_proc.c).
Needs CAP_NET_ADMIN, in the initial user and network namespaces. Events
are not queued without bound: when the socket's buffer is full the kernel
drops them and the next receive fails with ENOBUFS, which `read` reports
as `overrun`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from uprobes.errors import KernelError
from uprobes.sys.libc import kernel_error

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3

FORK = 0x00000001
EXEC = 0x00000002
EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")      # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")       # cb_id.idx, cb_id.val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")           # what, cpu, timestamp_ns
_PIDS = struct.Struct("=ii")             # exec and exit: process_pid, process_tgid
_FORK = struct.Struct("=iiii")           # parent_pid, parent_tgid, child_pid, child_tgid
_HEADERS = _NLMSGHDR.size + _CN_MSG.size


@dataclass(frozen=True)
class ProcEvent:
    """One event: `what` (FORK, EXEC, EXIT), the thread and its process (for
    FORK: the new one)."""

    what: int
    tid: int
    pid: int


class ProcEvents:
    """A subscription to the process events, while entered; `fileno()` for poll."""

    def __init__(self, buffer_bytes: int = 1 << 20) -> None:
        self.buffer_bytes = buffer_bytes
        self._sock: socket.socket | None = None
        self.overruns = 0
        """Receives that found events dropped (the buffer was full)."""

    def __enter__(self) -> ProcEvents:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as e:
            raise kernel_error("the process connector (netlink)", e.errno or errno.EIO) from e
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.buffer_bytes)
            sock.bind((0, CN_IDX_PROC))
            self._send(sock, PROC_CN_MCAST_LISTEN)
        except OSError as e:
            sock.close()
            raise kernel_error("listening to the process connector", e.errno or errno.EIO,
                               {errno.EPERM: "it needs CAP_NET_ADMIN in the initial "
                                             "namespaces"}) from e
        self._sock = sock
        return self

    @staticmethod
    def _send(sock: socket.socket, op: int) -> None:
        body = struct.pack("=I", op)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0)
        hdr = _NLMSGHDR.pack(_HEADERS + len(body), NLMSG_DONE, 0, 0, os.getpid())
        sock.sendto(hdr + cn + body, (0, 0))

    def fileno(self) -> int:
        assert self._sock is not None, "enter it first"
        return self._sock.fileno()

    def read(self) -> list[ProcEvent]:
        """The events waiting now (none if none: the socket never blocks here)."""
        sock = self._sock
        assert sock is not None, "enter it first"
        events: list[ProcEvent] = []
        while True:
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise KernelError(f"reading process events: {e.strerror}", e.errno) from e
            events.extend(_decode(data))

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            try:
                self._send(self._sock, PROC_CN_MCAST_IGNORE)
            except OSError:
                pass  # closing the socket ends the subscription all the same
            self._sock.close()
            self._sock = None


def _decode(data: bytes) -> list[ProcEvent]:
    """The fork, exec and exit events in one datagram (netlink messages end to end)."""
    out = []
    at = 0
    while at + _HEADERS + _EVENT.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, at)[0]
        if length < _HEADERS + _EVENT.size:
            break
        what = _EVENT.unpack_from(data, at + _HEADERS)[0]
        body = at + _HEADERS + _EVENT.size
        if what in (EXEC, EXIT) and body + _PIDS.size <= len(data):
            tid, pid = _PIDS.unpack_from(data, body)
            out.append(ProcEvent(what, tid, pid))
        elif what == FORK and body + _FORK.size <= len(data):
            _, _, tid, pid = _FORK.unpack_from(data, body)
            out.append(ProcEvent(what, tid, pid))
        at += (length + 3) & ~3
    return out
