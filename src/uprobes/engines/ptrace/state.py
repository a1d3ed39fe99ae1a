"""What the parts of a ptrace tracing session share: its state and the steps
one part asks of another.

`PtraceTracer` (tracer.py) is made of one class per concern, each in its
own module: attach.py (seizing threads, placing probes), loop.py (the run
loop, hits, resuming), lifecycle.py (clone, fork, exec, exit; stopping every
thread) and teardown.py (undoing it all). Each derives from `TracerState`,
which declares the session's state (set by `PtraceTracer.__init__`) and,
as abstract methods, the few steps a part takes from another, so mypy
checks every part against them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from contextlib import ExitStack

from uprobes.engines.ptrace.hit import PtraceHit
from uprobes.engines.ptrace.orphan import OrphanGuard
from uprobes.engines.ptrace.tasks import AddressSpace, Feature, Thread
from uprobes.engines.signals import StopSignals
from uprobes.engines.trapfree.fileplan import FilePlan
from uprobes.engines.trapfree.filtercode import Check
from uprobes.engines.trapfree.jumppatch import Keyed, Record, Timed, TrapFree
from uprobes.engines.trapfree.layout import RingShape
from uprobes.engines.trapfree.reach import Span
from uprobes.engines.trapfree.reader import Owner, RawSink, Recorder, ShapedLines
from uprobes.engines.trapfree.ring import Ring
from uprobes.model.event import Hit, ProbeInfo
from uprobes.model.filters import HitFilter
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.model.refusal import Refusals
from uprobes.model.registry import Probe, Registry, TaskLike, prepare_dispatch
from uprobes.sys import procfs, ptrace
from uprobes.unwind.capture import Symbolizer
from uprobes.unwind.cpython.reader import PythonStacks

SIGTRAP = int(signal.SIGTRAP)
FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})
RING_WAKE_S = 0.01  # with trap-free probes: also how often their rings are read
RAW_WAKE_S = 0.001  # ... when they are copied as they are (`record`): a ring holds
                    # ~1 ms of a busy thread's hits, and a copy costs no decoding
NO_HANDLER = prepare_dispatch([])  # a probe's dispatch when no consumer wants that side


class TracerState:
    """The state of one ptrace tracing session (see `PtraceTracer`)."""

    # What was asked.
    probes: list[ResolvedProbe]
    pid: int | None
    child: int | None
    force: bool
    stack_bytes: int
    hit_filter: HitFilter | None
    registry: Registry
    _note: Callable[[str], object]
    _trapfree: str | None  # None, "count", "record", "time" or "guards" (py: guards only)
    _refusals: Refusals
    _ret_sites: dict[InodeKey, int]  # a ret's key -> its offset in the function
    # Our consumers: event handlers, those that only count, the probe line of each.
    _ours: dict[Callable[[TaskLike], object], ResolvedProbe]
    _count_only: dict[Callable[[TaskLike], None], str]
    _py_count_only: dict[Callable[[TaskLike], None], str]  # unfiltered, a compiled py: guard
    _counting: dict[Callable[[TaskLike], None], str]
    _infos: dict[str, ProbeInfo]
    _capturing: bool
    _pystacks: PythonStacks | None  # Python frames read at each hit (`stacks --python`)
    _symbolizer: Symbolizer | None  # walks and names the stacks (`stack_bytes`)
    # The traced tasks.
    threads: dict[int, Thread]
    _nested: dict[int, Thread]  # those in a pid namespace, by their own tid (tasks.admit)
    _pending_new: dict[int, ptrace.WaitStatus]  # first stops of tasks not yet announced
    _held: tuple[AddressSpace, list[int]] | None  # stopped to place jumps
    _orphans: OrphanGuard
    _faulted: set[int]  # processes told of a fault in our code
    _tsc_traps: dict[int, int]  # by pid: our rdtsc(p)s emulated (the program turned the TSC off)
    # The trap-free engine this session drives.
    _jumps: TrapFree | None
    _recorder: Recorder | None
    _ring_shape: RingShape  # set with `_recorder`
    _roster_turn: int  # whose comm `_roster` re-reads first
    _shaped: ShapedLines | None
    _raw: RawSink | None
    _corrupt_rings: int
    # Timed functions (trapfree="time", timed.py): (dev, ino, function's file
    # offset) -> its index in the timing blocks; names by index; why not.
    _names_by_line: list[str]  # the display name of each of `probes`
    _counted: set[int]  # id() of the probes a "time" tracer counts instead of timing
    _int3s: bool  # False: a probe that cannot be trap-free is left out, no int3
    _let_go: Callable[[int], bool] | None  # a fork child's exec: detach it?
    _by: str | None  # count --by: tid, pid, comm or a fetcharg's name (bykey.py)
    _former_tasks: dict[int, Owner]  # own tid (tasks.admit) -> owner of threads gone
    _timed: dict[tuple[int, int, int], int]
    _timed_names: list[str]
    _untimed: dict[str, str]
    # The run.
    counts: dict[str, int]
    events: int
    lost: int
    signal: int | None
    target_exited: bool
    child_status: int | None
    current_hit: PtraceHit | None
    _on_hits: Callable[[list[Hit]], None] | None
    _done: bool
    _placed_once: bool
    _comm_refused_in: set[int]  # processes told their seccomp state keeps --comm out
    _walk_checked: dict[int, str | None]  # pid -> why no Python walk there (seccomp)
    _walk_spans: dict[tuple[int, str, int], list[Span] | str]  # the code the walk's call runs
    _quiescing: bool
    _vanished: bool
    _stack: ExitStack
    _undo: ExitStack  # the run's own undo steps, after every address space's
    _signals: StopSignals | None

    # ------------------------------------------------ steps one part takes from another

    def _rename_word(self) -> int | None:
        """tracer.py: the kernel's rename word now, or None (`Thread.comm_now`)."""
        raise NotImplementedError

    def _place_all(self, t: Thread) -> None:
        """attach.py: place what the mappings of `t`'s address space call for."""
        raise NotImplementedError

    def _place_timed(self, t: Thread, regs: ptrace.UserRegs, probe: Probe, addr: int,
                     file_offset: int, ident: tuple[int, int] | None) -> None:
        """timed.py: place a timed function's entry or ret patch, or say why not."""
        raise NotImplementedError

    def _patch(self, t: Thread, regs: ptrace.UserRegs, plan: FilePlan, name: str, start: int,
               record: Record | None = None, timed: Timed | None = None,
               by: Keyed | None = None, check: Check | None = None) -> str | None:
        """attach.py: place a jump patch (every thread of the space stopped); why not."""
        raise NotImplementedError

    def _comm_refused(self, t: Thread, check: Check | None) -> str | None:
        """attach.py: why `check` may not ask for the thread's name in `t`'s process."""
        raise NotImplementedError

    def _place_keyed(self, t: Thread, regs: ptrace.UserRegs, probe: Probe, addr: int,
                     file_offset: int, ident: tuple[int, int] | None) -> None:
        """bykey.py: place a keyed count's patch, or say why not."""
        raise NotImplementedError

    def _thread_done(self, t: Thread) -> None:
        """timed.py: a thread exited: its timing rows go free (what they hold kept)."""
        raise NotImplementedError

    def _time_snapshot(self) -> None:
        """timed.py: read the timing blocks once, at detach."""
        raise NotImplementedError

    def _resume(self, t: Thread) -> None:
        """loop.py: let a stopped thread go on, with what its stop left to deliver."""
        raise NotImplementedError

    def _emulate_tsc(self, t: Thread) -> bool:
        """loop.py: a SIGSEGV at our own rdtsc(p) (the TSC is off) done for the thread."""
        raise NotImplementedError

    def _drain(self, rings: list[Ring], final: bool = False) -> bool:
        """loop.py: deliver what the rings hold; True if more is waiting."""
        raise NotImplementedError

    def _quiesce(self, interrupt: bool = True) -> None:
        """lifecycle.py: until every traced thread is in a ptrace stop."""
        raise NotImplementedError

    def _task_event(self, t: Thread, event: int) -> None:
        """lifecycle.py: a clone, fork, vfork or exec event of `t`."""
        raise NotImplementedError

    def _check_fork_tls(self, t: Thread) -> None:
        """lifecycle.py: at a fork child's first stop, whether its thread block holds its tid."""
        raise NotImplementedError

    def _gone(self, t: Thread, status: ptrace.WaitStatus) -> None:
        """lifecycle.py: `t` exited or was killed."""
        raise NotImplementedError

    def _single_step(self, t: Thread) -> tuple[int, int] | None:
        """lifecycle.py: one single-step of `t`: (signal, event), or None if it is gone."""
        raise NotImplementedError

    def _taken(self, mm: AddressSpace, feature: Feature) -> None:
        """teardown.py: `feature` now changes `mm`; its undo is pushed once."""
        raise NotImplementedError

    def _taken_by_fork(self, parent: AddressSpace, child: AddressSpace) -> None:
        """teardown.py: a fork child's space has the parent's changes."""
        raise NotImplementedError

    def _abandon_rings(self) -> None:
        """teardown.py: the rings' reader goes away."""
        raise NotImplementedError


def ended(pid: int, within: float = 0.5) -> bool:
    """Whether process `pid` has ended (gone or a zombie), waiting up to
    `within` seconds for an exit under way (its memory is released before
    it becomes a zombie: a failure to read it comes first)."""
    deadline = time.monotonic() + within
    while True:
        if procfs.state(pid) in (None, "Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
