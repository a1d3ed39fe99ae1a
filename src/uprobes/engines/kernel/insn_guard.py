"""Probe sites the kernel accepts but executes wrongly.

Measured on 6.18 (tests/test_kernel_count.py::test_evex_site_is_refused): a
uprobe on an EVEX-encoded (AVX-512) instruction that writes %ymm16 is
single-stepped, but its result is lost: `vpbroadcastb %esi,%ymm16` then
stores stale bytes (996 of 1000 calls wrong), and a probe on libc's
`__memset_evex_unaligned_erms` crashes every process that calls memset.
The kernel refuses the VEX-encoded (AVX2) entry points with ENOTSUPP but
not these, so we refuse them ourselves.
"""

from __future__ import annotations

from collections.abc import Iterable

from iced_x86 import EncodingKind, OpCodeTableKind, Register

from uprobes.elf.image import ElfImage
from uprobes.elf.insn import decode_at
from uprobes.errors import UprobesError

EVEX_REASON = "AVX-512 (EVEX) instruction: the kernel's single-step loses its result"


def unsafe_site(path: str, file_offset: int) -> str | None:
    """Why probing the instruction at `file_offset` of `path` would corrupt
    the target, or None if nothing we know of is wrong with it."""
    return unsafe_sites([(path, file_offset)]).get((path, file_offset))


# What arch/x86/kernel/uprobes.c uprobe_init_insn() refuses with ENOTSUPP
# whatever the opcode tables say: LOCK and ES/CS/SS/DS prefixes
# (is_prefix_bad()), and opcodes of more than two bytes (0F 38, 0F 3A, in
# legacy or VEX form: only 1- and 2-byte opcode tables are checked).
_BAD_SEGMENTS = (Register.ES, Register.CS, Register.SS, Register.DS)
_THREE_BYTE = (OpCodeTableKind.T0F38, OpCodeTableKind.T0F3A)
# A VEX instruction's opcode byte (map 0F implied) is looked up in the
# kernel's *one-byte* table (good_insns_64): a byte that is bad there
# (vmovd 6E and vmovdqu 6F are ins/outs, vpxor EF is out) is refused. These
# are the bytes that table refuses in 64-bit mode.
_BAD_ONE_BYTE = frozenset([
    0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x26, 0x27, 0x2E, 0x2F, 0x36, 0x37, 0x3E,
    0x3F, 0x60, 0x61, 0x62, 0x6C, 0x6D, 0x6E, 0x6F, 0x82, 0x9A, 0xC4, 0xC5, 0xCC, 0xCD,
    0xCE, 0xCF, 0xD4, 0xD5, 0xD6, 0xE4, 0xE5, 0xE6, 0xE7, 0xEA, 0xEC, 0xED, 0xEE, 0xEF,
    0xF1, 0xF4, 0xFA, 0xFB])


def unsafe_sites(sites: Iterable[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """`unsafe_site` for many (path, file_offset) sites, each file opened
    once (opening libc takes tens of ms: per probe of `libc:*` that was
    most of the time to attach); only the unsafe ones are in the result."""
    return screen_sites(sites)[0]


def screen_sites(sites: Iterable[tuple[str, int]]
                 ) -> tuple[dict[tuple[str, int], str], set[tuple[str, int]]]:
    """(`unsafe_sites`, the sites the kernel will most likely refuse). The
    second is a guess used only to keep such probes out of shared events
    (one refused probe point fails its whole event): the kernel decides."""
    refusable: set[tuple[str, int]] = set()
    by_path: dict[str, set[int]] = {}
    for path, file_offset in sites:
        by_path.setdefault(path, set()).add(file_offset)
    unsafe: dict[tuple[str, int], str] = {}
    for path, offsets in by_path.items():
        try:
            image = ElfImage.open(path)
        except UprobesError:
            continue  # validation (or the kernel) reports the file's problem itself
        with image:
            for file_offset in offsets:
                try:
                    insn = decode_at(image, file_offset)
                except UprobesError:
                    continue
                ins = insn.instruction
                if ins.encoding == EncodingKind.EVEX:
                    unsafe[(path, file_offset)] = EVEX_REASON
                elif (ins.has_lock_prefix or ins.segment_prefix in _BAD_SEGMENTS
                      or ins.op_code().table in _THREE_BYTE
                      or (ins.encoding == EncodingKind.VEX
                          and ins.op_code().op_code in _BAD_ONE_BYTE)):
                    refusable.add((path, file_offset))
    return unsafe, refusable
