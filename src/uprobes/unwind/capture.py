"""What an engine keeps of a hit to walk its stack later: the registers (DWARF
numbers) and a copy of the stack from the stack pointer up; and `Symbolizer`,
which turns one into named frames.

The capture is taken at the hit (the kernel copies it into the perf sample,
the ptrace engine reads it while the thread is stopped); the walk and the
names come later, in user space, from the process's maps and files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from uprobes.elf.framerule import RA, RSP
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.errors import UprobesError, UsageError
from uprobes.model.event import Event, Frame, Hit, ProbeInfo, hit_event
from uprobes.unwind.cfi import CfiTable
from uprobes.unwind.cpython.reader import PyGroups, interleave
from uprobes.unwind.space import AddressSpaces
from uprobes.unwind.stack import Reads, SameWalk, StackCopy, unwind

DEFAULT_STACK_BYTES = 8192  # as perf record --call-graph dwarf: most C stacks fit
# A perf sample is at most 64 KiB (its header's u16 size), the copy included;
# the kernel trims a bigger request (perf_sample_ustack_size()).
MAX_STACK_BYTES = 65528 - 4096


def check_stack_bytes(n: int, what: str = "--stack-bytes") -> None:
    """UsageError unless `n` bytes of stack can be copied at a hit."""
    if not (8 <= n <= MAX_STACK_BYTES and n % 8 == 0):
        raise UsageError(f"{what} must be a multiple of 8 from 8 to {MAX_STACK_BYTES}")


@dataclass(frozen=True)
class StackCapture:
    """Registers by DWARF number (RA = 16 holds the ip) and the stack copy;
    `python`: the Python frames the thread ran, when they were read
    (`uprobes.unwind.cpython`), to stand in for the eval loop's frames."""

    regs: dict[int, int]
    stack: StackCopy
    python: PyGroups | None = None

    def returned(self) -> StackCapture:
        """The capture as it is after a `ret` at this point: ip = the word at
        sp, sp one word up (how a probe on a function's `ret` is shown as the
        kernel's uretprobe shows it: in the caller, at the return address)."""
        sp = self.regs.get(RSP, 0)
        ret = self.stack.u64(sp)
        if ret is None:
            return self
        regs = dict(self.regs)
        regs[RA], regs[RSP] = ret, sp + 8
        return StackCapture(regs, self.stack, self.python)


class Symbolizer:
    """Walks captures and names their frames, for a run over many processes
    (maps and per-file tables are cached across hits)."""

    MEMO_MAX = 4096  # places (pid, ip, sp) whose walks are remembered
    WALKS_PER_PLACE = 4

    def __init__(self) -> None:
        self.spaces = AddressSpaces()
        # (pid, ip, sp) -> the walks from there: what each read and the
        # frames it found. A hot probe hit from the same places reads the
        # same words each time: checking them costs a fraction of a walk.
        self._walks: dict[tuple[int, int, int], list[tuple[int, SameWalk, tuple[Frame, ...]]]] = {}
        self.walked = self.remembered = 0  # walks made, walks found in the memo
        self._mixed: dict[tuple[int, int], tuple[tuple[Frame, ...], PyGroups, tuple[Frame, ...]]] \
            = {}

    def preload(self, paths: Iterable[str]) -> None:
        """Read the CFI and symbols of files every stack will start in (the
        probed files) now: a first walk that reads libc's is time in which
        the kernel's rings fill unread."""
        for path in set(paths):
            try:
                image = ElfImage.open(path)
                CfiTable.load(image)
                SymbolTable.load(image)
            except UprobesError:
                continue  # named as well as can be when a hit comes

    def frames(self, pid: int, capture: StackCapture) -> tuple[Frame, ...]:
        """The frames of `capture` in process `pid`, innermost first: the
        hit's ip, then each caller (named by its call)."""
        native = self._native(pid, capture)
        py = capture.python
        if py is None:
            return native
        # Remembered walks and Python frames are handed on as the same
        # tuples: so is their interleaving (both kept, so their ids stay theirs).
        key = (id(native), id(py))
        mixed = self._mixed.get(key)
        if mixed is not None and mixed[0] is native and mixed[1] is py:
            return mixed[2]
        frames = interleave(native, py)
        if len(self._mixed) >= self.MEMO_MAX:
            del self._mixed[next(iter(self._mixed))]
        self._mixed[key] = (native, py, frames)
        return frames

    def _native(self, pid: int, capture: StackCapture) -> tuple[Frame, ...]:
        spaces = self.spaces
        regs, stack = capture.regs, capture.stack
        generation = spaces.generation(pid)
        key = (pid, regs[RA], regs.get(RSP, 0))
        walks = self._walks.get(key)
        if walks is not None:
            for seen, walk, native in walks:
                if seen == generation and walk.same(regs, stack):
                    self.remembered += 1
                    return native
        reads: Reads = []
        addrs = unwind(regs, stack, spaces.rule_finder(pid), reads=reads)
        native = tuple(spaces.frame(pid, a, return_address=i > 0) for i, a in enumerate(addrs))
        self.walked += 1
        if walks is None:
            if len(self._walks) >= self.MEMO_MAX:
                del self._walks[next(iter(self._walks))]
            walks = self._walks[key] = []
        if len(walks) >= self.WALKS_PER_PLACE:
            del walks[0]
        walks.append((generation, SameWalk.of(reads, stack), native))
        return native


def stack_delivery(infos: dict[str, ProbeInfo], on_event: Callable[[Event], None],
                   symbolizer: Symbolizer) -> Callable[[list[Hit]], None]:
    """What an engine's `run()` hands its hits to when stacks are on: each
    hit is a `Hit` followed by its `StackCapture` (None: none was taken),
    delivered as an `Event` with its `stack`."""
    def deliver(hits: list[Hit]) -> None:
        for hit in hits:
            capture = hit[9]  # type: ignore[misc]
            stack = None if capture is None else symbolizer.frames(hit[1], capture)
            on_event(hit_event(hit[:9], infos[hit[4]], stack))
    return deliver
