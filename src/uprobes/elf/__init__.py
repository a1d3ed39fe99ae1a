"""The ELF layer: files, symbols, USDT notes and instruction boundaries on x86-64.

Addresses are named by their space: `link_addr` (as symbols and section
headers give it) and `file_offset` (what the kernel's uprobe takes).
"""

from uprobes.elf.debuginfo import DEFAULT_DEBUG_DIRS
from uprobes.elf.image import ElfImage, FileIdentity, LoadSegment, SectionInfo
from uprobes.elf.insn import (
    DecodedInsn,
    ReturnSites,
    check_boundary,
    decode_at,
    find_return_sites,
    return_sites,
)
from uprobes.elf.symbols import Symbol, SymbolTable, clear_cache, ifunc_warning
from uprobes.elf.usdt import UsdtArg, UsdtNote, find_usdt, parse_usdt_args, usdt_notes

__all__ = [
    "DEFAULT_DEBUG_DIRS",
    "DecodedInsn",
    "ElfImage",
    "FileIdentity",
    "LoadSegment",
    "ReturnSites",
    "SectionInfo",
    "Symbol",
    "SymbolTable",
    "UsdtArg",
    "UsdtNote",
    "check_boundary",
    "clear_cache",
    "decode_at",
    "find_return_sites",
    "find_usdt",
    "ifunc_warning",
    "parse_usdt_args",
    "return_sites",
    "usdt_notes",
]
