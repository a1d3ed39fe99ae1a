"""USDT (SystemTap SDT) probe notes: `.note.stapsdt`, owner "stapsdt", type 3.

Each note's descriptor is three ELF64 addresses (probe pc, the link-time
address of `.stapsdt.base`, the semaphore or 0), then three NUL-terminated
strings: provider, name, argument spec.  If the file was prelinked or its
sections moved after the notes were written, the addresses are adjusted by
how far `.stapsdt.base` moved: actual = note value + (section address - note
base), as SystemTap's SDT notes page and libbpf's usdt.c do.

The kernel wants the probe's *file offset* and, for the semaphore, the file
offset of the 2-byte counter (`ref_ctr_offset`); the semaphore lives in
`.probes`, inside a writable PT_LOAD, and converts through it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

from uprobes.elf.image import ElfImage
from uprobes.errors import ElfError, ResolveError

_NT_STAPSDT = 3
_SHT_NOTE = 7
_ADDRS = struct.Struct("<QQQ")
_ARG = re.compile(r"(-?)(\d+)@(\S+)")


class UsdtArg(NamedTuple):
    """One argument: `size` bytes (1, 2, 4 or 8), signedness, and the AT&T operand text."""

    size: int
    signed: bool
    operand: str


@dataclass(frozen=True)
class UsdtNote:
    """One USDT probe site, addresses already adjusted for `.stapsdt.base`."""

    provider: str
    name: str
    link_addr: int
    file_offset: int
    semaphore_link_addr: int | None
    semaphore_file_offset: int | None
    args: tuple[UsdtArg, ...]
    arg_text: str
    note_pc: int
    note_base: int
    note_semaphore: int

    @property
    def full_name(self) -> str:
        """`provider:name`."""
        return f"{self.provider}:{self.name}"


def parse_usdt_args(text: str) -> tuple[UsdtArg, ...]:
    """Parse an SDT v3 argument spec such as `-4@%eax 8@-16(%rbp) 8@$5`.

    A negative size means a signed argument.  Raises ValueError on anything else.
    """
    out = []
    for word in text.split():
        m = _ARG.fullmatch(word)
        if m is None:
            raise ValueError(f"USDT argument {word!r} is not SIZE@OPERAND")
        size = int(m.group(2))
        if size not in (1, 2, 4, 8):
            raise ValueError(f"USDT argument {word!r} has size {size}, not 1, 2, 4 or 8")
        out.append(UsdtArg(size, m.group(1) == "-", m.group(3)))
    return tuple(out)


def _split_strings(path: str, blob: bytes) -> tuple[str, str, str]:
    parts = blob.split(b"\0")
    if len(parts) < 4:
        raise ElfError(f"{path}: malformed USDT note (expected provider, name and arguments)")
    provider, name, args = (p.decode("utf-8", "surrogateescape") for p in parts[:3])
    if not provider or not name:
        raise ElfError(f"{path}: malformed USDT note (empty provider or name)")
    return provider, name, args


def _make_note(image: ElfImage, desc: bytes, base_addr: int | None) -> UsdtNote:
    if len(desc) < _ADDRS.size:
        raise ElfError(f"{image.path}: malformed USDT note (descriptor of {len(desc)} bytes)")
    pc, base, sem = _ADDRS.unpack_from(desc)
    provider, name, arg_text = _split_strings(image.path, desc[_ADDRS.size:])
    label = f"{image.path}: USDT probe {provider}:{name}"
    shift = 0 if base_addr is None else base_addr - base
    link_addr = (pc + shift) & (2**64 - 1)
    sem_link = (sem + shift) & (2**64 - 1) if sem else None
    try:
        file_offset = image.link_to_file_offset(link_addr)
        sem_offset = image.link_to_file_offset(sem_link) if sem_link is not None else None
        args = parse_usdt_args(arg_text)
    except (ResolveError, ValueError) as exc:
        raise ElfError(f"{label}: {str(exc).removeprefix(image.path + ': ')}") from None
    if not image.is_executable_file_offset(file_offset):
        raise ElfError(f"{label}: its address {link_addr:#x} is not in an executable segment")
    return UsdtNote(provider, name, link_addr, file_offset, sem_link, sem_offset, args,
                    arg_text, pc, base, sem)


def usdt_notes(image: ElfImage) -> list[UsdtNote]:
    """Every USDT probe in `image`, in note order; `ElfError` if a note is malformed."""
    base = image.section(".stapsdt.base")
    base_addr = base.link_addr if base is not None else None
    out: list[UsdtNote] = []
    with image.raw() as elf:
        for sec in elf.shdrs:
            if sec.type != _SHT_NOTE:
                continue
            for owner, n_type, desc in elf.notes(elf.section_data(sec)):
                if owner == b"stapsdt" and n_type == _NT_STAPSDT:
                    out.append(_make_note(image, desc, base_addr))
    return out


def find_usdt(notes: list[UsdtNote], provider: str, name: str) -> list[UsdtNote]:
    """The notes for `provider:name` (a probe may have several sites, e.g. when inlined)."""
    return [n for n in notes if n.provider == provider and n.name == name]
