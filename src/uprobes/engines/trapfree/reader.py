"""Reading the trap-free rings (ring.py): `Recorder` (records checked and
turned back into hits, by a generated function per probe or through the
probes' dispatch, or handed as they are to a `RawSink` for `record`);
`valid_records`, the one rule for which records a probe's code can have
written (the replay of a recording takes records by it too).
recording.py says what a probe records and builds the code that records
it; layout.py the binary format both sides share.
"""

from __future__ import annotations

import operator
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, cast, runtime_checkable

from uprobes.elf.framerule import RA
from uprobes.engines.tracee.fetch import REGISTER_FIELDS, converter, split_derefs
from uprobes.engines.trapfree.layout import (
    CPU_BITS,
    CPU_MASK,
    REC_AUX,
    REC_PROBE,
    REC_PROBE_HIGH,
    REC_TID,
    REC_TSC,
    REC_VALUES,
)
from uprobes.engines.trapfree.recording import CONSTANT_FIELDS, SKEW_S, STACK_REGS, Recipe
from uprobes.engines.trapfree.ring import RAW_TAKE_MAX, STUCK_S, TAKE_MAX, Ring
from uprobes.engines.trapfree.sharedmem import CPUS
from uprobes.engines.trapfree.vforks import VforkWindows
from uprobes.lang.ast import (
    Comm,
    FetchType,
    Immediate,
    Register,
    RetVal,
    StackEntry,
    StackPointer,
    UsdtTarget,
)
from uprobes.model.event import Hit
from uprobes.model.probe import ResolvedProbe
from uprobes.render.protocol import LineRenderer
from uprobes.render.rows import RowShape
from uprobes.resolve.abi import lower_fetcharg
from uprobes.sys import tsc
from uprobes.sys.procmem import MemoryFault
from uprobes.sys.ptrace import UserRegs
from uprobes.unwind.capture import StackCapture
from uprobes.unwind.cpython.reader import PyGroups
from uprobes.unwind.stack import StackCopy

DRAIN_S = 0.05                      # the longest a drain keeps reading (unless final)
FINAL_S = 5.0                       # ... and a final one: a writer we do not stop refills forever
_NODES_MAX = 1024  # NUMA nodes (TSC_AUX keeps the node above the cpu's 12 bits)


# ---------------------------------------------------------------- records as hits


Owner = tuple[int, str, int]
"""(pid, comm, tid) of the thread that wrote a record, as the host numbers
it (what a hit shows): the record holds the tid as the thread's own pid
namespace numbers it (what gettid says there, what glibc caches)."""
Make = Callable[[tuple[int, ...], int, Owner], Hit]
PyFrames = Callable[[int, bytes], PyGroups]
"""(pid, a record's copy area) -> the Python frames its probe's code copied."""
Direct = tuple[str, Make]
"""The name a probe's count goes under, and (its record, its time stamp,
the `Owner` of its thread) -> its `Hit`: built straight from the record,
with no RecordedHit and no dispatch."""


@dataclass(frozen=True)
class RecordedSite:
    """What a probe id in a ring stands for. `direct`: set when the probe's
    only consumer is the tracer's own and nothing filters its hits."""

    probe: object        # registry.Probe
    recipe: Recipe
    ip: int              # the probe's run-time address
    file_base: int
    direct: Direct | None = None
    func: int | None = None  # a return probe's function (its ip is the return address)
    python: PyFrames | None = None  # its records' Python frames (pywalk.py)


def direct_hit(probe: ResolvedProbe, recipe: Recipe, ip: int, func: int | None) -> Make | None:
    """(A record as unpacked: values from index 6, its time stamp, the
    `Owner` of its thread) -> the probe's `Hit`, for probes whose arguments
    are registers, `$stack`, `$stackN`, `+OFF(%sp)`, immediates or `$comm`,
    valued as `ArgFetcher` values them (its `converter` arithmetic, written
    out); None for the rest. `func`: a return probe's function (its hit's
    ip is then the recorded return address). The function is generated,
    one expression per field: one call a record, however many arguments."""
    usdt = probe.usdt_args if isinstance(probe.spec.target, UsdtTarget) else None
    n_regs = len(recipe.regs)
    lo = recipe.stack[0] if recipe.stack else 0
    exprs: list[str] = []
    for a in probe.args:
        arg = lower_fetcharg(a, usdt)
        expr, t = arg.expr, arg.type
        if isinstance(expr, Comm) and t.array is None:
            exprs.append("owner[1]")
            continue
        if t.is_string or t.array:
            return None
        if isinstance(expr, (Register, StackPointer)):
            field_name = "rsp" if isinstance(expr, StackPointer) else REGISTER_FIELDS[expr.name]
            if field_name in CONSTANT_FIELDS and field_name not in recipe.regs:
                exprs.append(repr(converter(t)(CONSTANT_FIELDS[field_name] or ip)))
                continue
            raw = f"rec[{REC_VALUES + recipe.regs.index(field_name)}]"
        elif isinstance(expr, RetVal):
            raw = f"rec[{REC_VALUES + recipe.regs.index('rax')}]"
        elif isinstance(expr, StackEntry):
            raw = f"rec[{REC_VALUES + n_regs + (8 * expr.index - lo) // 8}]"
        elif isinstance(expr, Immediate):
            exprs.append(repr(converter(t)(expr.value & ((1 << 64) - 1))))
            continue
        else:
            base, offsets = split_derefs(expr)
            if len(offsets) != 1 or not (isinstance(base, StackPointer) or (
                    isinstance(base, Register) and base.name == "sp")):
                return None
            # `+OFF(%sp)`: `size` bytes of the recorded stack words, little-endian.
            at = offsets[0] - lo
            k, shift = REC_VALUES + n_regs + at // 8, 8 * (at % 8)
            word = f"rec[{k}]" if shift + 8 * t.size <= 64 else f"(rec[{k}] | rec[{k + 1}] << 64)"
            raw = f"(({word} >> {shift}) & {(1 << 8 * t.size) - 1:#x})"
        exprs.append(_converted(raw, t))
    args = f"({', '.join(exprs)}{',' if exprs else ''})"
    where = repr(ip) if func is None else f"rec[{REC_VALUES}]"  # a return: rip, recorded first
    source = (f"lambda rec, ts, owner: (ts, owner[0], owner[2], rec[{REC_AUX}] & {CPU_MASK}, "
              f"{probe.name!r}, "
              f"owner[1], {where}, {func!r}, {args})")
    return eval(compile(source, f"<{probe.name} record>", "eval"))  # type: ignore[no-any-return]


def stack_hit(make: Make, recipe: Recipe, ip: int, python: PyFrames | None = None) -> Make:
    """`make` (a `direct_hit`) for a probe that copies the stack: its hit
    with the `StackCapture` after it, as the int3 path's `run()` hands on
    (the registers by DWARF number, the ip the probe's, the copy; with
    `python`, the Python frames its code copied too)."""
    where = [REC_VALUES + recipe.regs.index(name) for name in STACK_REGS]  # DWARF 0..15
    sp_at = REC_VALUES + recipe.regs.index("rsp")

    def hit(rec: tuple[int, ...], ts: int, owner: Owner) -> Hit:
        regs = {n: rec[at] for n, at in enumerate(where)}
        regs[RA] = ip
        copy = StackCopy(rec[sp_at], copied_stack(recipe, rec) or b"")
        py = None if python is None else python(owner[0], cast(bytes, rec[-1]))
        return (*make(rec, ts, owner), StackCapture(regs, copy, py))  # type: ignore[return-value]
    return hit


def _converted(raw: str, t: FetchType) -> str:
    """`converter(t)(raw)` as an expression (what fetch.converter computes)."""
    bits = t.size * 8
    mask = (1 << bits) - 1
    if t.bitfield is not None:
        lshift = t.bitfield.container - t.bitfield.width - t.bitfield.offset
        rshift = t.bitfield.container - t.bitfield.width
        return f"((({raw} << {lshift}) & {mask:#x}) >> {rshift})"
    if t.signed:
        sign = 1 << (bits - 1)
        return f"((({raw} & {mask:#x}) ^ {sign:#x}) - {sign:#x})"
    return raw if bits == 64 else f"({raw} & {mask:#x})"


class StackWindow:
    """The recorded stack words as readable memory (what `ArgFetcher` reads);
    nothing else is readable: a recipe covers every read of its probe."""

    __slots__ = ("start", "data")

    def __init__(self, start: int, data: bytes) -> None:
        self.start, self.data = start, data

    def read_upto(self, runtime_addr: int, n: int) -> bytes:
        off = runtime_addr - self.start
        if 0 <= off and off + n <= len(self.data):
            return self.data[off:off + n]
        raise MemoryFault(f"{runtime_addr:#x} was not recorded", runtime_addr)

    read = read_upto


@dataclass
class RecordedHit:
    """A hit read from a ring, as a `TaskLike` for the probe's dispatch:
    what the event handler of the int3 path reads of a `PtraceHit`."""

    probe: object
    regs: UserRegs
    mem: StackWindow
    pid: int
    tid: int
    comm: str
    cpu: int
    ip: int
    file_base: int
    ts_ns: int
    kind: str = "p"
    func: int | None = None
    changed: bool = field(default=False)
    copied: bytes | None = None  # the stack from regs.rsp up, when the probe copies it
    python: PyGroups | None = None  # the Python frames its code copied (pywalk.py)


def copied_stack(recipe: Recipe, rec: tuple[int, ...]) -> bytes | None:
    """The stack bytes a record of `recipe` holds (None: it copies none;
    empty: none could be copied), as many as the program's code says it
    copied, never more than it was asked to."""
    if not recipe.copy:
        return None
    n = rec[REC_VALUES + recipe.words - 1]
    data = cast(bytes, rec[-1])  # (the slot's copy area, unpacked as one value)
    return data[:n] if 0 < n <= recipe.copy else b""


def regs_of(site: RecordedSite, values: tuple[int, ...]) -> tuple[UserRegs, StackWindow]:
    """The register set and stack window a record's values stand for."""
    regs = UserRegs()
    for name, value in CONSTANT_FIELDS.items():
        setattr(regs, name, site.ip if value is None else value)
    recipe = site.recipe
    n = len(recipe.regs)
    for name, value in zip(recipe.regs, values):
        setattr(regs, name, value)
    if recipe.stack is None:
        return regs, StackWindow(0, b"")
    lo, hi = recipe.stack
    words = (hi - lo) // 8
    return regs, StackWindow(regs.rsp + lo, struct.pack(f"<{words}Q", *values[n:n + words]))


@dataclass(frozen=True)
class RawSite:
    """A probe id's meaning, for reading raw records later (record/replay.py):
    the probe lines its records are hits of (the very objects the run was
    asked to place: a recording names them by their index there), what they
    recorded, where."""

    lines: tuple[ResolvedProbe, ...]
    recipe: Recipe
    ip: int
    file_base: int
    func: int | None


@runtime_checkable
class RawSink(Protocol):
    """Where `uprobes record` keeps ring records as they are (record/writer.py)."""

    def raw(self, created: int, now: int, read: int, slot_bytes: int, data: memoryview,
            owners: dict[int, Owner | None]) -> None:
        """Whole slots (`slot_bytes` each) of one ring (made at TSC `created`), taken at TSC `now`
        by read number `read` (a read takes from every ring; the live reader
        merges a read's records by time stamp when several rings gave some),
        as a view of the ring valid during the call only; `owners`: the
        `Owner` of the traced threads, by tid, that changed since the last
        call (None: a tid no longer ours)."""

    def sites(self, sites: list[RawSite], rate: tuple[float, int, int]) -> None:
        """What each probe id stands for, and the TSC's rate (TscClock.rate)."""


class Recorder:
    """The tracer's reading side: probe ids, the clock, who each tid was."""

    FORMER_MAX = 4096  # exited threads remembered for their last records

    def __init__(self, counts: dict[str, int]) -> None:
        from uprobes.sys.tsc import TscClock

        self.counts = counts  # what direct sites' hits add to
        self.sites: list[RecordedSite] = []
        self.clock = TscClock()
        self._skew = self.clock.ticks(SKEW_S)
        self._former: dict[int, Owner] = {}
        self.corrupt = 0  # records no probe's code can have written (see `_valid`)
        self.raw_records = 0  # records handed to a RawSink (`dump`)
        self._told: dict[int, Owner | None] = {}  # tid -> what `dump` said
        self._gone: dict[int, Owner] = {}  # threads gone since `dump` last told
        self._reads = 0  # `dump`'s reads so far
        self.vforks = VforkWindows()  # whose records a vfork child's are

    def site(self, site: RecordedSite) -> int:
        """A new probe id for `site`."""
        self.sites.append(site)
        return len(self.sites) - 1

    def former(self, tid: int, owner: Owner) -> None:
        """The thread whose records hold `tid` (`owner`) is gone; records it
        left may still be in a ring."""
        if len(self._former) >= self.FORMER_MAX:
            del self._former[next(iter(self._former))]
        self._former[tid] = owner
        if len(self._gone) >= self.FORMER_MAX:  # (`dump` is not reading)
            del self._gone[next(iter(self._gone))]
        self._gone[tid] = owner

    def drain(self, rings: list[Ring], who: Callable[[int], Owner | None],
              deliver: Callable[[list[Hit]], None], final: bool = False) -> bool:
        """Deliver every committed record of `rings`, oldest first across
        rings: hit tuples of direct sites to `deliver` in batches, the others
        as a RecordedHit to their probe's dispatch. `who(tid)`: the `Owner`
        of the live traced thread whose records hold `tid`. True if it
        stopped after DRAIN_S with more to read."""
        until = time.monotonic() + (FINAL_S if final else DRAIN_S)
        began = tsc.read()
        while self._drain_once(rings, who, deliver, final) >= TAKE_MAX:
            if time.monotonic() >= until:
                if final:
                    _give_up(rings)
                return True  # the tracer has stops to handle too; it comes back at once
        if self.vforks:  # (a slot reserved then is committed or lost STUCK_S later)
            self.vforks.settled(began - self.clock.ticks(2 * STUCK_S))
        return False

    def dump(self, rings: list[Ring], roster: Callable[[], Iterable[tuple[int, Owner]]],
             sink: RawSink, final: bool = False) -> bool:
        """`drain`, the records kept as they are: each run of a ring's committed
        slots goes to `sink` as a view of the ring; the first of a read with
        the `Owner` of the traced threads (`roster()`: tid, owner) and of
        those gone since, where the sink was not told them yet. No work per
        record here: which thread wrote a record, whether a probe's code can
        have made it, and the hits, wait for the replay. True if it stopped
        after DRAIN_S with more to read."""
        until = time.monotonic() + (FINAL_S if final else DRAIN_S)
        while True:
            taken = 0
            self._reads += 1
            told = False

            def piece(ring: Ring, view: memoryview) -> None:
                nonlocal told
                owners = {} if told else self._owners_changed(roster)
                told = True
                sink.raw(ring.created, tsc.read(), self._reads, ring.shape.slot_bytes, view,
                         owners)
                self.raw_records += len(view) // ring.shape.slot_bytes
            for ring in rings:
                before = ring.tail
                ring.take_raw(partial(piece, ring), final)
                taken += ring.tail - before
            if taken < RAW_TAKE_MAX:
                return False
            if time.monotonic() >= until:
                if final:
                    _give_up(rings)
                return True

    def _owners_changed(self, roster: Callable[[], Iterable[tuple[int, Owner]]]
                        ) -> dict[int, Owner | None]:
        """The `Owner` of each thread whose owner `dump` has not told yet: the
        threads gone since the last call (a thread may have started, recorded
        and exited between two reads), then the live ones, whose word counts
        where a tid was reused (as `who` counts in `drain`)."""
        told = self._told
        changed: dict[int, Owner | None] = {}
        gone, self._gone = self._gone, {}
        for tid, owner in gone.items():
            if told.pop(tid, None) != owner:  # (told once: the replay keeps it)
                changed[tid] = owner
        for tid, owner in roster():
            if told.get(tid) != owner:
                changed[tid] = told[tid] = owner
        return changed

    def _drain_once(self, rings: list[Ring], who: Callable[[int], Owner | None],
                    deliver: Callable[[list[Hit]], None], final: bool) -> int:
        before = sum(r.tail for r in rings)
        batches = [(r, r.take(final)) for r in rings]
        taken = sum(r.tail for r in rings) - before  # slots read or found lost
        if not taken:
            return 0
        now = tsc.read()
        seen: dict[int, Owner | None] = {}
        records: list[tuple[int, ...]] = []
        for ring, got in batches:
            if got:
                records += self._valid(ring, got, who, seen, now)
        if not records:
            return taken
        owners = cast(dict[int, Owner], seen)  # None only for records left out
        if sum(1 for _, b in batches if b) > 1:
            records.sort(key=lambda rec: rec[REC_TSC])
        clock = self.clock
        clock.refresh()
        scale, tsc0, ns0 = clock.rate()
        sites = self.sites
        counts = self.counts
        for probe_id, n in Counter(rec[REC_PROBE] for rec in records).items():
            direct = sites[probe_id].direct
            if direct is not None:
                counts[direct[0]] += n
        batch: list[Hit] = []
        append = batch.append
        for rec in records:
            site = sites[rec[REC_PROBE]]
            ts = ns0 + int((rec[REC_TSC] - tsc0) * scale)
            direct = site.direct
            if direct is not None:
                append(direct[1](rec, ts, owners[rec[REC_TID]]))
                continue
            if batch:
                deliver(batch)
                batch = []
                append = batch.append
            owner = owners[rec[REC_TID]]
            regs, window = regs_of(site, rec[REC_VALUES:])
            func = site.func
            if func is None:
                site.probe.dispatch(RecordedHit(  # type: ignore[attr-defined]
                    site.probe, regs, window, owner[0], owner[2], owner[1],
                    rec[REC_AUX] & CPU_MASK,
                    site.ip, site.file_base, ts, copied=copied_stack(site.recipe, rec),
                    python=None if site.python is None
                    else site.python(owner[0], cast(bytes, rec[-1]))))
            else:
                site.probe.ret_dispatch(RecordedHit(  # type: ignore[attr-defined]
                    site.probe, regs, window, owner[0], owner[2], owner[1],
                    rec[REC_AUX] & CPU_MASK,
                    regs.rip, site.file_base, ts, "r", func))
        if batch:
            deliver(batch)
        return taken

    def _valid(self, ring: Ring, batch: list[tuple[int, ...]],
               who: Callable[[int], Owner | None],
               owners: dict[int, Owner | None], now: int) -> list[tuple[int, ...]]:
        """`valid_records` of `batch`, read from `ring` at `now` (TSC ticks):
        a probe id of this ring, a thread we trace (or traced). The rest are
        counted in `corrupt`. `owners` gets the `Owner` of each tid seen."""
        former = self._former
        tids = set(map(operator.itemgetter(REC_TID), batch))
        if self.vforks:
            batch = self.vforks.retag(batch, tids)
            tids = set(map(operator.itemgetter(REC_TID), batch))
        for tid in tids - owners.keys():
            owners[tid] = who(tid) or former.get(tid)
        good = valid_records(batch, ring.probe_ids, CPUS, owners,
                             ring.created - self._skew, now + self._skew)
        self.corrupt += len(batch) - len(good)
        return good


def valid_records(records: list[tuple[int, ...]], probe_ids: AbstractSet[int], cpus: int,
                  owners: Mapping[int, Owner | None], lo: int, hi: int
                  ) -> list[tuple[int, ...]]:
    """The records (as RECORD unpacks them) that the probes' code can have
    written, the program being able to write its ring too: a probe id of
    `probe_ids`, a thread `owners` names (not None), a CPU below `cpus` on a
    NUMA node that can be, a time stamp from `lo` to `hi` (TSC ticks). The
    live reader and the replay of a recording (record/replay.py) both take
    records by this one rule."""
    if not records:
        return records
    get = operator.itemgetter
    if set(map(get(REC_PROBE), records)) <= probe_ids \
            and not any(map(get(REC_PROBE_HIGH), records)) \
            and max(map(get(REC_AUX), records)) < cpus \
            and lo <= min(map(get(REC_TSC), records)) \
            and max(map(get(REC_TSC), records)) <= hi \
            and all(owners.get(tid) is not None for tid in set(map(get(REC_TID), records))):
        return records  # the common case, checked column by column
    return [rec for rec in records
            if rec[REC_PROBE] in probe_ids and not rec[REC_PROBE_HIGH]
            and (rec[REC_AUX] & CPU_MASK) < cpus and rec[REC_AUX] >> CPU_BITS < _NODES_MAX
            and lo <= rec[REC_TSC] <= hi and owners.get(rec[REC_TID]) is not None]


class ShapedLines:
    """Hits of recorded probes to lines by the renderer's row templates (the
    kernel engine's fast path, engines/kernel/lines.py, used on our hits):
    a stretch of hits sharing probe, task, CPU, comm and addresses is one
    `RowShape`, its rows `(ts_ns, *args)` filled into the shape's template.
    The same lines as `renderer.lines(hits)`, at a fraction of the cost."""

    def __init__(self, renderer: LineRenderer) -> None:
        self.renderer = renderer
        self._writers: dict[tuple[object, ...], object] = {}

    def write(self, hits: list[Hit]) -> None:
        renderer = self.renderer
        lines: list[str] = []
        n = len(hits)
        i = 0
        while i < n:
            first = hits[i]
            key = first[1:8]
            j = i + 1
            while j < n and hits[j][1:8] == key:
                j += 1
            writer = self._writers.get(key, _UNSET)
            if writer is _UNSET:
                _, pid, tid, cpu, probe, comm, ip, func, _ = first
                writer = self._writers[key] = renderer.row_lines(
                    RowShape(probe=probe, comm=comm, pid=pid, tid=tid, cpu=cpu, ip=ip,
                             func=func))
            piece = hits[i:j]
            if writer is None:
                lines += renderer.lines(piece)
            elif isinstance(writer, str):
                fill = writer.__mod__
                lines += [fill((h[0], *h[8])) for h in piece]
            else:
                lines += writer([(h[0], *h[8]) for h in piece])  # type: ignore[operator]
            i = j
        renderer.write_lines(lines)


_UNSET = object()


def _give_up(rings: list[Ring]) -> None:
    """A final drain that ran FINAL_S and still found rings full: a writer
    we did not stop keeps filling them. What they hold is counted lost, and
    its hits from now on drop their records (no reader waits for them)."""
    for ring in rings:
        ring.give_up()
