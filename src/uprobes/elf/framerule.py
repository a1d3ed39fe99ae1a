"""How to step out of a frame: the rule both CFI readers give (unwind/cfi.py
with pyelftools, ehframe.py from `.eh_frame_hdr`) and the walk follows."""

from __future__ import annotations

from dataclasses import dataclass

# DWARF register numbers on x86-64 (System V psABI, figure 3.36).
RBP, RSP, RA = 6, 7, 16


@dataclass(frozen=True)
class FrameRule:
    """How to step out of the frame at one address: CFA = reg + offset;
    `saved[r]` = offset from the CFA where register r (RA = 16: the return
    address) was stored."""

    cfa_reg: int
    cfa_offset: int
    saved: tuple[tuple[int, int], ...]
