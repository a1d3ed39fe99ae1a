"""Pairing entry and return events into calls, per thread.

Each function's entries wait on a per-thread stack until their return:
recursion and nesting pair correctly. An entry matches a return when the
return's `func` is the entry's `ip` in the same thread. Calls left without
returning (longjmp, an exception unwinding through them) are counted as
abandoned, never mis-paired, when the events say enough:

- an entry that carries its return address (`__ra=+0(%sp):x64`, as
  `uprobes latency` asks) is closed by the return whose `ip`, the address
  returned to, is that address: the newest open entry with it is the call
  returning (recursion from one call site leaves several; the newest is
  the innermost live one), and the entries above it were abandoned;
- an entry that carries the stack pointer (`__sp=%sp`) drops the open
  entries at or below it: a live caller's frame is always higher on the
  stack than its callee's, so they were left. This is what tells a stale
  entry from a live one with the same return address (a second call from
  the same site after a longjmp out of the first);
- a return that carries the stack pointer drops the entries deeper than
  its frame. At the function's entry the stack pointer points at the
  return address; at the kernel's return probe it is 8 bytes higher (the
  `ret` has popped it), at a probe on the `ret` instruction it is the same.
  Only the kernel's uretprobe can fetch it as it is after the return, which
  is why `uprobes latency` pairs by return address instead: its return
  probes then fetch nothing and go on the function's own `ret`s, which an
  exception can unwind through (a uretprobe swaps the return address, and
  the unwinder finds no frame there).

Calls whose events carry the frame they run in (`__frame`: a `py:`
function's interpreter frame, which its entry and its return both fetch)
pair by it instead, whatever their functions and their order: coroutines
and generators interleave their calls in one thread. An entry at a frame
where a call is still open means that call was left without returning (an
exception unwound through it, and the frame's memory was used again):
it is counted as abandoned.

A return with no entry (the call began before the probes were in) is
counted and skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from uprobes.lang.ast import FileTarget
from uprobes.model.event import FRAME_ARG, RA_ARG, SP_ARG, Event
from uprobes.model.probe import ResolvedProbe

__all__ = ["RA_ARG", "SP_ARG", "CallPairer", "past_entry", "past_prologue"]


def past_entry(probes: Iterable[ResolvedProbe]) -> dict[str, int]:
    """`CallPairer.past_entry` of resolved probes: the entry probes of a
    function that sit past its first instruction, by name."""
    return {p.name: p.symbol_offset for p in probes
            if not p.is_return and p.symbol_offset and p.symbol is not None}


def past_prologue(p: ResolvedProbe) -> bool:
    """Whether entry probe `p` names a function and was placed past its
    prologue (DWARF names at -O0: the resolver moves it to where the
    arguments are stored); its calls return as the function's."""
    t = p.spec.target
    return not p.is_return and p.symbol_offset > 0 and isinstance(t, FileTarget) \
        and t.symbol is not None and t.symbol_offset == 0 and t.line is None


def _sp(ev: Event) -> int | None:
    sp = ev.args.get(SP_ARG)
    return sp if isinstance(sp, int) else None


def _frame(ev: Event) -> int | None:
    frame = ev.args.get(FRAME_ARG)
    return frame if isinstance(frame, int) else None


def _ra(ev: Event) -> int | None:
    ra = ev.args.get(RA_ARG)
    return ra if isinstance(ra, int) else None


@dataclass
class CallPairer:
    """`entry(ev)` opens a call; `ret(ev)` closes the one it returns from and
    gives back its entry event."""

    unpaired_returns: int = 0
    abandoned: int = 0
    _open: dict[tuple[int, int, int], list[Event]] = field(default_factory=dict)
    _frames: dict[tuple[int, int], Event] = field(default_factory=dict)
    """Calls paired by frame: (pid, frame) -> the open call's entry."""
    past_entry: dict[str, int] = field(default_factory=dict)
    """Entry probes placed past their function's first instruction (after an
    unoptimized function's prologue, where its arguments are): probe name
    -> bytes past it. Their returns name the function's first address."""

    def entry(self, ev: Event) -> None:
        frame = _frame(ev)
        if frame is not None:
            if self._frames.pop((ev.pid, frame), None) is not None:
                self.abandoned += 1  # its frame is another call's now
            self._frames[(ev.pid, frame)] = ev
            return
        func = ev.ip - self.past_entry.get(ev.probe, 0)
        stack = self._open.setdefault((ev.pid, ev.tid, func), [])
        sp = _sp(ev)
        if sp is not None:
            while stack and (_sp(stack[-1]) or 0) <= sp:
                stack.pop()  # left without returning: a live caller is higher up
                self.abandoned += 1
        stack.append(ev)

    def ret(self, ev: Event) -> Event | None:
        """The entry of the call `ev` returns from, or None."""
        frame = _frame(ev)
        if frame is not None:
            return self._frame_ret(ev, frame)
        func = ev.func if ev.func is not None else ev.ip
        stack = self._open.get((ev.pid, ev.tid, func))
        sp = _sp(ev)
        if sp is not None:
            while stack and (_sp(stack[-1]) or 0) < sp - 8:
                stack.pop()  # a deeper frame that was left without returning
                self.abandoned += 1
        if stack and _ra(stack[-1]) is not None:
            at = next((i for i in range(len(stack) - 1, -1, -1)
                       if _ra(stack[i]) == ev.ip), None)
            if at is None:
                self.unpaired_returns += 1
                return None
            self.abandoned += len(stack) - 1 - at  # left without returning
            del stack[at + 1:]
        if not stack:
            self.unpaired_returns += 1
            return None
        return stack.pop()

    def _frame_ret(self, ev: Event, frame: int) -> Event | None:
        start = self._frames.pop((ev.pid, frame), None)
        if start is None:
            self.unpaired_returns += 1
        return start

    def route(self, ev: Event, calls: frozenset[str]) -> Event | bool:
        """What a trace file does with `ev`: True, the entry of a call
        (`ev.probe` in `calls`) now waiting for its return; its entry event,
        a return that closes it; False, neither (an instant)."""
        if ev.kind == "p" and ev.probe in calls:
            self.entry(ev)
            return True
        if ev.kind == "r":
            start = self.ret(ev)
            if start is not None:
                return start
        return False

    @property
    def threads(self) -> int:
        """(thread, function) pairs with calls open or once opened, and calls
        open by frame: what memory grows with."""
        return len(self._open) + len(self._frames)

    def give_up(self) -> None:
        """Forget every open call (counted as abandoned): a long run's bound
        on threads that ended mid-call."""
        self.abandoned += sum(len(stack) for stack in self._open.values()) + len(self._frames)
        self._open.clear()
        self._frames.clear()

    @property
    def open_calls(self) -> int:
        """Entries whose return has not been seen (yet)."""
        return sum(map(len, self._open.values())) + len(self._frames)

    def still_open(self) -> Iterator[Event]:
        """Entries whose return has not been seen (yet)."""
        for stack in self._open.values():
            yield from stack
        yield from self._frames.values()
