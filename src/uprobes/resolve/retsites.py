"""Where a return probe goes: on the function's own `ret`s, or the kernel's uretprobe.

The kernel's uretprobe replaces the return address on the stack with its
trampoline's. Anything that walks or unwinds the stack through that frame
then goes wrong: a C++ exception finds no unwind info for the trampoline
and calls std::terminate, longjmp skips the trampoline (the kernel cleans up
later, but the return is never reported), Go's and coroutine runtimes copy
or switch stacks. An entry-style probe on each `ret` of the function sees the
same return (`%ax` is the return value, the word at `%sp` the address
returned to) and touches nothing. It is only right when every exit of the
function is one of its `ret`s: a tail call leaves by a `jmp` and returns
from someone else's `ret`, so then the uretprobe it is, and we say so.

This is decided here, engine-independently: every engine places the same
sites (the kernel engine as tracefs events, the ptrace engine as
breakpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

from uprobes.elf.image import ElfImage
from uprobes.elf.insn import find_return_sites
from uprobes.elf.symbols import Symbol
from uprobes.lang.ast import FetchArg
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.abi import at_ret_site

UNSAFE = "an exception, longjmp or stack switch through it aborts or confuses the program"


def return_sites_for(image: ElfImage, symbol: Symbol | None,
                     args: Sequence[FetchArg]) -> tuple[tuple[int, ...] | None, str | None]:
    """(file offsets of the `ret`s to probe, None) or (None, why the kernel's
    uretprobe must be used)."""
    if symbol is None:
        return None, "no function symbol starts at this offset"
    for a in args:
        if at_ret_site(a.expr) is None:
            return None, (f"{a.name} reads the stack pointer itself, which is 8 bytes lower "
                          "at the ret than after it")
    found = find_return_sites(image, symbol)
    if not found.file_offsets:
        return None, found.reason
    return found.file_offsets, None


def uretprobe_note(probes: Sequence[ResolvedProbe], shown: int = 6) -> str | None:
    """One line naming the return probes that fell back to the kernel's
    uretprobe (None if none did)."""
    fell = [p for p in probes if p.is_return and p.uretprobe_reason]
    if not fell:
        return None
    if len(fell) == 1:
        p = fell[0]
        return f"{p.name} uses the kernel's uretprobe ({p.uretprobe_reason}): {UNSAFE}"
    total = sum(1 for p in probes if p.is_return)
    names = ", ".join(p.name for p in fell[:shown]) + (", ..." if len(fell) > shown else "")
    return (f"{len(fell)} of {total} return probes use the kernel's uretprobe (not every exit "
            f"of the function could be found; `uprobes resolve` says why): {names}: {UNSAFE}")
