"""Symbols kept outside the file's own tables: MiniDebugInfo and separate debug files.

Both are optional extras, so a broken one is reported as a note and skipped,
never an error for the file we were asked about.

Search order for a separate debug file, as gdb documents it ("Separate Debug
Files"): by build-id, `<debug_dir>/.build-id/ab/cdef....debug` (the build-id
must match); then by `.gnu_debuglink` name, in the file's own directory, its
`.debug/` subdirectory and `<debug_dir>/<the file's directory>/` (the CRC32 of
the candidate must match the one in the link).
"""

from __future__ import annotations

import mmap
import os
import stat
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from uprobes.elf._guard import guard
from uprobes.elf.image import ElfImage, build_id_of
from uprobes.elf.raw import Buffer, RawElf
from uprobes.elf.symread import Source, Symbol, read_symbols, symbol_sections
from uprobes.errors import ElfError, UprobesError

DEFAULT_DEBUG_DIRS: tuple[str, ...] = ("/usr/lib/debug",)
# A MiniDebugInfo payload is a few hundred KiB even for large programs; the cap
# keeps a crafted .gnu_debugdata from inflating into gigabytes (an xz bomb).
MAX_MINIDEBUGINFO = 256 << 20


@contextmanager
def _mapped_regular(path: str) -> Iterator[Buffer | None]:
    """The bytes of the regular file at `path`, mapped for the block (None if unusable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            buf: Buffer | None = None
        else:
            buf = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        buf = None
    finally:
        os.close(fd)
    try:
        yield buf
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _symtab_symbols(elf: RawElf, source: Source) -> list[Symbol]:
    ident = bytes(elf.buf[:6])
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or elf.e_machine != 62:
        raise ElfError(f"{elf.name}: not an x86-64 ELF64 file")
    sec = symbol_sections(elf).get("symtab")
    return read_symbols(elf, sec, source) if sec is not None else []


def _candidates(image: ElfImage, debug_dirs: Iterable[str]) -> list[tuple[str, str]]:
    """(path, how-to-verify) pairs, best first; verify is 'build-id' or 'crc'."""
    dirs = list(debug_dirs)
    out: list[tuple[str, str]] = []
    if image.build_id and len(image.build_id) > 2:
        bid = image.build_id
        out += [(os.path.join(d, ".build-id", bid[:2], bid[2:] + ".debug"), "build-id")
                for d in dirs]
    if image.debuglink is not None and image.identity is not None:
        link = image.debuglink[0]
        own_dir = os.path.dirname(os.path.realpath(image.path))
        out += [(os.path.join(own_dir, link), "crc"),
                (os.path.join(own_dir, ".debug", link), "crc")]
        out += [(os.path.join(d, own_dir.lstrip("/"), link), "crc") for d in dirs]
    return out


def debug_file_path(image: ElfImage, debug_dirs: Iterable[str] = DEFAULT_DEBUG_DIRS,
                    notes: list[str] | None = None) -> str | None:
    """The separate debug file for `image` (its build-id or CRC checked), or None.

    Candidates that exist but do not match (wrong build-id or CRC, malformed)
    are skipped with a line appended to `notes`.
    """
    notes = notes if notes is not None else []
    try:
        own = os.path.realpath(image.path) if image.identity is not None else None
    except OSError:  # under /proc/PID/root of a process that has just exited
        own = image.path
    for path, verify in _candidates(image, debug_dirs):
        if own is not None and os.path.realpath(path) == own:
            continue
        with _mapped_regular(path) as buf:
            if buf is None:
                continue
            try:
                with guard(path):
                    elf = RawElf(buf, path)
                    if verify == "build-id" and build_id_of(elf) != image.build_id:
                        notes.append(f"{path}: ignored, its build-id does not match {image.path}")
                        continue
                    if (verify == "crc" and image.debuglink
                            and zlib.crc32(buf) != image.debuglink[1]):
                        notes.append(f"{path}: ignored, its CRC32 does not match the "
                                     f".gnu_debuglink of {image.path}")
                        continue
                    return path
            except UprobesError as exc:
                notes.append(f"ignored debug file: {exc}")
    return None


def debug_file_candidates(image: ElfImage,
                          debug_dirs: Iterable[str] = DEFAULT_DEBUG_DIRS) -> list[str]:
    """Where a separate debug file for `image` would be looked for, best first."""
    return [path for path, _ in _candidates(image, debug_dirs)]


def find_debug_file(image: ElfImage, debug_dirs: Iterable[str] = DEFAULT_DEBUG_DIRS,
                    notes: list[str] | None = None) -> tuple[str, list[Symbol]] | None:
    """The separate debug file for `image` and its `.symtab`, or None."""
    notes = notes if notes is not None else []
    path = debug_file_path(image, debug_dirs, notes)
    if path is None:
        return None
    with _mapped_regular(path) as buf:
        if buf is None:
            return None
        try:
            with guard(path):
                return path, _symtab_symbols(RawElf(buf, path), "debugfile")
        except UprobesError as exc:
            notes.append(f"ignored debug file: {exc}")
    return None


def minidebuginfo_symbols(image: ElfImage, elf: RawElf,
                          notes: list[str] | None = None) -> list[Symbol]:
    """The `.symtab` of the xz-compressed ELF in `.gnu_debugdata` (Fedora's MiniDebugInfo)."""
    notes = notes if notes is not None else []
    sec = elf.section(".gnu_debugdata")
    if sec is None or not sec.has_bytes:
        return []
    label = f"{image.path} (.gnu_debugdata)"
    import lzma  # only files that carry MiniDebugInfo need it: start-up time

    try:
        with guard(label, "malformed MiniDebugInfo"):
            decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            payload = decompressor.decompress(elf.section_data(sec),
                                              max_length=MAX_MINIDEBUGINFO)
            if not decompressor.eof:
                raise ElfError(f"{label}: MiniDebugInfo is truncated or larger than "
                               f"{MAX_MINIDEBUGINFO >> 20} MiB")
            return _symtab_symbols(RawElf(payload, label), "minidebuginfo")
    except UprobesError as exc:
        notes.append(f"ignored MiniDebugInfo: {exc}")
        return []
