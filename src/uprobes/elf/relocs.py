"""A file's R_X86_64_RELATIVE relocations, read with pyelftools.

In a position-independent file a word of data that holds an address (a
dispatch table's entry, a pointer in a constant table) is written by the
dynamic linker at load time: the load base plus the relocation's addend.
The word in the file is then whatever the linker left there (often 0), so
what the word holds once loaded is the addend. (RELR relocations keep the
addend in the word itself: for them, and in a non-PIE file, the word in
place is right.)
"""

from __future__ import annotations

from collections.abc import Iterator

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

R_X86_64_RELATIVE = 8


def relative_addends(elf: ELFFile) -> Iterator[tuple[int, int]]:
    """(link address of the word, addend) of each RELATIVE relocation of
    the file's RELA sections. pyelftools' errors propagate to the caller,
    which knows what a file it cannot read means for it."""
    for section in elf.iter_sections():
        if isinstance(section, RelocationSection) and section.is_RELA():
            for rel in section.iter_relocations():
                if rel["r_info_type"] == R_X86_64_RELATIVE:
                    yield rel["r_offset"], rel["r_addend"]
