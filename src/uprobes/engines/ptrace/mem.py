"""Tracee memory for the engine: `uprobes.sys.procmem.ProcessMemory` once it
lands (the `fetch` helper owns it); until then the few reads and writes the
engine needs, over /proc/PID/mem, with the same names."""

from __future__ import annotations

import errno
import os

from uprobes.errors import UprobesError

try:
    from uprobes.sys.procmem import MemoryFault, ProcessMemory  # noqa: F401
except ImportError:  # interim, until sys/procmem.py is on main
    class MemoryFault(UprobesError):  # type: ignore[no-redef]
        """The address is not readable/writable in the process."""

    class ProcessMemory:  # type: ignore[no-redef]
        """/proc/PID/mem, opened once per process (O_RDWR)."""

        def __init__(self, pid: int) -> None:
            self.pid = pid
            try:
                self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise MemoryFault(f"cannot open the memory of process {pid}: "
                                  f"{e.strerror}") from None

        def read(self, runtime_addr: int, n: int) -> bytes:
            try:
                data = os.pread(self.fd, n, runtime_addr)
            except OSError as e:
                data = b"" if e.errno in (errno.EIO, errno.EFAULT) else None  # type: ignore[assignment]
                if data is None:
                    raise
            if len(data) != n:
                raise MemoryFault(f"cannot read {n} bytes at {runtime_addr:#x} in process {self.pid}")
            return data

        def read_upto(self, runtime_addr: int, n: int) -> bytes:
            try:
                return os.pread(self.fd, n, runtime_addr)
            except OSError:
                return b""

        def write(self, runtime_addr: int, data: bytes) -> None:
            try:
                done = os.pwrite(self.fd, data, runtime_addr)
            except OSError:
                done = -1
            if done != len(data):
                raise MemoryFault(f"cannot write {len(data)} bytes at {runtime_addr:#x} "
                                  f"in process {self.pid}")

        def close(self) -> None:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
