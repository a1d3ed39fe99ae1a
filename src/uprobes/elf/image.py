"""One ELF file (or in-memory image) on x86-64, and its address spaces.

Two spaces meet here: `link_addr` (the virtual address the link editor gave,
as symbols and section headers state it) and `file_offset` (a byte position
in the file, which is what the kernel's uprobe takes).  The PT_LOAD program
headers are the only translation between them, and it is the same for PIE,
non-PIE and shared objects: offset = link_addr - p_vaddr + p_offset.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Literal

from elftools.elf.constants import P_FLAGS
from elftools.elf.dynamic import DynamicSection, DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE
from elftools.elf.sections import NoteSection
from elftools.elf.segments import InterpSegment, NoteSegment

from uprobes.elf._guard import guard
from uprobes.errors import ElfError, ResolveError

_EM_X86_64 = 62
_DF_1_PIE = 0x08000000
_HEADER_SIZE = 64  # sizeof(Elf64_Ehdr)
_PHDR_SIZE = 56  # sizeof(Elf64_Phdr)
_SHDR_SIZE = 64  # sizeof(Elf64_Shdr)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


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
        return bool(self.flags & P_FLAGS.PF_R)

    @property
    def writable(self) -> bool:
        return bool(self.flags & P_FLAGS.PF_W)

    @property
    def executable(self) -> bool:
        return bool(self.flags & P_FLAGS.PF_X)


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
        arch = next((k for k, v in ENUM_E_MACHINE.items() if v == machine), f"machine {machine}")
        endian = "" if ei_data == 1 else ", big-endian"
        raise ElfError(
            f"{name}: is a {bits}-bit ELF for {arch}{endian}; "
            "uprobes handles x86-64 (ELF64, EM_X86_64) files only"
        )
    if size < _HEADER_SIZE:
        raise ElfError(f"{name}: truncated ELF file ({size} bytes, shorter than the ELF header)")


def build_id_of(elf: ELFFile) -> str | None:
    """The GNU build-id, from the note segments (a stripped file may have no
    sections) or else the note sections (a separate debug file's segments
    carry no data)."""
    containers = [*elf.iter_segments(), *elf.iter_sections()]
    for part in containers:
        if isinstance(part, (NoteSegment, NoteSection)):
            for note in part.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    return str(note["n_desc"])
    return None


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
        self._stream: BinaryIO | None = None
        self._depth = 0

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

    # -- the stream -------------------------------------------------------------------

    def _open_stream(self) -> BinaryIO:
        if self._data is not None:
            return io.BytesIO(self._data)
        try:
            # O_NONBLOCK: if the path was swapped for a FIFO after our stat, open must not hang.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ElfError(f"{self.path}: cannot open: {exc.strerror or exc}") from None
        stream = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (
            self.identity is not None and FileIdentity.of(st) != self.identity
        ):
            stream.close()
            raise ElfError(f"{self.path}: the file changed on disk since it was opened")
        return stream

    def __enter__(self) -> ElfImage:
        if self._depth == 0:
            self._stream = self._open_stream()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Close the file if a `with` block left it open (idempotent)."""
        self._depth = 0
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    @contextmanager
    def elffile(self) -> Iterator[ELFFile]:
        """A pyelftools view of the file, open for the duration of the block.

        Exceptions pyelftools raises inside the block become `ElfError`.
        """
        with self, guard(self.path):
            assert self._stream is not None
            yield ELFFile(self._stream)

    def read_file(self, file_offset: int, size: int) -> bytes:
        """`size` bytes at `file_offset` (fewer at the end of the file)."""
        if file_offset < 0 or size < 0:
            raise ResolveError(f"{self.path}: negative file offset or size")
        # A corrupt st_size can ask for exabytes; never ask read() for more than exists.
        size = max(0, min(size, self.file_size - file_offset))
        with self, guard(self.path):
            assert self._stream is not None
            self._stream.seek(file_offset)
            return self._stream.read(size)

    # -- summary ---------------------------------------------------------------------

    def _summarise(self) -> None:
        assert self._stream is not None
        with guard(self.path):
            self._stream.seek(0, os.SEEK_END)
            self.file_size = self._stream.tell()
            self._stream.seek(0)
            _check_ident(self.path, self._stream.read(_HEADER_SIZE), self.file_size)
            self._stream.seek(0)
            self._read_headers(ELFFile(self._stream))

    def _truncated(self, what: str, end: int) -> ElfError:
        return ElfError(
            f"{self.path}: truncated ELF file ({what} ends at byte {end:#x}, "
            f"the file has {self.file_size:#x})"
        )

    def _read_headers(self, elf: ELFFile) -> None:
        hdr = elf.header
        if hdr["e_type"] not in ("ET_EXEC", "ET_DYN"):
            what = {"ET_REL": "a relocatable object (.o)", "ET_CORE": "a core dump"}
            desc = what.get(str(hdr["e_type"]), f"of type {hdr['e_type']}")
            raise ElfError(f"{self.path}: is {desc}, not an executable or shared library")
        self.elf_type = "EXEC" if hdr["e_type"] == "ET_EXEC" else "DYN"
        # The kernel's loader insists on these sizes; trusting others lets a
        # tiny file claim 65535 section headers all at one offset.
        if hdr["e_phnum"] and hdr["e_phentsize"] != _PHDR_SIZE:
            raise ElfError(f"{self.path}: malformed ELF file (program header size "
                           f"{hdr['e_phentsize']}, expected {_PHDR_SIZE})")
        if elf.num_sections() and hdr["e_shentsize"] != _SHDR_SIZE:
            raise ElfError(f"{self.path}: malformed ELF file (section header size "
                           f"{hdr['e_shentsize']}, expected {_SHDR_SIZE})")
        ph_end = hdr["e_phoff"] + hdr["e_phnum"] * hdr["e_phentsize"]
        if hdr["e_phnum"] and ph_end > self.file_size:
            raise self._truncated("the program header table", ph_end)
        if elf.num_sections():
            sh_end = hdr["e_shoff"] + elf.num_sections() * hdr["e_shentsize"]
            if sh_end > self.file_size:
                raise self._truncated("the section header table", sh_end)
        self._read_segments(elf)
        self._read_sections(elf)
        self._read_dynamic(elf)
        self.build_id = build_id_of(elf)
        self.debuglink = self._find_debuglink(elf)

    def _read_segments(self, elf: ELFFile) -> None:
        loads: list[LoadSegment] = []
        self.interp = None
        for i, seg in enumerate(elf.iter_segments()):
            if seg["p_type"] == "PT_LOAD":
                end = seg["p_offset"] + seg["p_filesz"]
                if end > self.file_size:
                    raise self._truncated(f"loadable segment {i}", end)
                loads.append(LoadSegment(i, seg["p_offset"], seg["p_vaddr"], seg["p_filesz"],
                                         seg["p_memsz"], seg["p_flags"]))
            elif isinstance(seg, InterpSegment):
                self.interp = seg.get_interp_name()
        if not loads:
            raise ElfError(f"{self.path}: has no loadable (PT_LOAD) segments")
        self.segments = tuple(loads)

    def _read_sections(self, elf: ELFFile) -> None:
        infos: list[SectionInfo] = []
        for sec in elf.iter_sections():
            if sec["sh_type"] != "SHT_NOBITS" and sec["sh_type"] != "SHT_NULL":
                end = sec["sh_offset"] + sec["sh_size"]
                if end > self.file_size:
                    raise self._truncated(f"section {sec.name or '?'}", end)
            infos.append(SectionInfo(sec.name, str(sec["sh_type"]), sec["sh_addr"],
                                     sec["sh_offset"], sec["sh_size"], sec["sh_flags"]))
        self.sections = tuple(infos)

    def _read_dynamic(self, elf: ELFFile) -> None:
        self.soname = None
        flags_1 = 0
        dyn: DynamicSection | DynamicSegment | None = next(
            (s for s in elf.iter_sections() if isinstance(s, DynamicSection)), None)
        if dyn is None:
            dyn = next((s for s in elf.iter_segments() if isinstance(s, DynamicSegment)), None)
        if dyn is not None:
            for tag in dyn.iter_tags():
                if tag.entry.d_tag == "DT_SONAME":
                    self.soname = str(tag.soname)  # type: ignore[attr-defined]
                elif tag.entry.d_tag == "DT_FLAGS_1":
                    flags_1 = tag.entry.d_val
        # DF_1_PIE is what binutils >= 2.31 sets; older PIEs are DYN with an
        # interpreter and no soname (libc.so.6 has an interpreter *and* a soname).
        self.is_pie = self.elf_type == "DYN" and (
            bool(flags_1 & _DF_1_PIE) or (self.interp is not None and self.soname is None)
        )

    def _find_debuglink(self, elf: ELFFile) -> tuple[str, int] | None:
        sec = elf.get_section_by_name(".gnu_debuglink")
        if sec is None or sec["sh_type"] == "SHT_NOBITS":
            return None
        data = sec.data()
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
