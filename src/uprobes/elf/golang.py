"""Go binaries (the gc toolchain): function names from `.gopclntab`, and the
toolchain version from `.go.buildinfo` (which says how arguments are passed).

Function names first, for binaries built without a symbol table
(`go build -ldflags=-s`, the usual way Go ships).

The Go runtime keeps its own table of every function (it needs it for stack
traces, garbage collection and stack growth), so stripping `.symtab` leaves
the names where we can read them. The table starts with a header whose magic
gives the layout (Go's runtime/symtab.go and debug/gosym describe them):

- Go 1.2-1.15 (0xfffffffb): `nfunc`, then `nfunc` pairs (entry pc, offset of
  the function's record), both pointer-sized; a record starts with its entry
  pc and the offset of its name, both from the table's start.
- Go 1.16-1.17 (0xfffffffa): a header of offsets to sub-tables; pairs of
  (entry pc, record offset) in the pcln sub-table; names in a name sub-table.
- Go 1.18+ (0xfffffff0, 0xfffffff1 since 1.20): as 1.16, but entries are
  32-bit offsets from `textStart` (in the header), and so are the records'.

In each layout one more entry ends the list: its pc is the end of the last
function, so every function's size is the distance to the next entry.
"""

from __future__ import annotations

import struct

from uprobes.elf.image import ElfImage
from uprobes.elf.leb128 import leb128
from uprobes.elf.symread import Symbol
from uprobes.errors import ElfError

SECTION = ".gopclntab"
_GO12, _GO116, _GO118, _GO120 = 0xFFFFFFFB, 0xFFFFFFFA, 0xFFFFFFF0, 0xFFFFFFF1

# Go's internal register ABI on amd64 (since go1.17): integer arguments and
# results in these registers, in order (Go's ABI document, "amd64
# architecture"). Assembly functions keep ABI0: everything on the stack.
REGISTER_ABI_ARGS = ("ax", "bx", "cx", "di", "si", "r8", "r9", "r10", "r11")
_BUILDINFO = ".go.buildinfo"
_BUILDINFO_MAGIC = b"\xff Go buildinf:"


def go_symbols(image: ElfImage) -> list[Symbol]:
    """The functions `.gopclntab` names, at their link addresses; [] when the
    file has no such section. ElfError when it is there but malformed."""
    sec = image.section(SECTION)
    if sec is None or sec.size < 16:
        return []
    text = image.section(".text")
    return parse_pclntab(image.read_file(sec.file_offset, sec.size),
                         text.link_addr if text else None, image.path)


def parse_pclntab(tab: bytes, text_addr: int | None = None,
                  name: str = SECTION) -> list[Symbol]:
    """The functions of one pclntab (its bytes, from the header on).
    `text_addr`: where `.text` starts, for a Go 1.18+ position-independent
    build, whose header's `textStart` is only filled in by a relocation at
    load time (0 in the file); the runtime's text starts with `.text`."""
    try:
        return _parse(tab, text_addr)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
        raise ElfError(f"{name}: malformed {SECTION} ({e})") from None


def _parse(tab: bytes, text_addr: int | None) -> list[Symbol]:
    magic, pad1, pad2, min_lc, ptr = struct.unpack_from("<IBBBB", tab, 0)
    if pad1 or pad2 or min_lc not in (1, 2, 4) or ptr != 8:
        raise ValueError("not a 64-bit little-endian pclntab header")
    word = "<Q"

    def uptr(at: int) -> int:
        return int(struct.unpack_from(word, tab, at)[0])

    def cstr(at: int) -> str:
        end = tab.index(b"\0", at)
        return tab[at:end].decode()

    entries: list[tuple[int, str]] = []  # (entry link address, name)
    end_pc: int
    if magic in (_GO118, _GO120):
        nfunc, text_start, names, pcln = uptr(8), uptr(24), uptr(32), uptr(64)
        if text_start == 0 and text_addr is not None:
            text_start = text_addr
        pairs = struct.unpack_from(f"<{2 * nfunc + 2}I", tab, pcln)
        for i in range(nfunc):
            entry_off, rec = pairs[2 * i], pairs[2 * i + 1]
            name_off = struct.unpack_from("<i", tab, pcln + rec + 4)[0]
            entries.append((text_start + entry_off, cstr(names + name_off)))
        end_pc = text_start + pairs[2 * nfunc]
    elif magic == _GO116:
        nfunc, names, pcln = uptr(8), uptr(24), uptr(56)
        for i in range(nfunc):
            entry, rec = uptr(pcln + 16 * i), uptr(pcln + 16 * i + 8)
            name_off = struct.unpack_from("<i", tab, pcln + rec + 8)[0]
            entries.append((entry, cstr(names + name_off)))
        end_pc = uptr(pcln + 16 * nfunc)
    elif magic == _GO12:
        nfunc = uptr(8)
        for i in range(nfunc):
            entry, rec = uptr(16 + 16 * i), uptr(16 + 16 * i + 8)
            name_off = struct.unpack_from("<i", tab, rec + 8)[0]
            entries.append((entry, cstr(name_off)))
        end_pc = uptr(16 + 16 * nfunc)
    else:
        raise ValueError(f"unknown magic {magic:#x}")
    symbols = []
    for i, (addr, fname) in enumerate(entries):
        nxt = entries[i + 1][0] if i + 1 < len(entries) else end_pc
        if nxt < addr:
            raise ValueError(f"functions out of order at {fname}")
        symbols.append(Symbol(name=fname, version=None, default_version=False, link_addr=addr,
                              size=nxt - addr, kind="func", binding="global",
                              source="gopclntab"))
    return symbols


def go_version(image: ElfImage) -> tuple[int, int] | None:
    """(major, minor) of the gc toolchain that built `image` (`go1.19.8` ->
    (1, 19)), from `.go.buildinfo`; None for a file that is not a Go binary or
    whose record cannot be read."""
    sec = image.section(_BUILDINFO)
    if sec is None or sec.size < 32:
        return None
    head = image.read_file(sec.file_offset, min(sec.size, 4096))
    if not head.startswith(_BUILDINFO_MAGIC) or head[14] != 8:
        return None
    try:
        if head[15] & 2:  # go1.18+: the strings inline, each after its uvarint length
            text, _ = _uvarint_string(head, 32)
        else:  # older: a pointer to a Go string header (data pointer, length)
            ptr = struct.unpack_from("<Q", head, 16)[0]
            data, length = struct.unpack_from("<QQ", image.read_link(ptr, 16))
            text = image.read_link(data, length).decode()
    except (struct.error, IndexError, UnicodeDecodeError, ElfError):
        return None
    parts = text.removeprefix("go").split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].split("rc")[0].isdigit()):
        return None
    return int(parts[0]), int(parts[1].split("rc")[0].split("beta")[0] or 0)


def uses_register_abi(image: ElfImage) -> bool:
    """Whether Go functions of `image` take their arguments in registers
    (`REGISTER_ABI_ARGS`): built by gc go1.17 or later."""
    version = go_version(image)
    return version is not None and version >= (1, 17)


def _uvarint_string(data: bytes, at: int) -> tuple[str, int]:
    length, at = leb128(data, at)
    return data[at:at + length].decode(), at + length
