"""From what the user wrote as PATH to a file on disk.

PATH may be a path (absolute or relative), a library short name (`c`,
`libc`, `libc.so.6`, `pthread`) or a program on $PATH. With a pid, names are
looked up the way that process sees them: first among the files it maps
(`/proc/PID/maps`), then under its root (`/proc/PID/root`), so probes into
containers name the container's files, never the host's.

A path under `/proc/PID/root` must never meet a symlink: the kernel (and
every open here) resolves an absolute symlink target from the walker's own
root, so `/proc/PID/root/lib/libc.so.6 -> /usr/lib/libc.so.6` leads to the
host's libc. `in_root()` follows the links inside the process's root first,
as openat2(RESOLVE_IN_ROOT) would, and the path handed on has none left.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from uprobes.elf.image import ElfImage
from uprobes.errors import ResolveError, UprobesError
from uprobes.sys import procfs

ELF_MAGIC = b"\x7fELF"
# Where the dynamic linker looks when ld.so.cache has nothing: Debian's
# multiarch directories first, then the classic ones.
DEFAULT_LIB_DIRS = (
    "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
    "/lib", "/usr/lib", "/usr/local/lib",
)
_VERSIONED_SO = re.compile(r"\.so(\.\d+)+$")
_MAX_LINKS = 40  # the kernel's MAXSYMLINKS


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


def in_root(root: str, path: str) -> str:
    """`path` as a process whose root directory is `root` resolves it, with
    no symlink left: every link is followed inside `root` (an absolute
    target starts again at `root`, `..` stops there). A missing component
    is kept as written; opening the result reports it."""
    todo = [c for c in path.split("/") if c][::-1]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        try:
            target = os.readlink(os.path.join(root, *done, part))
        except OSError:  # not a symlink, or not there
            done.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise ResolveError(f"{path}: too many levels of symbolic links")
        if target.startswith("/"):
            done = []
        todo.extend([c for c in target.split("/") if c][::-1])
    return "/" + "/".join(done)


def _in_process(pid: int, path: str) -> FileRef:
    """The file `path` names in process `pid` (a path in its root)."""
    root = f"/proc/{pid}/root"
    return file_ref(root + in_root(root, path), path)


def is_elf(path: str) -> bool:
    """Whether `path` is an ELF file (False for a script, or one unreadable)."""
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
            host_dir = d if root == "/" else root + in_root(root, d)
            hits = [h for h in glob.glob(os.path.join(host_dir, pattern)) if is_elf(h)]
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


def _chroot_name(pid: int, maps_name: str) -> str:
    """The name a process in a chroot gives a file that maps names from our
    root (maps prints paths as the reader sees them)."""
    try:
        proot = os.readlink(f"/proc/{pid}/root")
    except OSError:
        return maps_name
    if proot != "/" and maps_name.startswith(proot + "/"):
        return maps_name[len(proot):]
    return maps_name


def _usable_name(m: procfs.Mapping) -> bool:
    """maps names a file by a path that may still lead to it: not one
    unlinked since, nor one on a mount detached since (maps shows `/`)."""
    return m.path.startswith("/") and m.path != "/" and not m.deleted


def _soname_match(name: str, pid: int, maps: list[procfs.Mapping]) -> FileRef | None:
    """A mapped file whose name says nothing, matched by its DT_SONAME."""
    seen: set[tuple[int, int, int]] = set()
    for m in maps:
        ident = (m.dev_major, m.dev_minor, m.inode)
        if not m.inode or _usable_name(m) or ident in seen:
            continue
        seen.add(ident)
        found = procfs.mapped_file(pid, m)
        if found is None:
            continue
        try:
            soname = ElfImage.open(found.path).soname
        except UprobesError:
            continue
        if soname and _mapped_match(name, [soname]):
            return FileRef(found.path, soname, found.dev, found.ino)
    return None


def find_mapped(name: str, pid: int, maps: list[procfs.Mapping]) -> FileRef | None:
    """The file process `pid` maps that the short name `name` stands for
    (its very inode, as maps shows it), or None if it maps none by that name."""
    names = list(dict.fromkeys(m.path.removesuffix(" (deleted)") for m in maps
                               if m.inode and m.path.startswith("/") and m.path != "/"))
    hit = _mapped_match(name, names)
    if hit is None:
        return _soname_match(name, pid, maps)
    mine = [m for m in maps if m.path.removesuffix(" (deleted)") == hit]
    want = {(os.makedev(m.dev_major, m.dev_minor), m.inode) for m in mine}
    inner = _chroot_name(pid, hit)
    try:
        ref: FileRef | None = _in_process(pid, inner)
    except ResolveError:
        ref = None
    if ref is not None and (ref.dev, ref.ino) in want:
        return ref
    found = procfs.mapped_file(pid, mine[0])
    if found is not None:
        return FileRef(found.path, inner, found.dev, found.ino)
    raise ResolveError(f"{inner}: process {pid} maps it, but that name leads to another file "
                       f"from here and /proc/{pid}/map_files needs root; give the path as "
                       "the process sees it")


def _check_mapped(ref: FileRef, pid: int, maps: list[procfs.Mapping]) -> FileRef:
    """`ref`, unless process `pid` maps another file by its name (or its
    soname) instead: a library replaced, or remounted, since the process
    loaded it. Probes in the file the path leads to now would never fire."""
    if not maps or any((os.makedev(m.dev_major, m.dev_minor), m.inode) == (ref.dev, ref.ino)
                       for m in maps):
        return ref
    try:
        name = ElfImage.open(ref.path).soname or os.path.basename(ref.display)
    except UprobesError:
        return ref
    mapped = find_mapped(name, pid, maps)
    if mapped is None or (mapped.dev, mapped.ino) == (ref.dev, ref.ino):
        return ref
    raise ResolveError(f"{ref.display} in process {pid} is not the {name} it maps (that file "
                       f"was replaced or remounted since it was loaded); name it '{name}' to "
                       "probe the one it maps")


def find_file(spec_path: str, pid: int | None = None,
              maps: list[procfs.Mapping] | None = None) -> FileRef:
    """Resolve PATH as written in a probe to a file.

    `maps` are the mappings of process `pid`: a short name matches the files
    mapped there first, so `-p PID libc:malloc` probes the very libc that
    process runs.
    """
    root = f"/proc/{pid}/root" if pid is not None else "/"
    if not spec_path:
        raise ResolveError("empty path")
    if "/" in spec_path:
        if pid is not None and spec_path.startswith("/"):
            return _check_mapped(_in_process(pid, spec_path), pid, maps or [])
        return file_ref(spec_path)
    if pid is not None and maps:
        mapped = find_mapped(spec_path, pid, maps)
        if mapped is not None:
            return mapped
    looks_like_lib = spec_path.startswith("lib") or ".so" in spec_path
    program = None if looks_like_lib else _which(spec_path, pid)
    if program is not None:
        return program
    lib = find_library(spec_path, root)
    if lib is not None:
        return _in_process(pid, lib) if pid is not None else file_ref(lib)
    program = _which(spec_path, pid) if looks_like_lib else None
    if program is not None:
        return program
    if os.path.exists(spec_path):
        return file_ref(spec_path)
    where = f" in process {pid}" if pid is not None else ""
    raise ResolveError(f"{spec_path}: no such library or program{where} "
                       f"(give a path, a library name like 'libc', or a program on PATH)")


def _which(name: str, pid: int | None) -> FileRef | None:
    """A program on PATH that is ELF (skipping wrapper scripts such as pyenv shims)."""
    root = f"/proc/{pid}/root" if pid is not None else "/"
    dirs = (os.environ.get("PATH", "").split(":") if pid is None else
            ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    for d in dirs:
        if not d.startswith("/"):
            continue
        inner = os.path.join(d, name)
        host = root + in_root(root, inner) if pid is not None else inner
        if os.path.isfile(host) and os.access(host, os.X_OK) and is_elf(host):
            return file_ref(host, inner) if pid is not None else file_ref(host)
    return None
