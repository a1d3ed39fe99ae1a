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

_LEGACY_PREFIXES = frozenset(b"\x66\x67\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65")
_EVEX = 0x62  # in 64-bit mode always EVEX (BOUND does not exist there)
EVEX_REASON = "AVX-512 (EVEX) instruction: the kernel's single-step loses its result"


def unsafe_site(path: str, file_offset: int) -> str | None:
    """Why probing the instruction at `file_offset` of `path` would corrupt
    the target, or None if nothing we know of is wrong with it."""
    try:
        with open(path, "rb") as f:
            f.seek(file_offset)
            code = f.read(15)
    except OSError:
        return None  # the kernel reports the file's problem itself
    i = 0
    while i < len(code) and code[i] in _LEGACY_PREFIXES:
        i += 1
    if i < len(code) and code[i] == _EVEX:
        return EVEX_REASON
    return None
