"""/proc/PID: memory maps, status, threads, root and auxv, as typed data.

Address spaces are named: a uprobe is placed at a `file_offset`, a hit
happens at a `runtime_addr`; `Mapping` converts between them with the
kernel's formula (vaddr = vm_start + file_offset - vm_pgoff, as in
kernel/events/uprobes.c offset_to_vaddr()).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from uprobes.errors import KernelError, ProcessError
from uprobes.sys.libc import syscall

AT_NULL = 0
AT_SYSINFO_EHDR = 33


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps. `file_offset` is the kernel's vm_pgoff in bytes."""

    start: int
    end: int
    perms: str
    file_offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    @property
    def deleted(self) -> bool:
        """The file was unlinked (or replaced) after it was mapped."""
        return self.path.endswith(" (deleted)")

    def contains_runtime(self, runtime_addr: int) -> bool:
        return self.start <= runtime_addr < self.end

    def contains_file_offset(self, file_offset: int) -> bool:
        return self.file_offset <= file_offset < self.file_offset + (self.end - self.start)

    def runtime_to_file_offset(self, runtime_addr: int) -> int:
        """File offset of the byte mapped at `runtime_addr`."""
        if not self.contains_runtime(runtime_addr):
            raise ProcessError(f"{runtime_addr:#x} is outside {self.start:#x}-{self.end:#x}")
        return runtime_addr - self.start + self.file_offset

    def file_to_runtime_addr(self, file_offset: int) -> int:
        """Run-time address of file offset `file_offset` in this mapping."""
        if not self.contains_file_offset(file_offset):
            raise ProcessError(f"file offset {file_offset:#x} is not mapped by "
                               f"{self.start:#x}-{self.end:#x} ({self.path})")
        return self.start + file_offset - self.file_offset


@dataclass(frozen=True)
class Status:
    """The fields of /proc/PID/status uprobes needs."""

    name: str
    tgid: int
    pid: int
    ppid: int
    uid: int
    state: str
    seccomp: int = 0  # 0 none, 1 strict, 2 filters


def _proc_error(pid: int, what: str, e: OSError) -> ProcessError:
    if e.errno in (errno.ENOENT, errno.ESRCH):
        return ProcessError(f"no process with pid {pid}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return ProcessError(f"cannot read /proc/{pid}/{what}: permission denied "
                            "(need root or the same user, and ptrace access)")
    return ProcessError(f"cannot read /proc/{pid}/{what}: {os.strerror(e.errno or 0)}")


def _read(pid: int, what: str, binary: bool = False) -> str | bytes:
    path = Path(f"/proc/{pid}/{what}")
    try:
        return path.read_bytes() if binary else path.read_text(errors="surrogateescape")
    except OSError as e:
        raise _proc_error(pid, what, e) from e


def exists(pid: int) -> bool:
    """Whether a process (or thread) `pid` exists (zombies included)."""
    return Path(f"/proc/{pid}").exists()


def state(pid: int) -> str | None:
    """The state letter of task `pid` (a thread id too): R, S, D, T (stopped),
    t (in a ptrace stop), Z (zombie), X (dead); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        return text[text.rindex(b")") + 2:][:1].decode() or None
    except (OSError, ValueError):
        return None


def check_live(pid: int) -> None:
    """ProcessError unless `pid` is a process that still runs: a zombie has
    exited (no maps, no memory) and only waits for its parent to collect it."""
    st = state(pid)
    if st is None:
        raise ProcessError(f"no process with pid {pid}")
    if st in ("Z", "X") and len(tids(pid)) <= 1:  # (a leader's pthread_exit leaves its threads)
        raise ProcessError(f"process {pid} has exited (a zombie: its parent has not "
                           "collected it yet); there is nothing left to probe")


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of a maps file (pure)."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        major, minor = parts[3].split(":")
        out.append(Mapping(start=int(lo, 16), end=int(hi, 16), perms=parts[1],
                           file_offset=int(parts[2], 16), dev_major=int(major, 16),
                           dev_minor=int(minor, 16), inode=int(parts[4]),
                           path=parts[5].strip() if len(parts) > 5 else ""))
    return out


def maps(pid: int) -> list[Mapping]:
    """The memory mappings of process `pid`."""
    text = _read(pid, "maps")
    assert isinstance(text, str)
    return parse_maps(text)


@dataclass(frozen=True)
class MappedFile:
    """The file behind a mapping: `path` opens that very file from here."""

    path: str
    dev: int
    ino: int


def mapped_file(pid: int, m: Mapping) -> MappedFile | None:
    """The file mapping `m` of process `pid` maps, or None if we cannot reach it.

    /proc/PID/map_files leads to the very file whatever its name, but the
    kernel lets only CAP_SYS_ADMIN follow it (proc_map_files_get_link).
    Without it, the name maps gives (a path from our root) or the same name
    under the process's root will do, if it still leads to the inode maps
    shows: a file replaced or renamed since, or one we cannot see, is None.
    """
    link = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
    try:
        st = os.stat(link)
        return MappedFile(link, st.st_dev, st.st_ino)
    except OSError:
        pass
    if not m.path.startswith("/") or m.deleted:
        return None
    want = (os.makedev(m.dev_major, m.dev_minor), m.inode)
    for cand in (m.path, f"/proc/{pid}/root{m.path}"):
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == want:
            return MappedFile(cand, st.st_dev, st.st_ino)
    return None


def mapping_for_runtime_addr(pid: int, runtime_addr: int) -> Mapping | None:
    """The mapping of `pid` that holds `runtime_addr`, if any."""
    return next((m for m in maps(pid) if m.contains_runtime(runtime_addr)), None)


def status(pid: int) -> Status:
    """Name, tgid, pid, ppid, real uid and state of `pid`."""
    text = _read(pid, "status")
    assert isinstance(text, str)
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    try:
        return Status(name=fields["Name"], tgid=int(fields["Tgid"]), pid=int(fields["Pid"]),
                      ppid=int(fields["PPid"]), uid=int(fields["Uid"].split()[0]),
                      state=fields.get("State", "?").split()[0],
                      seccomp=int(fields.get("Seccomp", "0")))
    except (KeyError, ValueError, IndexError):
        raise ProcessError(f"cannot parse /proc/{pid}/status") from None


def thread_pending(tid: int) -> int:
    """The signals queued to thread `tid` alone (SigPnd of its status: what
    an exception such as an int3 or a single step sends), as a mask with bit
    N-1 for signal N; 0 when it cannot be read (the thread is gone)."""
    value = _status_field(tid, "SigPnd")
    try:
        return int(value, 16) if value else 0
    except ValueError:
        return 0


def _status_field(pid: int, key: str) -> str | None:
    """One field of /proc/PID/status, stripped; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", errors="surrogateescape") as f:  # Name: bytes
            for line in f:
                if line.startswith(key + ":"):
                    return line[len(key) + 1:].strip()
    except OSError:
        pass
    return None


def ns_pid(pid: int) -> int:
    """`pid` as its own (innermost) pid namespace numbers it: the last
    NSpid of /proc/PID/status; `pid` itself if that cannot be read."""
    value = _status_field(pid, "NSpid")
    try:
        return int(value.split()[-1]) if value else pid
    except ValueError:
        return pid


def ns_depth(pid: int) -> int:
    """How many pid namespaces deep process `pid` is (1: the initial one):
    the count of NSpid in /proc/PID/status; 0 if that cannot be read."""
    value = _status_field(pid, "NSpid")
    return len(value.split()) if value else 0


def comm(pid: int) -> str:
    """The task's comm (at most 15 bytes, what the kernel prints in traces)."""
    text = _read(pid, "comm")
    assert isinstance(text, str)
    return text.rstrip("\n")


def tids(pid: int) -> list[int]:
    """The thread ids of process `pid`, sorted."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as e:
        raise _proc_error(pid, "task", e) from e


KCMP_VM = 1  # kcmp(2): do two processes share one address space (mm)?


def mm_sharers(pid: int) -> list[int]:
    """The other processes (thread groups) that share `pid`'s address space:
    children of clone(CLONE_VM) without CLONE_THREAD, or a vfork child not
    yet exec'd. Compared by kcmp(2) KCMP_VM; a process that ends or may not
    be compared meanwhile is left out."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (pid, os.getpid()):
            continue
        try:
            if syscall("kcmp", pid, int(name), KCMP_VM, 0, 0, what="kcmp") == 0:
                found.append(int(name))
        except KernelError as e:
            if e.errno == errno.ENOSYS:
                return []  # (a kernel without kcmp: CONFIG_KCMP off)
    return sorted(found)


def root(pid: int) -> Path:
    """The process's root directory (paths inside its mount namespace start here)."""
    try:
        os.stat(f"/proc/{pid}/root")
    except OSError as e:
        raise _proc_error(pid, "root", e) from e
    return Path(f"/proc/{pid}/root")


def exe(pid: int) -> str:
    """The target of /proc/PID/exe."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError as e:
        raise _proc_error(pid, "exe", e) from e


def auxv(pid: int) -> dict[int, int]:
    """The auxiliary vector of `pid` (native word size), by AT_* key."""
    data = _read(pid, "auxv", binary=True)
    assert isinstance(data, bytes)
    out: dict[int, int] = {}
    for key, value in _pairs(data):
        if key == AT_NULL:
            break
        out[key] = value
    return out


def _pairs(data: bytes) -> Iterator[tuple[int, int]]:
    size = struct.calcsize("@QQ")
    for i in range(0, len(data) - size + 1, size):
        yield struct.unpack_from("@QQ", data, i)


def vdso_base(pid: int) -> int | None:
    """Run-time address of the vDSO's ELF header (AT_SYSINFO_EHDR), if mapped."""
    return auxv(pid).get(AT_SYSINFO_EHDR)
