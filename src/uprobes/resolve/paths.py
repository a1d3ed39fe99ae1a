"""From what the user wrote as PATH to a file on disk.

PATH may be a path (absolute or relative), a library short name (`c`,
`libc`, `libc.so.6`, `pthread`) or a program on $PATH. With a pid, names are
looked up the way that process sees them: first among the files it maps
(`/proc/PID/maps`), then under its root (`/proc/PID/root`), so probes into
containers name the container's files, never the host's.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from uprobes.errors import ResolveError

ELF_MAGIC = b"\x7fELF"
# Where the dynamic linker looks when ld.so.cache has nothing: Debian's
# multiarch directories first, then the classic ones.
DEFAULT_LIB_DIRS = (
    "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
    "/lib", "/usr/lib", "/usr/local/lib",
)
_VERSIONED_SO = re.compile(r"\.so(\.\d+)+$")


@dataclass(frozen=True)
class FileRef:
    """A file as found: `path` opens it from here (host view, may go through
    `/proc/PID/root`), `display` is how the traced process names it."""

    path: str
    display: str
    dev: int
    ino: int


def file_ref(path: str, display: str | None = None) -> FileRef:
    """Stat `path` (following symlinks): it must be a readable regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ResolveError(f"{display or path}: no such file") from None
    except PermissionError:
        raise ResolveError(f"{display or path}: permission denied") from None
    except OSError as e:
        raise ResolveError(f"{display or path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ResolveError(f"{display or path}: is a directory, not an executable or library")
    if not stat.S_ISREG(st.st_mode):
        raise ResolveError(f"{display or path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ResolveError(f"{display or path}: permission denied")
    # Never realpath through /proc/PID/root: that magic link would lead back
    # to the host's file of the same name, not the container's.
    opened = os.path.abspath(path) if path.startswith("/proc/") else os.path.realpath(path)
    return FileRef(opened, display or os.path.abspath(path), st.st_dev, st.st_ino)


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def _lib_candidates(name: str) -> list[str]:
    """File names a short library name may stand for, best first."""
    if ".so" in name:
        return [name]
    base = name if name.startswith("lib") else "lib" + name
    return [base + ".so.*", base + ".so", base + "-*.so"]


def _lib_dirs(root: str) -> list[str]:
    dirs: list[str] = []
    for var in os.environ.get("LD_LIBRARY_PATH", "").split(":") if root == "/" else []:
        if var:
            dirs.append(var)
    for conf in sorted(glob.glob(os.path.join(root, "etc/ld.so.conf.d/*.conf"))):
        try:
            for line in Path(conf).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("/"):
                    dirs.append(line)
        except OSError:
            continue
    dirs.extend(DEFAULT_LIB_DIRS)
    return list(dict.fromkeys(dirs))


def _soname_rank(path: str) -> tuple[int, int, str]:
    base = os.path.basename(path)
    # libc.so.6 before libc.so (often a linker script), shorter versions first.
    return (0 if _VERSIONED_SO.search(base) else 1, len(base), base)


def find_library(name: str, root: str = "/") -> str | None:
    """The library `name` under `root`, as a path inside that root."""
    dirs = _lib_dirs(root)
    for pattern in _lib_candidates(name):
        for d in dirs:
            host_dir = os.path.join(root, d.lstrip("/"))
            hits = [h for h in glob.glob(os.path.join(host_dir, pattern)) if _is_elf(h)]
            if hits:
                best = min(hits, key=_soname_rank)
                return "/" + os.path.relpath(best, root) if root != "/" else best
    return None


def _mapped_match(name: str, mapped: list[str]) -> str | None:
    wanted = _lib_candidates(name)
    for path in mapped:
        base = os.path.basename(path)
        if base == name:
            return path
    for pattern in wanted:
        for path in mapped:
            if fnmatch.fnmatchcase(os.path.basename(path), pattern):
                return path
    return None


def find_file(spec_path: str, pid: int | None = None,
              mapped: list[str] | None = None) -> FileRef:
    """Resolve PATH as written in a probe to a file.

    `mapped` lists the files the process `pid` maps (as it names them); a
    short name matches those first, so `-p PID libc:malloc` probes the very
    libc that process runs.
    """
    root = f"/proc/{pid}/root" if pid is not None else "/"
    if not spec_path:
        raise ResolveError("empty path")
    if "/" in spec_path:
        if pid is not None and spec_path.startswith("/"):
            return file_ref(os.path.join(root, spec_path.lstrip("/")), spec_path)
        return file_ref(spec_path)
    if mapped:
        hit = _mapped_match(spec_path, mapped)
        if hit is not None:
            return file_ref(os.path.join(root, hit.lstrip("/")) if pid is not None else hit, hit)
    looks_like_lib = spec_path.startswith("lib") or ".so" in spec_path
    program = None if looks_like_lib else _which(spec_path, root)
    if program is not None:
        return program
    lib = find_library(spec_path, root)
    if lib is not None:
        host = os.path.join(root, lib.lstrip("/")) if root != "/" else lib
        return file_ref(host, lib)
    program = _which(spec_path, root) if looks_like_lib else None
    if program is not None:
        return program
    if os.path.exists(spec_path):
        return file_ref(spec_path)
    where = f" in process {pid}" if pid is not None else ""
    raise ResolveError(f"{spec_path}: no such library or program{where} "
                       f"(give a path, a library name like 'libc', or a program on PATH)")


def _which(name: str, root: str) -> FileRef | None:
    """A program on PATH that is ELF (skipping wrapper scripts such as pyenv shims)."""
    dirs = (os.environ.get("PATH", "").split(":") if root == "/" else
            ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    for d in dirs:
        if not d.startswith("/"):
            continue
        host = os.path.join(root, d.lstrip("/"), name)
        if os.path.isfile(host) and os.access(host, os.X_OK) and _is_elf(host):
            return file_ref(host, os.path.join(d, name))
    return None
