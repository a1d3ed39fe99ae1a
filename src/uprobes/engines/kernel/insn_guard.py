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

from iced_x86 import EncodingKind

from uprobes.elf.image import ElfImage
from uprobes.elf.insn import decode_at
from uprobes.errors import UprobesError

EVEX_REASON = "AVX-512 (EVEX) instruction: the kernel's single-step loses its result"


def unsafe_site(path: str, file_offset: int) -> str | None:
    """Why probing the instruction at `file_offset` of `path` would corrupt
    the target, or None if nothing we know of is wrong with it."""
    try:
        with ElfImage.open(path) as image:
            insn = decode_at(image, file_offset)
    except UprobesError:
        return None  # validation (or the kernel) reports the file's problem itself
    if insn.instruction.encoding == EncodingKind.EVEX:
        return EVEX_REASON
    return None
