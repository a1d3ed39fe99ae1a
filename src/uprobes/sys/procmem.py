"""Another process's memory through /proc/PID/mem: one O_RDWR fd per process.

pread/pwrite on /proc/PID/mem go through the kernel's access_remote_vm()
with FOLL_FORCE, which is what a debugger needs: writes to read-only text
succeed and are private to the process (the page is copied on write, the
file on disk never changes), so an int3 can be placed without mprotect.
Reads are one system call each and need no stopped tracee.

Two kernel facts shape the API:
- the kernel copies page by page and returns what it copied before the
  first page it could not reach (EIO when that is the very first page), so
  `read_upto` gets a string that ends just before an unmapped page for free;
- FOLL_FORCE also reads PROT_NONE pages (thread-stack guards, reserved
  regions), which the kernel's own uprobe fetch (copy_from_user in the task)
  would fault on. Callers that must fault there have to consult the maps.
"""

from __future__ import annotations

import errno
import os
from types import TracebackType

from uprobes.errors import ProcessError, UprobesError

_ADDR_LIMIT = 1 << 63
"""/proc/PID/mem offsets are a signed off_t for pread; no user address is this high
(x86-64 user space ends at 2^47, or 2^56 with 5-level paging)."""

_FAULT_ERRNOS = frozenset((errno.EIO, errno.EFAULT, errno.EINVAL))
"""EIO: nothing readable at the address; EFAULT: the copy faulted; EINVAL: an
offset the file refuses (negative after the off_t conversion)."""


class MemoryFault(UprobesError):
    """The address is not readable (or writable) in the process."""

    def __init__(self, message: str, runtime_addr: int) -> None:
        super().__init__(message)
        self.runtime_addr = runtime_addr


class ProcessMemory:
    """/proc/PID/mem, opened once (O_RDWR) and closed by `close()` or `with`.

    Every address is a run-time address in the process. The process may be
    running; for consistent values of a running thread, stop it first.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd: int | None = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProcessError(f"no process with pid {pid}") from None
        except PermissionError:
            raise ProcessError(f"may not access the memory of pid {pid}: need root or the "
                               "same user with ptrace allowed (kernel.yama.ptrace_scope)"
                               ) from None
        except OSError as e:
            raise ProcessError(f"cannot open /proc/{pid}/mem: {e.strerror}") from None

    # ------------------------------------------------------------ reading

    def read(self, runtime_addr: int, n: int) -> bytes:
        """Exactly `n` bytes at `runtime_addr`, or MemoryFault."""
        data = self.read_upto(runtime_addr, n)
        if len(data) != n:
            raise MemoryFault(f"pid {self.pid}: cannot read {n} bytes at {runtime_addr:#x} "
                              f"(only {len(data)} readable)", runtime_addr + len(data))
        return data

    def read_upto(self, runtime_addr: int, n: int) -> bytes:
        """What is readable of `n` bytes at `runtime_addr`: a prefix, maybe b""."""
        if n <= 0 or not 0 <= runtime_addr < _ADDR_LIMIT:
            return b""
        n = min(n, _ADDR_LIMIT - runtime_addr)
        try:
            return os.pread(self._live_fd(), n, runtime_addr)
        except OSError as e:
            if e.errno in _FAULT_ERRNOS:
                return b""
            raise self._error("read", runtime_addr, e) from None

    def read_cstring(self, runtime_addr: int, limit: int) -> bytes | None:
        """The NUL-terminated string at `runtime_addr`, without its NUL.

        None when no NUL is readable within `limit` bytes (a fault before
        the NUL, or a string of `limit` bytes or more), as the kernel's
        strnlen_user() reports both as unusable. Reads grow from 256 bytes,
        so a short string near the end of a mapping costs one call."""
        chunk, got = 256, b""
        while len(got) < limit:
            want = min(chunk, limit - len(got))
            part = self.read_upto(runtime_addr + len(got), want)
            nul = part.find(b"\0")
            if nul >= 0:
                return got + part[:nul]
            got += part
            if len(part) < want:
                return None
            chunk *= 4
        return None

    # ------------------------------------------------------------ writing

    def write(self, runtime_addr: int, data: bytes) -> None:
        """Write all of `data` at `runtime_addr` (read-only text too), or MemoryFault."""
        if not data:
            return
        if not 0 <= runtime_addr <= _ADDR_LIMIT - len(data):
            raise MemoryFault(f"pid {self.pid}: no user address {runtime_addr:#x}", runtime_addr)
        try:
            done = os.pwrite(self._live_fd(), data, runtime_addr)
        except OSError as e:
            if e.errno in _FAULT_ERRNOS:
                done = 0
            else:
                raise self._error("write", runtime_addr, e) from None
        if done != len(data):
            raise MemoryFault(f"pid {self.pid}: cannot write {len(data)} bytes at "
                              f"{runtime_addr:#x} (wrote {done})", runtime_addr + done)

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _live_fd(self) -> int:
        if self._fd is None:
            raise ProcessError(f"memory of pid {self.pid} is closed")
        return self._fd

    def _error(self, what: str, runtime_addr: int, e: OSError) -> ProcessError:
        if e.errno == errno.ESRCH:
            return ProcessError(f"pid {self.pid} has exited")
        return ProcessError(f"pid {self.pid}: cannot {what} memory at {runtime_addr:#x}: "
                            f"{e.strerror}")
