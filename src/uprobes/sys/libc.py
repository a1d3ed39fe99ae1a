"""The few raw libc calls uprobes makes, and the one place errno becomes an error.

Every system call the `sys` layers make goes through `syscall()` here, or
through an `os` call wrapped in `os_call()` / `kernel_errors()`, so an
`OSError` never leaves the public API: it becomes a `KernelError` whose
message says what failed and what to do about it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from uprobes.errors import KernelError

T = TypeVar("T")

# System call numbers per architecture (`platform.machine()`), from each
# arch's unistd table. Only the calls the kernel interfaces need.
SYSCALL_NUMBERS: Mapping[str, Mapping[str, int]] = {
    "x86_64": {"perf_event_open": 298, "pidfd_open": 434, "gettid": 186, "futex": 202,
               "bpf": 321, "kcmp": 312},
    "aarch64": {"perf_event_open": 241, "pidfd_open": 434, "gettid": 178, "futex": 98,
                "bpf": 280, "kcmp": 272},
    "riscv64": {"perf_event_open": 241, "pidfd_open": 434, "gettid": 178, "futex": 98,
                "bpf": 280, "kcmp": 272},
}

# ctypes declarations as a table: name -> (restype, argtypes). `syscall` is
# variadic, so its arguments are passed as explicit c_long values.
_DECLARATIONS: Mapping[str, tuple[Any, list[Any] | None]] = {
    "syscall": (ctypes.c_long, None),
    "ioctl": (ctypes.c_int, [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]),
    "mount": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                             ctypes.c_ulong, ctypes.c_void_p]),
}

# What to tell the user for an errno when the caller has nothing better.
GENERIC_HINTS: Mapping[int, str] = {
    _errno.EACCES: "permission denied: need root",
    _errno.EPERM: "operation not permitted: need root (CAP_SYS_ADMIN or CAP_PERFMON)",
    _errno.ENOENT: "not found",
    _errno.EBUSY: "in use",
    _errno.EMFILE: "too many open files: raise the limit with `ulimit -n`",
    _errno.ENFILE: "the system is out of file descriptors",
    _errno.ENOMEM: "out of memory",
    _errno.ENOSPC: "no space left (kernel limit reached)",
    _errno.ENODEV: "the kernel lacks this feature",
    _errno.ENOSYS: "the kernel lacks this system call",
    _errno.EOPNOTSUPP: "not supported by this kernel",
}


class _Libc:
    """libc loaded once with `use_errno`, functions declared from the table."""

    def __init__(self) -> None:
        try:  # glibc's soname: find_library() would run `ldconfig -p` on every start
            self._lib = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            self._lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        for name, (restype, argtypes) in _DECLARATIONS.items():
            fn = getattr(self._lib, name)
            fn.restype = restype
            if argtypes is not None:
                fn.argtypes = argtypes

    def function(self, name: str) -> Any:
        return getattr(self._lib, name)

    def bare_function(self, name: str, restype: Any) -> Any:
        """A function object of its own for `name`, with no argtypes: ctypes
        then passes a Python int as a C int, None as NULL and a byref() as a
        pointer, skipping the per-argument converters that argtypes install
        (as costly as the system call itself on the hit path). Only for
        calls whose integer arguments all fit a C int."""
        fn = self._lib._FuncPtr((name, self._lib))
        fn.restype = restype
        return fn


_libc: _Libc | None = None


def libc() -> _Libc:
    """The process-wide libc handle (loaded on first use)."""
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def syscall_number(name: str, machine: str | None = None) -> int:
    """The number of system call `name` on this (or the given) architecture."""
    machine = machine or platform.machine()
    try:
        return SYSCALL_NUMBERS[machine][name]
    except KeyError:
        raise KernelError(f"system call {name} is not known on {machine}: "
                          "uprobes supports " + ", ".join(SYSCALL_NUMBERS), _errno.ENOSYS) from None


def kernel_error(what: str, err: int, hints: Mapping[int, str] | None = None) -> KernelError:
    """`KernelError` for `what` failing with `err`, with the best hint we have."""
    hint = (hints or {}).get(err) or GENERIC_HINTS.get(err)
    name = _errno.errorcode.get(err, str(err))
    text = f"{what}: {os.strerror(err)} ({name})"
    if hint:
        text += f": {hint}"
    return KernelError(text, err)


def syscall(name: str, *args: int | ctypes.c_void_p | Any, what: str,
            hints: Mapping[int, str] | None = None) -> int:
    """Call system call `name`; raise `KernelError` (with `what`) on -1."""
    fn = libc().function("syscall")
    cargs = [a if not isinstance(a, int) else ctypes.c_long(a) for a in args]
    ctypes.set_errno(0)
    res = int(fn(ctypes.c_long(syscall_number(name)), *cargs))
    if res == -1:
        raise kernel_error(what, ctypes.get_errno(), hints)
    return res


def ioctl(fd: int, request: int, arg: int | None = None, *, what: str,
          hints: Mapping[int, str] | None = None) -> int:
    """ioctl(2) with an integer or pointer argument; `KernelError` on -1."""
    fn = libc().function("ioctl")
    ctypes.set_errno(0)
    res = int(fn(fd, request, arg))
    if res == -1:
        raise kernel_error(what, ctypes.get_errno(), hints)
    return res


def mount(source: str, target: str, fstype: str, *, what: str,
          hints: Mapping[int, str] | None = None) -> None:
    """mount(2) with no flags and no data; `KernelError` on failure."""
    fn = libc().function("mount")
    ctypes.set_errno(0)
    if fn(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        raise kernel_error(what, ctypes.get_errno(), hints)


@contextmanager
def kernel_errors(what: str, hints: Mapping[int, str] | None = None) -> Iterator[None]:
    """Turn any `OSError` raised inside the block into a `KernelError`."""
    try:
        yield
    except OSError as e:
        raise kernel_error(what, e.errno or _errno.EIO, hints) from e


def os_call(fn: Callable[..., T], *args: Any, what: str,
            hints: Mapping[int, str] | None = None) -> T:
    """Run `fn(*args)` (an `os`/`fcntl` call) with errno turned into `KernelError`."""
    with kernel_errors(what, hints):
        return fn(*args)
