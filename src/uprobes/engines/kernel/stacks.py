"""User stacks on the kernel engine: which registers each sample carries, and
the hit functions that read them with the stack copy into a `StackCapture`.

The samples carry what `perf record --call-graph dwarf` takes: the user
registers at the hit (PERF_SAMPLE_REGS_USER; for a uprobe the trap's own
registers) and a copy of the user stack from sp up (PERF_SAMPLE_STACK_USER,
taken with page faults disabled: a page not present ends the copy early).
"""

from __future__ import annotations

from collections.abc import Callable

from uprobes.model.event import Hit
from uprobes.sys.perf import PERF_REG_X86
from uprobes.sys.perf_ring import user_tail
from uprobes.unwind.capture import StackCapture
from uprobes.unwind.stack import StackCopy

# The registers a walk can use, as (perf name, DWARF number); the mask takes
# them in perf-number order, which is the order a sample lists them in.
_DWARF = {"ax": 0, "dx": 1, "cx": 2, "bx": 3, "si": 4, "di": 5, "bp": 6, "sp": 7,
          **{f"r{n}": n for n in range(8, 16)}, "ip": 16}
_ORDER = sorted(_DWARF, key=lambda name: PERF_REG_X86[name])
USER_REGS_MASK = sum(1 << PERF_REG_X86[name] for name in _ORDER)
_DWARF_IN_ORDER = tuple(_DWARF[name] for name in _ORDER)
_SP_INDEX = _ORDER.index("sp")


def with_capture(hit: Callable[[bytes, int], Hit], raw_size_at: int,
                 returned: bool) -> Callable[[bytes, int], Hit]:
    """`hit` (a decoder's hit function) giving the `Hit` plus its capture
    (None: the hit had no user registers). `raw_size_at`: where RAW's size
    is in a sample body. `returned`: the probe sits on a `ret`, shown as the
    return it makes (`StackCapture.returned`)."""
    nregs = len(_ORDER)

    def hit_with_capture(data: bytes, body: int) -> Hit:
        h = hit(data, body)
        regs, copied = user_tail(data, body + raw_size_at, nregs, True)
        if regs is None:
            return h + (None,)  # type: ignore[return-value]
        capture = StackCapture(dict(zip(_DWARF_IN_ORDER, regs)),
                               StackCopy(regs[_SP_INDEX], copied))
        if returned:
            capture = capture.returned()
        return h + (capture,)  # type: ignore[return-value]

    return hit_with_capture
