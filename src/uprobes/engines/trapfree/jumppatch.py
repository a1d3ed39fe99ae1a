"""Trap-free counting probes: a `jmp` over the probed instructions, counters in shared memory.

An int3 costs a ptrace stop per hit, microseconds even from a tracer in C
(docs/benchmarks.md).
A probe that only counts needs no tracer at the hit: its first whole
instructions covering 5 bytes become `jmp rel32` to a trampoline in the XOL
area (trampoline.py) that increments a counter and runs them relocated.

The counters live in a memfd that the tracee maps MAP_SHARED near its XOL
area (sharedmem.py: injected memfd_create/mmap/close, the same remote syscalls
that map the XOL area) and that the tracer maps too. So the tracer reads
counts without a system call, a forked child adds into its parent's
counters (it inherits the patch and the shared mapping: the sum is what a
count of all processes wants, with no per-fork bookkeeping), and a process
that exits or execs loses nothing (the tracer holds the memfd).

A jump patch is refused (the probe keeps its int3, with the reason in a
note) unless, checked from the file (fileplan.py) and at patch time:
- a function symbol with a size holds the patched bytes, and they decode
  as whole instructions that the trampoline can move without a trap
  (trampoline.py: no indirect jump or call, a jmp/call/ret only last);
- no direct branch of any function of the file targets the interior of the
  patched bytes (a .cold fragment or an assembly entry jumping into them);
  the function's indirect jumps, if any, are computed gotos whose targets
  the file names (fileplan.py), none inside the patched bytes;
- no other probe (placed or to be placed) lies inside them;
- memory holds the file's bytes there, every thread of the process is in a
  ptrace stop, none has its rip inside them (the 5 bytes are written while
  nothing runs), and no signal handler running on a thread will return
  inside them (the saved rip of each signal frame on its stack).

Known limits: a fault of a displaced
instruction reports the trampoline's address to the program's handler.
Detach writes the original bytes back; trampolines and counters stay
mapped (a thread may be inside one; its jump back lands on the original
code), as the XOL areas do.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from uprobes.analysis.keyed import Aggregate
from uprobes.engines.tracee.relocate import UnsupportedInstruction
from uprobes.engines.tracee.xol import InjectionRefused, XolArea, candidates, remote_syscall
from uprobes.engines.trapfree import (
    filtercode,
    keyed,
    pyguard,
    recording,
    stackbounds,
    timing,
    trampoline,
)
from uprobes.engines.trapfree.fileplan import FilePlan, NotTrapFree
from uprobes.engines.trapfree.filtercode import Check, CommCache, comm_tests
from uprobes.engines.trapfree.kernelmaps import SCRATCH_BYTES, Call, hand_over, retire
from uprobes.engines.trapfree.keyed import COMM, KeyedBlock, Source
from uprobes.engines.trapfree.layout import (
    COUNTER_BLOCK_BYTES,
    COUNTER_STRIDE,
    COUNTER_TLS,
    COUNTER_UNNAMED,
    KEYED_BYTES,
    KEYED_TLS,
    KEYED_UNNAMED,
    LONG,
    NO_KEPT_VERDICTS,
    RING_TLS,
    TIMING_BYTES,
    TIMING_TLS,
    TIMING_UNNAMED,
    RingShape,
)
from uprobes.engines.trapfree.recording import Recipe, Waits
from uprobes.engines.trapfree.renames import RenameWatch
from uprobes.engines.trapfree.ring import Ring
from uprobes.engines.trapfree.sandboxes import SeccompWatch
from uprobes.engines.trapfree.sharedmem import map_shared, most_hits
from uprobes.engines.trapfree.timing import TimingBlock
from uprobes.engines.trapfree.trampoline import Displaced
from uprobes.errors import EngineError, UprobesError
from uprobes.model.pyguard import PyGuard
from uprobes.sys import procfs, ptrace
from uprobes.sys.procmem import ProcessMemory

_INT3 = b"\xcc"
_NOP = b"\x90"
_MEMFD_NAME = b"uprobes-counters\0"  # the counters' and the rings' memfd
_MASK64 = (1 << 64) - 1
_NR_MMAP = 9
_SIZING_SEAL = 1 << 40  # any address: the guard's code is the same size for all
_SCRATCH_COUNTERS = (SCRATCH_BYTES + COUNTER_STRIDE - 1) // COUNTER_STRIDE


# ---------------------------------------------------------------- counters


class CounterBlock:
    """One memfd of counters: mapped in a tracee at `runtime_addr` and here."""

    def __init__(self, view: mmap.mmap, runtime_addr: int) -> None:
        self.view = view
        self.runtime_addr = runtime_addr
        self.used = 1  # index 0 is the header line (layout.COUNTER_TLS)
        self._seen: list[tuple[int, float]] = [(0, time.monotonic())]  # per counter: (value
        # as last read, when)
        self.corrupt = 0  # reads of a counter that no run of hits can have left

    def alloc(self) -> int | None:
        """A fresh counter's index, None when full (shared by all processes
        that map the block: a forked child's new probe gets its own)."""
        if (self.used + 1) * COUNTER_STRIDE > len(self.view):
            return None
        self.used += 1
        self._seen.append((0, time.monotonic()))  # a new memfd's bytes are 0
        return self.used - 1

    def alloc_run(self, n: int) -> int | None:
        """The first of `n` fresh counters in a row (memory for a name test's
        verdicts, filtercode.CommCache), None when they do not fit."""
        if (self.used + n) * COUNTER_STRIDE > len(self.view):
            return None
        first = self.used
        for _ in range(n):
            self.alloc()
        return first

    def addr(self, index: int) -> int:
        return self.runtime_addr + index * COUNTER_STRIDE

    def tls_confirmed(self) -> None:
        self.view[COUNTER_TLS] = 1

    def no_kept_verdicts(self) -> None:
        self.view[COUNTER_TLS + NO_KEPT_VERDICTS] = 1

    def read(self, index: int) -> int:
        return int(struct.unpack_from("<Q", self.view, index * COUNTER_STRIDE)[0])

    def gained(self, index: int) -> int:
        """What counter `index` gained since the last call, if hits can have
        made that many since; else 0, counted in `corrupt` (the program
        wrote it: the next gain counts from what it wrote)."""
        raw, now = self.read(index), time.monotonic()
        last, at = self._seen[index]
        self._seen[index] = (raw, now)
        gained = (raw - last) & _MASK64
        if gained > most_hits(now - at):
            self.corrupt += 1
            return 0
        return gained

    def pending(self, index: int) -> int:
        """What `gained` would give now, with nothing changed (any thread may ask)."""
        last, at = self._seen[index]
        gained = (self.read(index) - last) & _MASK64
        return 0 if gained > most_hits(time.monotonic() - at) else gained


def map_counters(tid: int, regs: ptrace.UserRegs, pid: int, syscall_addr: int, name_addr: int,
                 near: int, held: list[int]) -> CounterBlock:
    """A new block of counters shared between process `pid` (through its
    stopped thread `tid`) and us, within rel32 reach of `near`."""
    view, addr = map_near(tid, regs, pid, syscall_addr, name_addr, near, held, COUNTER_BLOCK_BYTES)
    return CounterBlock(view, addr)


def map_near(tid: int, regs: ptrace.UserRegs, pid: int, syscall_addr: int, name_addr: int,
             near: int, held: list[int], size: int, populate: bool = False
             ) -> tuple[mmap.mmap, int]:
    """`size` bytes of shared memory (sharedmem.py) in process `pid` within
    rel32 reach of `near`, and here: (our view, its address there)."""
    try:
        return map_shared(tid, regs, pid, syscall_addr, name_addr, size,
                          mmap.PROT_READ | mmap.PROT_WRITE,
                          candidates(procfs.maps(pid), near, size), held, populate)
    except InjectionRefused as e:  # not a question of where: none can be made
        raise NotTrapFree(str(e)) from None
    except EngineError as e:
        raise NotTrapFree(f"no shared memory within 2 GiB of {near:#x}: {e}") from None


SIGFRAME_SCAN = 64 * 1024  # bytes of a thread's stack searched for signal frames
# struct rt_sigframe on x86-64: pretcode, then the ucontext: uc_flags, uc_link,
# uc_stack (24 bytes), then the sigcontext: r8..r15, rdi, rsi, rbp, rbx, rdx,
# rax, rcx, rsp, rip, eflags, then cs, gs, fs, ss (u16 each), ..., fpstate.
_UC_LINK, _SC_RIP, _SC_CS, _SC_FPSTATE = 16, 176, 192, 232
_FRAME_NEEDLE = struct.pack("<HHH", 0x33, 0, 0)  # cs (__USER_CS), gs, fs


def signal_frame_rips(stack: bytes, runtime_addr: int) -> list[int]:
    """The saved rips of what look like the kernel's signal frames in
    `stack` (bytes read at `runtime_addr`): 8-aligned, cs the user code
    segment, gs and fs 0, uc_link NULL, fpstate NULL or pointing just above
    the frame's start. A stray match only refuses a jump; a missed frame
    would let a handler return into one (the frames the kernel builds
    all match)."""
    out: list[int] = []
    at = stack.find(_FRAME_NEEDLE)
    while at >= 0:
        frame = at - _SC_CS
        if frame >= 0 and (runtime_addr + frame) % 8 == 0 \
                and frame + _SC_FPSTATE + 8 <= len(stack):
            uc_link, = struct.unpack_from("<Q", stack, frame + _UC_LINK)
            fpstate, = struct.unpack_from("<Q", stack, frame + _SC_FPSTATE)
            start = runtime_addr + frame
            if uc_link == 0 and (fpstate == 0 or start < fpstate < start + 64 * 1024):
                out.append(struct.unpack_from("<Q", stack, frame + _SC_RIP)[0])
        at = stack.find(_FRAME_NEEDLE, at + 1)
    return out


def _tid_at_thread_pointer(mem: ProcessMemory, fs_base: int, tid: int) -> bool:
    """Whether this thread's tid sits where glibc keeps it (struct pthread's
    `tid`, at the thread pointer + GLIBC_TID_OFFSET): then a trampoline reads
    it with one load instead of a gettid system call."""
    if not fs_base:
        return False
    try:
        got = mem.read(fs_base + recording.GLIBC_TID_OFFSET, 4)
    except UprobesError:
        return False
    return int.from_bytes(got, "little") == tid


def _entry_guard(check: Check, block: int) -> timing.EntryGuard:
    """`check` at a timed call's entry, in the timing block at `block`."""
    return filtercode.guard(check, block, TIMING_TLS, block + TIMING_UNNAMED, "rejected")


def _reaches(runtime_addr: int, size: int, area: XolArea) -> bool:
    """Whether code in `area` reaches all of `size` bytes at `runtime_addr`
    with rel32 displacements."""
    return area.reaches(runtime_addr) and area.reaches(runtime_addr + size)


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class JumpPatch:
    """A placed jump: `original` goes back at `runtime_addr` on detach."""

    runtime_addr: int
    original: bytes
    jump: bytes
    trampoline_addr: int
    trap: int | None = None  # its code's int3 (pyguard.trap_prologue), a nop on removal


@dataclass
class _Space:
    """Trap-free state of one address space (shared by its threads)."""

    patches: dict[int, JumpPatch] = field(default_factory=dict)
    blocks: list[CounterBlock] = field(default_factory=list)  # each near one XOL area
    rings: list[Ring] = field(default_factory=list)           # each near one XOL area
    timing: list[TimingBlock] = field(default_factory=list)   # each near one XOL area
    keyed: list[KeyedBlock] = field(default_factory=list)     # each near one XOL area
    name_addr: int | None = None
    tls_tid: bool | None = None  # recording: the tid at fs:GLIBC_TID_OFFSET in every thread
    tls_never: bool = False  # a fork family with a child whose thread block holds
    # another's tid (a raw fork): the tid is asked of the kernel for good (withdraw_tls)
    bounds: stackbounds.StackBounds | None = None  # the threads' stacks (stack copies)
    rename_word: int | None = None  # where the rename word is mapped (renames.py)
    seccomp_word: int | None = None  # where the seccomp word is mapped (sandboxes.py)
    verdicts_withdrawn: bool = False  # its family spans pid namespaces (span_pid_namespaces)


@dataclass(frozen=True)
class Record:
    """A recording probe's part of a jump patch: what it records, its id in the ring."""

    recipe: Recipe
    probe_id: int
    waits: Waits  # how long a hit waits for room in a full ring
    shape: RingShape = LONG  # the run's rings' slots (recording.shape_for)


@dataclass(frozen=True)
class Timed:
    """A timed function's part of a jump patch (timing.py): its index in the
    timing blocks; the patch is its entry, one of its rets (`ret`), or the
    whole function (the plan says)."""

    func: int
    ret: bool = False
    key: Source | None = None  # `latency --by ARG`: the value the entry keeps as the key
    check: Check | None = None  # --if/--tid/--comm, decided at the entry


@dataclass(frozen=True)
class Keyed:
    """A keyed count's part of a jump patch (keyed.py): its key and value."""

    key: Source
    value: Source | None
    check: Check | None = None  # --if/--tid, tested before the count


AreaFor = Callable[[int, int], XolArea]  # (near runtime_addr, bytes needed) -> area


def _with_cache(check: Check | None, timed: Timed | None, by: Keyed | None,
                cache: CommCache | None = None, seal: int | None = None
                ) -> tuple[Check | None, Timed | None, Keyed | None]:
    """The placement's checks, each with name tests keeping its verdicts in
    `cache` (if given) and guarded by the seccomp word at `seal` (if given)."""
    def kept(c: Check | None) -> Check | None:
        if c is None or not comm_tests(c.root):
            return c
        c = c if cache is None else replace(c, cache=cache)
        return c if seal is None else replace(c, seal=seal)
    return (kept(check) if check is not None else None,
            replace(timed, check=kept(timed.check)) if timed is not None else None,
            replace(by, check=kept(by.check)) if by is not None else None)


class TrapFree:
    """The tracer's trap-free probes: placement per address space, counts over all,
    the rings of recording probes."""

    def __init__(self) -> None:
        self._spaces: dict[object, _Space] = {}
        self._counters: dict[str, list[tuple[CounterBlock, int]]] = {}
        self.rings: list[Ring] = []
        self.timing: list[TimingBlock] = []
        self._keyed: dict[str, list[tuple[KeyedBlock, int]]] = {}  # name -> its tables
        self._frames: dict[tuple[int, int, int], list[int]] = {}  # see _interrupted
        self.decisions: dict[str, str | None] = {}  # probe name -> why not (None: trap-free)
        self._reported: set[str] = set()
        self._notes: list[str] = []  # said at the next `report`
        self._folding = threading.Lock()  # a fold against a peek in another thread
        self._renames: RenameWatch | str | None = None  # None: not needed yet; str: why not
        self._renames_told = False
        # The watch a failed hand-over left open: spaces mapped before still
        # read its word (their kept verdicts), so it runs until `close`.
        self._renames_kept: RenameWatch | None = None
        self._seccomp: SeccompWatch | str | None = None  # as _renames
        self._sealed, self._sealed_by = 0, 0  # see `sealed`
        self._words_left = False  # a word's mapping could not be retired (said once)

    def decide(self, name: str, why_not: str | None) -> None:
        """One place of probe `name` is trap-free (None) or not (why): a
        probe is trap-free when every place of it is."""
        if self.decisions.get(name) is None:
            self.decisions[name] = why_not

    @property
    def placed(self) -> bool:
        return bool(self._counters) or bool(self.rings) or bool(self.timing) \
            or bool(self._keyed)

    def place(self, mm: object, mem: ProcessMemory, pid: int, tid: int, regs: ptrace.UserRegs,
              plan: FilePlan, name: str, runtime_addr: int, taken: Iterable[int],
              threads: list[tuple[int, bool, int]], area_for: AreaFor,
              syscall_addr: Callable[[], int], held: list[int],
              record: Record | None = None, timed: Timed | None = None,
              by: Keyed | None = None, check: Check | None = None,
              py: Sequence[tuple[str, PyGuard]] = (), trap: Sequence[PyGuard] = (),
              on_trap: Callable[[int], None] | None = None) -> None:
        """Patch `plan` in at `runtime_addr` of `mm` (process `pid`; `tid` is
        its stopped thread lending itself to remote calls, `regs` its
        registers). `taken`: addresses of int3s there; `threads`: (tid,
        stopped, the tid it calls itself: in a PID namespace, another) of
        every thread of the process. `record`: the trampoline
        records into a ring (recording.py); `timed`: it times a function
        (timing.py); `by`: it counts by key under `name` (keyed.py); else it
        counts under `name`, the hits that pass `check` if given
        (filtercode.py); with `py`, (name, guard) pairs, each counts the
        calls of the Python function its guard keeps under its name
        (pyguard.py); with `trap`, a call any of these guards keeps stops at
        an int3 in the jump's code, whose address `on_trap` gets before the
        jump can lead there (pyguard.trap_prologue). NotTrapFree if it may
        not."""
        space = self._spaces.setdefault(mm, _Space())
        length = len(plan.original)
        end = runtime_addr + length
        if any(runtime_addr <= a < end for a in taken) or any(
                a < end and runtime_addr < a + len(p.original)
                for a, p in space.patches.items()):
            raise NotTrapFree("another breakpoint lies in the bytes a jump would replace")
        try:
            if mem.read(runtime_addr, length) != plan.original:
                raise NotTrapFree("the code in memory differs from the file")
        except UprobesError:
            raise NotTrapFree("the code is not readable") from None
        tls = space.tls_tid is not False
        for other, stopped, own in threads:
            if not stopped:
                raise NotTrapFree("threads of the process were running")
            try:
                r = regs if other == tid else ptrace.getregs(other, ptrace.UserRegs())
            except UprobesError:
                continue  # gone meanwhile (its exit not reaped yet)
            if runtime_addr < r.rip < end:
                raise NotTrapFree(f"thread {other} was inside the bytes a jump would replace")
            for rip in self._interrupted(mem, other, r):
                if runtime_addr < rip < end:
                    raise NotTrapFree(f"a signal handler of thread {other} runs, and the code "
                                      "it interrupted is inside the bytes a jump would replace")
            if (record, timed, by, check) != (None, None, None, None) and tls \
                    and space.tls_tid is None:
                tls = _tid_at_thread_pointer(mem, r.fs_base, own)
        displaced = [Displaced(runtime_addr + off, raw) for off, raw in plan.displaced]
        named = self._keeps_verdicts(check, timed, by)
        if named:  # sized with a cache; the real one once the area is known
            check, timed, by = _with_cache(check, timed, by, CommCache(0, (0,) * named))
        seal = _SIZING_SEAL if self._asks_names(check, timed, by) else 0
        if seal:  # (likewise)
            check, timed, by = _with_cache(check, timed, by, seal=seal)
        if record is not None:
            space.tls_tid = tls
            size = trampoline.max_size(displaced, recording.prologue_size(record.recipe, tls))
        elif timed is not None:
            space.tls_tid = tls
            size = trampoline.max_size(displaced, timing.code_size(
                None if timed.key is None else keyed.timing_key(timed.key, runtime_addr, seal),
                None if timed.check is None else partial(_entry_guard, timed.check)))
        elif by is not None:
            space.tls_tid = tls
            size = trampoline.max_size(displaced, keyed.prologue_size(by.value is not None) + (
                0 if by.check is None else filtercode.prologue_size(by.check)))
        elif check is not None:
            space.tls_tid = tls
            size = trampoline.max_size(displaced, filtercode.prologue_size(check))
        elif py:
            size = trampoline.max_size(displaced, pyguard.prologue_size([g for _, g in py]))
        elif trap:
            size = trampoline.max_size(displaced, pyguard.prologue_size(trap, trap=True))
        else:
            size = trampoline.max_size(displaced)
        area = area_for(runtime_addr, size)
        if named:
            check, timed, by = _with_cache(check, timed, by, self._comm_cache(
                space, area, named, tid, regs, pid, syscall_addr, held, mem))
        if seal:
            seal = self._seal(space, area, tid, regs, pid, syscall_addr, held, mem)
            check, timed, by = _with_cache(check, timed, by, seal=seal)
        prologue: Callable[[int], bytes]  # the trampoline's address -> its first part
        counters: list[tuple[str, CounterBlock, int]] = []
        ret_prologue: Callable[[int], bytes] | None = None
        table: tuple[KeyedBlock, int] | None = None
        if by is not None:
            table = self._table_near(space, area, tid, regs, pid, syscall_addr, held, mem)
            if tls:
                table[0].tls_confirmed()
            block_at, slot = table[0].runtime_addr, table[1]
            guard = None if by.check is None else filtercode.guard(
                by.check, block_at, KEYED_TLS, block_at + KEYED_UNNAMED)
            prologue = lambda at: keyed.prologue(  # noqa: E731
                at, block_at, slot, by.key, by.value, guard, seal)
        elif timed is not None:
            rows = self._timing_near(space, area, tid, regs, pid, syscall_addr, held, mem)
            if tls:
                rows.tls_confirmed()
            block_addr, func, by_key = rows.runtime_addr, timed.func, timed.key is not None
            key = None if timed.key is None else keyed.timing_key(timed.key, block_addr, seal)
            entry_guard = None if timed.check is None else _entry_guard(timed.check, block_addr)
            filtered = entry_guard is not None
            prologue = lambda at: timing.entry_code(  # noqa: E731
                at, block_addr, key, entry_guard)
            if plan.whole:
                ret_prologue = lambda at: timing.return_code(  # noqa: E731
                    at, block_addr, func, by_key, filtered)
            elif timed.ret:
                prologue = lambda at: timing.return_code(  # noqa: E731
                    at, block_addr, func, by_key, filtered)
        elif trap:
            guards = list(trap)
            prologue = lambda at: pyguard.trap_prologue(at, guards)  # noqa: E731
        elif record is None:
            def fresh() -> tuple[CounterBlock, int]:
                block, index = self._counter_near(space, area)
                if block is None or index is None:
                    block = map_counters(tid, regs, pid, syscall_addr(),
                                         self._name(space, area, mem), area.start, held)
                    space.blocks.append(block)
                    index = block.alloc()
                    assert index is not None
                return block, index
            if py:
                kept = [(g, *fresh()) for _, g in py]
                counters = [(n, b, i) for (n, _), (_, b, i) in zip(py, kept)]
                tests = [(g, b.addr(i)) for g, b, i in kept]
                prologue = lambda at: pyguard.counting_prologue(at, tests)  # noqa: E731
            else:
                block, index = fresh()
                counters = [(name, block, index)]
                counter_addr = block.addr(index)
                prologue = lambda at: trampoline.counting_prologue(  # noqa: E731
                    at, counter_addr)
                if check is not None:
                    if tls:
                        block.tls_confirmed()
                    block_addr, test = block.runtime_addr, check
                    prologue = lambda at: filtercode.counting_prologue(  # noqa: E731
                        at, counter_addr, block_addr, test)
        else:
            shape = record.shape
            ring = next((r for r in space.rings if r.shape == shape
                         and _reaches(r.runtime_addr, shape.ring_bytes, area)), None)
            if ring is None:
                view, addr = map_near(tid, regs, pid, syscall_addr(),
                                      self._name(space, area, mem), area.start, held,
                                      shape.ring_bytes, populate=True)
                ring = Ring(view, addr, shape)
                space.rings.append(ring)
                self.rings.append(ring)
            ring.probe_ids.add(record.probe_id)
            ring_addr, how = ring.runtime_addr, record
            bounds = 0 if not record.recipe.copy else self._bounds(
                space, mem, pid, tid, regs, threads, syscall_addr, held).addr
            seal = 0 if record.recipe.py is None else self._seal(
                space, area, tid, regs, pid, syscall_addr, held, mem)
            prologue = lambda at: recording.prologue(  # noqa: E731
                at, ring_addr, how.recipe, how.probe_id, tls, how.waits, shape, bounds, seal)
        at = area.alloc(size)
        if at is None:
            raise NotTrapFree("the XOL area is full")
        try:
            code = trampoline.build(at, prologue, displaced, end, plan.at_return, ret_prologue)
            jump = trampoline.jmp_rel32(runtime_addr, at)
        except (UnsupportedInstruction, ValueError) as e:
            raise NotTrapFree(str(e)) from None
        mem.write(at, code)
        stop = None
        if trap:
            stop = at + len(prologue(at)) - pyguard.TRAP_FROM_END
            if on_trap is not None:
                on_trap(stop)
        mem.write(runtime_addr, jump + _INT3 * (length - len(jump)))
        space.patches[runtime_addr] = JumpPatch(runtime_addr, plan.original, jump, at, stop)
        for counted, block, index in counters:
            self._counters.setdefault(counted, []).append((block, index))
        if table is not None:
            self._keyed.setdefault(name, []).append(table)

    def _asks_names(self, *parts: Check | Timed | Keyed | None) -> bool:
        """Whether the placed code asks for the thread's name (a `comm` test,
        a name key) and a seccomp word can guard its prctl (`guard_syscalls`
        was asked when its process was judged: no word, no guard, as before)."""
        if not isinstance(self._seccomp, SeccompWatch):
            return False
        for part in parts:
            c = part if isinstance(part, Check) or part is None else part.check
            if c is not None and comm_tests(c.root) or \
                    not isinstance(part, Check) and part is not None and part.key is COMM:
                return True
        return False

    def _keeps_verdicts(self, *parts: Check | Timed | Keyed | None) -> int:
        """How many name tests the placed code asks for (0 if none, or if
        the kernel will not move a rename word: then each hit asks)."""
        tests = 0
        for part in parts:
            c = part if isinstance(part, Check) or part is None else part.check
            tests = max(tests, 0 if c is None else len(comm_tests(c.root)))
        if tests and self._renames is None:
            self._renames = RenameWatch.open()
        return tests if isinstance(self._renames, RenameWatch) else 0

    def _comm_cache(self, space: _Space, area: XolArea, tests: int, tid: int,
                    regs: ptrace.UserRegs, pid: int, syscall_addr: Callable[[], int],
                    held: list[int], mem: ProcessMemory) -> CommCache | None:
        """The rename word mapped in the process (once per address space)
        and a verdict table per name test; None (each hit asks the kernel)
        if the word cannot be handed over."""
        assert isinstance(self._renames, RenameWatch)
        per = filtercode.COMM_TABLE_BYTES // COUNTER_STRIDE
        block, first = self._counter_run(space, area, tid, regs, pid, syscall_addr, held, mem,
                                          tests * per + _SCRATCH_COUNTERS)
        if space.rename_word is None:
            scratch = block.addr(first + tests * per)
            try:
                space.rename_word = self._renames.hand_over(
                    tid, regs, pid, syscall_addr(), scratch, mem.write, mem.read, held)
            except (EngineError, OSError) as e:
                self._give_up_renames(f"the rename word could not be mapped in process {pid}: "
                                      f"{e}")
                return None
            finally:
                mem.write(scratch, bytes(SCRATCH_BYTES))
        return CommCache(space.rename_word,
                         tuple(block.addr(first + n * per) for n in range(tests)))

    def _give_up_renames(self, why: str) -> None:
        """No more kept verdicts (each hit asks): the watch is closed now
        (its BPF programs detached) unless a space already reads its word,
        then at `close`."""
        watch = self._renames
        assert isinstance(watch, RenameWatch)
        self._renames = why
        if any(space.rename_word is not None for space in self._spaces.values()):
            self._renames_kept = watch
        else:
            watch.close()

    def rename_word(self) -> int | None:
        """The rename word now, read from our own mapping of it (no system
        call), for the names of int3 hits (ptrace/tasks.py `comm_now`);
        None if no placed code keeps verdicts under one."""
        return self._renames.value() if isinstance(self._renames, RenameWatch) else None

    def _counter_run(self, space: _Space, area: XolArea, tid: int, regs: ptrace.UserRegs,
                     pid: int, syscall_addr: Callable[[], int], held: list[int],
                     mem: ProcessMemory, need: int) -> tuple[CounterBlock, int]:
        """`need` fresh counters in a row within reach of `area` (a new block
        if need be): (the block, the first's index)."""
        block = next((b for b in space.blocks if area.reaches(b.runtime_addr)
                      and (b.used + need) * COUNTER_STRIDE <= len(b.view)), None)
        if block is None:
            block = map_counters(tid, regs, pid, syscall_addr(),
                                 self._name(space, area, mem), area.start, held)
            space.blocks.append(block)
        first = block.alloc_run(need)
        assert first is not None
        return block, first

    def guard_syscalls(self, pid: int) -> str | None:
        """Code that makes system calls in process `pid` is about to be
        judged against its seccomp filters (it is stopped): from now on its
        calls that may install a filter move the seccomp word (sandboxes.py),
        which that code reads before each call. Why it cannot be, if so."""
        if self._seccomp is None:
            self._seccomp = SeccompWatch.start()
        if isinstance(self._seccomp, str):
            return f"no kernel-kept seccomp word guards them ({self._seccomp})"
        self._seccomp.follow(pid)
        return None

    def forked(self, pid: int) -> None:
        """A new process `pid` (a fork or vfork child, before its first
        instruction) runs our code: its seccomp calls move the word too."""
        if isinstance(self._seccomp, SeccompWatch):
            self._seccomp.follow(pid)

    def _seal(self, space: _Space, area: XolArea, tid: int, regs: ptrace.UserRegs, pid: int,
              syscall_addr: Callable[[], int], held: list[int], mem: ProcessMemory) -> int:
        """The seccomp word's address in the process (mapped once per address
        space: `guard_syscalls` was asked first); NotTrapFree if it cannot be."""
        if space.seccomp_word is None:
            if not isinstance(self._seccomp, SeccompWatch):
                raise NotTrapFree("its system calls in the program have no seccomp word to "
                                  "guard them")
            block, first = self._counter_run(space, area, tid, regs, pid, syscall_addr, held,
                                              mem, _SCRATCH_COUNTERS)
            scratch = block.addr(first)
            try:
                space.seccomp_word = hand_over(self._seccomp.words, "seccomp", tid, regs, pid,
                                               syscall_addr(), scratch, mem.write, mem.read,
                                               held)
            except (EngineError, OSError) as e:
                raise NotTrapFree(f"the seccomp word that guards its system calls in the "
                                  f"program could not be mapped: {e}") from None
            finally:
                mem.write(scratch, bytes(SCRATCH_BYTES))
        return space.seccomp_word

    @property
    def sealed(self) -> tuple[int, int]:
        """(Hits recorded without their Python frames because the seccomp
        word had moved, the pid that last moved it)."""
        if isinstance(self._seccomp, SeccompWatch):
            self._sealed_by = self._seccomp.last()
        return self._sealed + sum(r.sealed() for r in self.rings), self._sealed_by

    def close_rings(self) -> None:
        """Our views of the rings closed (the programs keep theirs); what
        they counted kept."""
        self._sealed = self.sealed[0]
        for ring in self.rings:
            ring.close()
        self.rings.clear()

    def close(self) -> None:
        """Stop the kernel's rename word (after the detach: no code reads it)."""
        if isinstance(self._renames, RenameWatch):
            self._renames.close()
            self._renames = "closed"
        if self._renames_kept is not None:
            self._renames_kept.close()
            self._renames_kept = None
        if isinstance(self._seccomp, SeccompWatch):
            self._seccomp.close()
            self._seccomp = "closed"

    def _timing_near(self, space: _Space, area: XolArea, tid: int, regs: ptrace.UserRegs,
                     pid: int, syscall_addr: Callable[[], int], held: list[int],
                     mem: ProcessMemory) -> TimingBlock:
        """The space's timing block within reach of `area`, mapped if it has none."""
        for block in space.timing:
            if _reaches(block.runtime_addr, TIMING_BYTES, area):
                return block
        view, addr = map_near(tid, regs, pid, syscall_addr(), self._name(space, area, mem),
                              area.start, held, TIMING_BYTES)
        block = TimingBlock(view, addr)
        space.timing.append(block)
        self.timing.append(block)
        return block

    def _table_near(self, space: _Space, area: XolArea, tid: int, regs: ptrace.UserRegs,
                    pid: int, syscall_addr: Callable[[], int], held: list[int],
                    mem: ProcessMemory) -> tuple[KeyedBlock, int]:
        """A fresh keyed table within reach of `area` (a new block if need be)."""
        for block in space.keyed:
            if _reaches(block.runtime_addr, KEYED_BYTES, area):
                index = block.alloc()
                if index is not None:
                    return block, index
        view, addr = map_near(tid, regs, pid, syscall_addr(), self._name(space, area, mem),
                              area.start, held, KEYED_BYTES)
        block = KeyedBlock(view, addr)
        space.keyed.append(block)
        index = block.alloc()
        assert index is not None
        return block, index

    def by_key(self, name: str, signed: bool) -> tuple[dict[int, Aggregate], int]:
        """Probe `name`'s counts by raw key over all its tables, and the hits
        that found no place."""
        out: dict[int, Aggregate] = {}
        overflow = 0
        for block, index in self._keyed.get(name, []):
            got, lost = block.read(index, signed)
            overflow += lost
            for key, agg in got.items():
                mine = out.setdefault(key, Aggregate())
                mine.merge(agg)
        return out, overflow

    def _bounds(self, space: _Space, mem: ProcessMemory, pid: int, tid: int, regs: ptrace.UserRegs,
                threads: list[tuple[int, bool, int]], syscall_addr: Callable[[], int],
                held: list[int]) -> stackbounds.StackBounds:
        """The address space's stack table (stackbounds.py), mapped (an
        injected mmap, read-only there) and filled with the stacks of its
        threads (all stopped) the first time."""
        if space.bounds is not None:
            return space.bounds
        try:
            addr = remote_syscall(tid, regs, syscall_addr(), _NR_MMAP, (
                0, stackbounds.SIZE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0),
                held)
        except InjectionRefused as e:
            raise NotTrapFree(str(e)) from None
        if addr < 0:
            raise NotTrapFree(f"no memory for the table of its threads' stacks (errno {-addr})")
        space.bounds = bounds = stackbounds.StackBounds(addr)
        maps = procfs.maps(pid)
        now: dict[int, ptrace.UserRegs] = {}
        for other, _, _ in threads:
            try:
                now[other] = regs if other == tid else ptrace.getregs(other, ptrace.UserRegs())
            except UprobesError:
                continue  # gone meanwhile
        # Stacks do not overlap: a thread's stack starts above the next top below its own.
        tops = sorted(r.fs_base for r in now.values())
        for other, r in now.items():
            below = [t for t in tops if t < r.fs_base]
            self._track(bounds, mem, pid, other, stackbounds.stack_span(
                pid, other, r.rsp, maps, top=r.fs_base, base=below[-1] if below else None))
        return bounds

    def _track(self, bounds: stackbounds.StackBounds, mem: ProcessMemory, pid: int, tid: int,
               span: tuple[int, int] | None) -> None:
        """Thread `tid`'s stack `span` into the table (None: it copies none);
        a full table is said once (`report`)."""
        if span is None:
            bounds.drop(mem, tid)
        elif not bounds.set(mem, tid, span) and not bounds.full_noted:
            bounds.full_noted = True
            self._notes.append(
                f"process {pid} has more than {stackbounds.SLOTS} threads: the trap-free stack "
                "copies of the threads past them copy nothing (their stacks show the probed "
                "function alone); --no-trapfree copies every thread's")

    def thread_born(self, mm: object, mem: ProcessMemory, pid: int, tid: int, sp: int,
                    base: int | None) -> None:
        """A new thread `tid` of `mm` (not yet run) whose stack pointer starts
        at `sp`, the top of its stack (from `base`, if its clone said): its
        stack goes in the table, if the space has one."""
        space = self._spaces.get(mm)
        if space is None or space.bounds is None:
            return
        try:
            self._track(space.bounds, mem, pid, tid,
                        stackbounds.stack_span(pid, tid, sp, top=sp, base=base))
        except UprobesError:
            pass  # the process is gone

    def thread_gone(self, mm: object, mem: ProcessMemory, tid: int) -> None:
        """Thread `tid` of `mm` ended: its stack leaves the table."""
        space = self._spaces.get(mm)
        if space is not None and space.bounds is not None:
            try:
                space.bounds.drop(mem, tid)
            except UprobesError:
                pass  # the process is gone

    def confirm_tls(self, mm: object, mem: ProcessMemory, fs_base: int, tid: int) -> None:
        """A stopped thread of `mm` that calls itself `tid` (its pid
        namespace's numbering) whose thread pointer is `fs_base`: if that
        tid is at glibc's place there, `mm`'s timing and recording code reads it there
        from now on (a command's probes go in at its exec, before the
        dynamic linker sets the thread pointer up)."""
        space = self._spaces.get(mm)
        if space is None or space.tls_tid or space.tls_never \
                or not (space.timing or space.keyed or space.blocks or space.rings):
            return
        if _tid_at_thread_pointer(mem, fs_base, tid):
            space.tls_tid = True
            for ring in space.rings:
                ring.tls_confirmed()
            for rows in space.timing:
                rows.tls_confirmed()
            for tables in space.keyed:
                tables.tls_confirmed()
            for counters in space.blocks:
                counters.tls_confirmed()

    def check_fork_tls(self, mm: object, mem: ProcessMemory, fs_base: int, tid: int) -> bool:
        """A forked child `mm`, stopped before its first instruction, whose
        only thread is `tid` (as it sees itself) with thread pointer
        `fs_base`: if glibc's tid there is not its own (a raw fork or clone
        system call leaves the parent's; glibc's fork has the kernel write
        the child's), the code its family shares with it must not read the
        tid there: the shared blocks' flags go to 0 and stay so, and every
        process of the family asks the kernel (gettid) from now on. Code
        that records into a ring, placed once the tid was seen there, reads
        it with no flag and keeps doing so. True if withdrawn."""
        space = self._spaces.get(mm)
        if space is None or space.tls_never or not space.tls_tid:
            return False
        if _tid_at_thread_pointer(mem, fs_base, tid):
            return False
        for other in self._family(space):
            other.tls_tid, other.tls_never = False, True
        for counters in space.blocks:
            counters.view[COUNTER_TLS] = 0
        for ring in space.rings:
            ring.words[RING_TLS // 8] = 0
        for rows in space.timing:
            rows.tls_withdrawn()
        for tables in space.keyed:
            tables.view[KEYED_TLS] = 0
        return True

    def _family(self, space: _Space) -> list[_Space]:
        """`space` and every address space sharing a block with it (a fork
        family: the children map their parent's shared memory)."""
        def blocks(s: _Space) -> tuple[object, ...]:
            return (*s.blocks, *s.rings, *s.timing, *s.keyed)
        shared = {id(b) for b in blocks(space)}
        return [other for other in self._spaces.values()
                if other is space or any(id(b) in shared for b in blocks(other))]

    def span_pid_namespaces(self, mm: object, child: int, parent: int) -> bool:
        """Whether fork child `child` (of `mm`, not yet run) is in another pid
        namespace than `parent`: its family then has two, where two threads
        may have one tid, so a --comm verdict kept by tid could be another
        process's, and its shared code keeps none from now on (each hit asks
        the kernel). True the first time for a family that keeps verdicts
        (only then are the namespaces read)."""
        space = self._spaces.get(mm)
        if space is None or space.rename_word is None or space.verdicts_withdrawn \
                or procfs.ns_depth(child) == procfs.ns_depth(parent):
            return False
        for other in self._family(space):
            other.verdicts_withdrawn = True
        for counters in space.blocks:
            counters.no_kept_verdicts()
        for rows in space.timing:
            rows.no_kept_verdicts()
        for tables in space.keyed:
            tables.no_kept_verdicts()
        return True

    def release_thread(self, mm: object, tid: int,
                       funcs: Sequence[int] = ()) -> list[dict[int, list[int]]]:
        """A thread of `mm` exited: its timing rows are free for a new thread;
        its histograms of timed functions `funcs`, taken out of them."""
        space = self._spaces.get(mm)
        return [] if space is None else [block.release(tid, funcs) for block in space.timing]

    def _interrupted(self, mem: ProcessMemory, tid: int, regs: ptrace.UserRegs) -> list[int]:
        """Where the signal handlers running on this stopped thread will
        return to: the saved rip of each signal frame on its stack (cached
        while the thread stays stopped where it is)."""
        key = (tid, regs.rsp, regs.rip)
        found = self._frames.get(key)
        if found is None:
            try:
                stack = mem.read_upto(regs.rsp, SIGFRAME_SCAN)
            except UprobesError:
                stack = b""
            found = self._frames[key] = signal_frame_rips(stack, regs.rsp)
        return found

    @staticmethod
    def _name(space: _Space, area: XolArea, mem: ProcessMemory) -> int:
        """The memfd's name in the process (written once into an XOL area)."""
        if space.name_addr is None:
            space.name_addr = area.alloc(len(_MEMFD_NAME))
            if space.name_addr is None:
                raise NotTrapFree("the XOL area is full")
            mem.write(space.name_addr, _MEMFD_NAME)
        return space.name_addr

    @staticmethod
    def _counter_near(space: _Space, area: XolArea) -> tuple[CounterBlock | None, int | None]:
        """A free counter within rel32 reach of `area`, if a block has one."""
        for block in space.blocks:
            if area.reaches(block.runtime_addr):  # its margin covers both spans
                index = block.alloc()
                if index is not None:
                    return block, index
        return None, None

    def fork(self, parent: object, child: object) -> None:
        """A forked child has the parent's patches (and shares its counters and rings)."""
        space = self._spaces.get(parent)
        if space is not None:
            self._spaces[child] = _Space(dict(space.patches), list(space.blocks),
                                         list(space.rings), list(space.timing),
                                         list(space.keyed), space.name_addr, space.tls_tid,
                                         space.tls_never,
                                         None if space.bounds is None else space.bounds.copy(),
                                         space.rename_word, space.seccomp_word)

    def forget(self, mm: object) -> None:
        """An address space that is gone (exec, exit); its counts stay."""
        self._spaces.pop(mm, None)

    def remove(self, mm: object, mem: ProcessMemory, call: Call | None = None) -> None:
        """Put the original bytes back where our jumps still are (all threads
        stopped); then, with `call` (the process's injected system calls),
        the kernel's words it maps retired (kernelmaps.retire)."""
        space = self._spaces.pop(mm, None)
        if space is None:
            return
        for p in space.patches.values():
            try:
                if mem.read(p.runtime_addr, len(p.jump)) == p.jump:
                    mem.write(p.runtime_addr, p.original)
                # (a thread may be in the code before its int3: it goes on)
                if p.trap is not None and mem.read(p.trap, 1) == _INT3:
                    mem.write(p.trap, _NOP)
            except UprobesError:
                pass  # unmapped meanwhile, or the process is gone
        if call is not None:
            self._retire_words(space, call)

    def _retire_words(self, space: _Space, call: Call) -> None:
        """The space's mappings of the rename and seccomp words replaced by
        zeros (after its jumps are out: only a thread still in a trampoline
        reads them). A word that stays mapped (an injected call refused or
        failed) is harmless: it is said once."""
        mapped = [(space.rename_word, self._renames_kept or self._renames),
                  (space.seccomp_word, self._seccomp)]
        for addr, watch in mapped:
            if addr is None:
                continue
            words = watch.word if isinstance(watch, RenameWatch) else \
                watch.words if isinstance(watch, SeccompWatch) else None
            try:
                done = words is not None and retire(call, addr, words)
            except UprobesError:
                done = False
            if not done and not self._words_left:
                self._words_left = True
                self._notes.append(f"a kernel word's mapping (anon_inode:bpf-map at {addr:#x}) "
                                   "stays in the program after detach")
        space.rename_word = space.seccomp_word = None

    def fold_into(self, counts: dict[str, int]) -> None:
        """Add what the counters gained since the last fold to `counts`
        (CounterBlock.gained: never what the program wrote there)."""
        with self._folding:
            for name, where in list(self._counters.items()):
                counts[name] = counts.get(name, 0) + sum(b.gained(i) for b, i in where)

    def peek_counts(self, counts: Mapping[str, int]) -> dict[str, int]:
        """`counts` with what the counters gained since the last fold added,
        nothing changed: callable from any thread while the tracer's folds
        (the lock keeps a fold from being seen half done, its gain taken
        from the counters and not yet added to `counts`)."""
        with self._folding:
            out = dict(counts)
            for name, where in list(self._counters.items()):
                out[name] = out.get(name, 0) + sum(b.pending(i) for b, i in list(where))
        return out

    @property
    def corrupt(self) -> int:
        """Counter reads left out: values the program wrote (CounterBlock.gained)."""
        blocks = {id(b): b for where in self._counters.values() for b, _ in where}
        tables = {id(b): b for where in self._keyed.values() for b, _ in where}
        return sum(b.corrupt for b in blocks.values()) + sum(b.corrupt for b in self.timing) \
            + sum(b.corrupt for b in tables.values())

    @property
    def unnamed(self) -> int:
        """Hits a compiled name test could not decide: the thread's name
        could not be read (filtercode._emit_check)."""
        blocks = {id(b): b for where in self._counters.values() for b, _ in where}
        tables = {id(b): b for where in self._keyed.values() for b, _ in where}
        return sum(int(struct.unpack_from("<Q", b.view, COUNTER_UNNAMED)[0])
                   for b in blocks.values()) \
            + sum(int(struct.unpack_from("<Q", b.view, KEYED_UNNAMED)[0])
                  for b in tables.values()) \
            + sum(b.unnamed() for b in self.timing)

    def report(self, note: Callable[[str], object]) -> None:
        """One note on the decisions not yet reported: how many trap-free, why not
        the rest; and any other note of the trap-free probes (`_notes`)."""
        for text in self._notes:
            note(text)
        self._notes.clear()
        if isinstance(self._renames, str) and not self._renames_told:
            self._renames_told = True
            note("--comm asks the kernel for the thread's name at each hit (a system call, "
                 f"~1 us), unguarded against a seccomp filter the program installs later: no "
                 f"kernel-kept rename word: {self._renames}")
        new = {n: why for n, why in self.decisions.items() if n not in self._reported}
        if not new:
            return
        self._reported.update(new)
        free = [n for n, why in new.items() if why is None]
        traps = [(n, why) for n, why in new.items() if why is not None]
        how = "an in-process counter" if not self.rings else (
            "in-process code recording each hit into a shared ring" if not self._counters
            else "an in-process counter or recording")
        text = f"{len(free)} of {len(new)} probes trap-free"
        if free:  # (none: no jump says what it would have been)
            text += f" (a jump to {how}, no stop per hit)"
        if traps:
            shown = "; ".join(f"{n}: {why}" for n, why in traps[:3])
            more = f"; and {len(traps) - 3} more" if len(traps) > 3 else ""
            text += f"; with an int3 trap per hit: {shown}{more}"
        note(text)
