"""One ELF file (or in-memory image) on x86-64, and its address spaces.

Two spaces meet here: `link_addr` (the virtual address the link editor gave,
as symbols and section headers state it) and `file_offset` (a byte position
in the file, which is what the kernel's uprobe takes).  The PT_LOAD program
headers are the only translation between them, and it is the same for PIE,
non-PIE and shared objects: offset = link_addr - p_vaddr + p_offset.
"""

from __future__ import annotations

import io
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Literal

from uprobes.elf._guard import guard
from uprobes.elf.raw import PF_R, PF_W, PF_X, PT_INTERP, SECTION_TYPES, Buffer, RawElf
from uprobes.errors import ElfError, ResolveError

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile

_EM_X86_64 = 62
_ET_EXEC, _ET_DYN = 2, 3
_DT_SONAME, _DT_STRTAB, _DT_STRSZ, _DT_FLAGS_1 = 14, 5, 10, 0x6FFFFFFB
_DF_1_PIE = 0x08000000
_NT_GNU_BUILD_ID = 3
_HEADER_SIZE = 64  # sizeof(Elf64_Ehdr)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
_MACHINES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390",
             40: "EM_ARM", 50: "EM_IA_64", 62: "EM_X86_64", 183: "EM_AARCH64",
             243: "EM_RISCV", 258: "EM_LOONGARCH"}


@dataclass(frozen=True)
class LoadSegment:
    """A PT_LOAD program header: file bytes [file_offset, +file_size) at link_addr."""

    index: int
    file_offset: int
    link_addr: int
    file_size: int
    mem_size: int
    flags: int

    @property
    def readable(self) -> bool:
        return bool(self.flags & PF_R)

    @property
    def writable(self) -> bool:
        return bool(self.flags & PF_W)

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)


@dataclass(frozen=True)
class SectionInfo:
    """A section header, with its address in both spaces."""

    name: str
    type: str
    link_addr: int
    file_offset: int
    size: int
    flags: int


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file on disk from another (the cache key)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_kind(mode: int) -> str | None:
    for test, kind in _FILE_KINDS:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _check_ident(name: str, head: bytes, size: int) -> None:
    """Refuse anything that is not a little-endian ELF64 for x86-64, saying what it is."""
    if size == 0:
        raise ElfError(f"{name}: is an empty file, not an ELF file")
    if head[:4] != b"\x7fELF":
        raise ElfError(f"{name}: is not an ELF file (no ELF magic)")
    if len(head) < 20:
        raise ElfError(f"{name}: truncated ELF file ({size} bytes, shorter than the ELF header)")
    ei_class, ei_data = head[4], head[5]
    if ei_class not in (1, 2):
        raise ElfError(f"{name}: malformed ELF file (unknown ELF class {ei_class})")
    if ei_data not in (1, 2):
        raise ElfError(f"{name}: malformed ELF file (unknown data encoding {ei_data})")
    machine = int.from_bytes(head[18:20], "little" if ei_data == 1 else "big")
    bits = 32 if ei_class == 1 else 64
    if ei_class != 2 or machine != _EM_X86_64 or ei_data != 1:
        arch = _MACHINES.get(machine, f"machine {machine}")
        endian = "" if ei_data == 1 else ", big-endian"
        raise ElfError(
            f"{name}: is a {bits}-bit ELF for {arch}{endian}; "
            "uprobes handles x86-64 (ELF64, EM_X86_64) files only"
        )
    if size < _HEADER_SIZE:
        raise ElfError(f"{name}: truncated ELF file ({size} bytes, shorter than the ELF header)")


def build_id_of(elf: RawElf) -> str | None:
    """The GNU build-id, from the note segments (a stripped file may have no
    sections) or else the note sections (a separate debug file's segments
    carry no data)."""
    for blob in elf.note_blobs():
        for owner, n_type, desc in elf.notes(blob):
            if n_type == _NT_GNU_BUILD_ID and owner == b"GNU":
                return desc.hex()
    return None


def _dynamic_string(elf: RawElf, tags: dict[int, int], index: int) -> str:
    """String `index` of the dynamic string table (DT_STRTAB, DT_STRSZ long)."""
    size = tags.get(_DT_STRSZ, 0)
    table = elf.bytes_at(elf.vaddr_to_offset(tags[_DT_STRTAB], size, "DT_STRTAB"), size,
                         "the dynamic string table")
    return elf.string_at(table, index)


class ElfImage:
    """An x86-64 ELF executable or shared object, checked and summarised on open.

    Use `ElfImage.open(path)` or `ElfImage.from_bytes(data, name)`.  Metadata is
    read once; the file is reopened only for content (symbols, notes, code), and
    stays open between `__enter__` and `__exit__` so a run of reads costs one
    open.  Outside a `with` block every read opens and closes the file itself.
    """

    path: str
    identity: FileIdentity | None
    file_size: int
    elf_type: Literal["EXEC", "DYN"]
    is_pie: bool
    build_id: str | None
    debuglink: tuple[str, int] | None
    soname: str | None
    interp: str | None
    segments: tuple[LoadSegment, ...]
    sections: tuple[SectionInfo, ...]

    def __init__(self, path: str, data: bytes | None, identity: FileIdentity | None) -> None:
        """Internal: use `open` or `from_bytes`."""
        self.path = path
        self._data = data
        self.identity = identity
        self._buf: Buffer | None = None
        self._raw: RawElf | None = None
        self._depth = 0
        self.sections_cut = False

    # -- construction ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ElfImage:
        """Check and summarise the ELF file at `path`; raise `ElfError` if it is not usable."""
        name = os.fspath(path)
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise ElfError(f"{name}: no such file") from None
        except OSError as exc:
            raise ElfError(f"{name}: cannot access: {exc.strerror or exc}") from None
        kind = _file_kind(st.st_mode)
        if kind is not None:
            raise ElfError(f"{name}: is {kind}, not an ELF file")
        image = cls(name, None, FileIdentity.of(st))
        with image:
            image._summarise()
        return image

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> ElfImage:
        """An image held in memory, such as the vDSO read out of a process; `name` labels errors."""
        image = cls(name, bytes(data), None)
        with image:
            image._summarise()
        return image

    # -- the file's bytes -------------------------------------------------------------

    def _open_fd(self) -> int:
        try:
            # O_NONBLOCK: if the path was swapped for a FIFO after our stat, open must not hang.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ElfError(f"{self.path}: cannot open: {exc.strerror or exc}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (
            self.identity is not None and FileIdentity.of(st) != self.identity
        ):
            os.close(fd)
            raise ElfError(f"{self.path}: the file changed on disk since it was opened")
        return fd

    def _open_buffer(self) -> Buffer:
        """The whole file, mapped read-only (bytes for an in-memory image or an empty file).

        Mapped only between `__enter__` and `__exit__`, and files are replaced by
        rename, not rewritten in place, so the mapping sees the version we checked.
        """
        if self._data is not None:
            return self._data
        fd = self._open_fd()
        try:
            with guard(self.path):
                if os.fstat(fd).st_size == 0:
                    return b""
                try:
                    return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
                except (OSError, ValueError):  # a file system without mmap: read it
                    with os.fdopen(os.dup(fd), "rb") as stream:
                        return stream.read()
        finally:
            os.close(fd)

    def __enter__(self) -> ElfImage:
        if self._depth == 0:
            self._buf = self._open_buffer()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.close()

    def close(self) -> None:
        """Unmap the file if a `with` block left it mapped (idempotent)."""
        self._depth = 0
        self._raw = None
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        self._buf = None

    @contextmanager
    def raw(self) -> Iterator[RawElf]:
        """Our own reader of the file's headers and tables, for the duration of the block.

        Anything raised inside the block that is not ours becomes an `ElfError`.
        """
        with self, guard(self.path):
            if self._raw is None:
                assert self._buf is not None
                self._raw = RawElf(self._buf, self.path)
            yield self._raw

    @contextmanager
    def elffile(self) -> Iterator[ELFFile]:
        """A pyelftools view of the file (DWARF readers), open for the duration of the block.

        Exceptions pyelftools raises inside the block become `ElfError`.
        """
        from elftools.elf.elffile import ELFFile

        if self._data is not None:
            stream: BinaryIO = io.BytesIO(self._data)
        else:
            stream = os.fdopen(self._open_fd(), "rb")
        with stream, guard(self.path):
            yield ELFFile(stream)

    def read_file(self, file_offset: int, size: int) -> bytes:
        """`size` bytes at `file_offset` (fewer at the end of the file)."""
        if file_offset < 0 or size < 0:
            raise ResolveError(f"{self.path}: negative file offset or size")
        with self:
            assert self._buf is not None
            return self._buf[file_offset:file_offset + size]

    # -- summary ---------------------------------------------------------------------

    def _summarise(self) -> None:
        assert self._buf is not None
        self.file_size = len(self._buf)
        _check_ident(self.path, self._buf[:_HEADER_SIZE], self.file_size)
        with self.raw() as elf:
            self._read_headers(elf)

    def _read_headers(self, elf: RawElf) -> None:
        if elf.e_type not in (_ET_EXEC, _ET_DYN):
            what = {1: "a relocatable object (.o)", 4: "a core dump"}
            desc = what.get(elf.e_type, f"of type {elf.e_type}")
            raise ElfError(f"{self.path}: is {desc}, not an executable or shared library")
        self.elf_type = "EXEC" if elf.e_type == _ET_EXEC else "DYN"
        self.sections_cut = elf.sections_cut
        self._read_segments(elf)
        self.sections = tuple(SectionInfo(s.name, SECTION_TYPES.get(s.type, str(s.type)),
                                          s.addr, s.offset, s.size, s.flags) for s in elf.shdrs)
        self._read_dynamic(elf)
        self.build_id = build_id_of(elf)
        self.debuglink = self._find_debuglink(elf)

    def _read_segments(self, elf: RawElf) -> None:
        loads: list[LoadSegment] = []
        self.interp = None
        for seg in elf.phdrs:
            if seg.type == 1:  # PT_LOAD
                end = seg.offset + seg.filesz
                if end > self.file_size:
                    raise elf.truncated(f"loadable segment {seg.index}", end)
                loads.append(LoadSegment(seg.index, seg.offset, seg.vaddr, seg.filesz,
                                         seg.memsz, seg.flags))
            elif seg.type == PT_INTERP and self.interp is None:
                raw = elf.bytes_at(seg.offset, seg.filesz, "the interpreter name")
                self.interp = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if not loads:
            raise ElfError(f"{self.path}: has no loadable (PT_LOAD) segments")
        self.segments = tuple(loads)

    def _read_dynamic(self, elf: RawElf) -> None:
        self.soname = None
        tags = elf.dynamic()
        if _DT_SONAME in tags and _DT_STRTAB in tags:
            self.soname = _dynamic_string(elf, tags, tags[_DT_SONAME])
        # DF_1_PIE is what binutils >= 2.31 sets; older PIEs are DYN with an
        # interpreter and no soname (libc.so.6 has an interpreter *and* a soname).
        self.is_pie = self.elf_type == "DYN" and (
            bool(tags.get(_DT_FLAGS_1, 0) & _DF_1_PIE)
            or (self.interp is not None and self.soname is None)
        )

    def _find_debuglink(self, elf: RawElf) -> tuple[str, int] | None:
        sec = elf.section(".gnu_debuglink")
        if sec is None or not sec.has_bytes:
            return None
        data = elf.section_data(sec)
        end = data.find(b"\0")
        crc_at = (end + 4) & ~3  # the name, its NUL, then padding to 4 bytes
        if end <= 0 or len(data) < crc_at + 4:
            raise ElfError(f"{self.path}: malformed .gnu_debuglink section")
        return os.fsdecode(data[:end]), int.from_bytes(data[crc_at:crc_at + 4], "little")

    # -- addresses -------------------------------------------------------------------

    def section(self, name: str) -> SectionInfo | None:
        """The first section called `name`, if any."""
        return next((s for s in self.sections if s.name == name), None)

    def segment_for_link_addr(self, link_addr: int) -> LoadSegment | None:
        """The PT_LOAD whose file-backed bytes hold `link_addr`."""
        for seg in self.segments:
            if seg.link_addr <= link_addr < seg.link_addr + seg.file_size:
                return seg
        return None

    def segment_for_file_offset(self, file_offset: int) -> LoadSegment | None:
        """The PT_LOAD whose file bytes include `file_offset`."""
        for seg in self.segments:
            if seg.file_offset <= file_offset < seg.file_offset + seg.file_size:
                return seg
        return None

    def link_to_file_offset(self, link_addr: int) -> int:
        """The file offset (the kernel's uprobe offset) of `link_addr`."""
        seg = self.segment_for_link_addr(link_addr)
        if seg is None:
            if any(s.link_addr <= link_addr < s.link_addr + s.mem_size for s in self.segments):
                raise ResolveError(f"{self.path}: link address {link_addr:#x} is in zero-filled "
                                   "memory (.bss) and has no file offset")
            raise ResolveError(f"{self.path}: link address {link_addr:#x} is not in any "
                               "loadable segment")
        return link_addr - seg.link_addr + seg.file_offset

    def file_to_link_addr(self, file_offset: int) -> int:
        """The link address at which the byte at `file_offset` is loaded."""
        seg = self.segment_for_file_offset(file_offset)
        if seg is None:
            raise ResolveError(f"{self.path}: file offset {file_offset:#x} is not in any "
                               "loadable segment")
        return file_offset - seg.file_offset + seg.link_addr

    def is_executable_file_offset(self, file_offset: int) -> bool:
        """Whether `file_offset` is code: inside an executable PT_LOAD's file bytes."""
        seg = self.segment_for_file_offset(file_offset)
        return seg is not None and seg.executable

    def read_link(self, link_addr: int, size: int) -> bytes:
        """`size` file-backed bytes starting at `link_addr`, all within one segment."""
        file_offset = self.link_to_file_offset(link_addr)
        seg = self.segment_for_link_addr(link_addr)
        assert seg is not None
        if link_addr + size > seg.link_addr + seg.file_size:
            raise ResolveError(f"{self.path}: {size} bytes at link address {link_addr:#x} run "
                               "past the end of their segment")
        return self.read_file(file_offset, size)

    def __repr__(self) -> str:
        return f"ElfImage({self.path!r}, {self.elf_type}, pie={self.is_pie})"
