"""Pairing entry and return events into calls, per thread.

Each function's entries wait on a per-thread stack until their return:
recursion and nesting pair correctly. An entry matches a return when the
return's `func` is the entry's `ip` in the same thread. When events carry
the stack pointer (`__sp=%sp`, as `uprobes latency` asks), it tells live
calls from calls that were left without returning (longjmp, an exception
unwinding through them): a live caller's frame is always higher on the
stack than its callee's, so a new entry drops the open entries at or below
its own stack pointer, and a return drops those deeper than its frame.
They are counted, never mis-paired. A return with no entry (the call began
before the probes were in) is counted and skipped. At the function's entry
the stack pointer points at the return address; at the kernel's return
probe it is 8 bytes higher (the `ret` has popped it), at a probe on the
`ret` instruction it is the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from uprobes.engines.event import Event

SP_ARG = "__sp"


def _sp(ev: Event) -> int | None:
    sp = ev.args.get(SP_ARG)
    return sp if isinstance(sp, int) else None


@dataclass
class CallPairer:
    """`entry(ev)` opens a call; `ret(ev)` closes the one it returns from and
    gives back its entry event."""

    unpaired_returns: int = 0
    abandoned: int = 0
    _open: dict[tuple[int, int, int], list[Event]] = field(default_factory=dict)

    def entry(self, ev: Event) -> None:
        stack = self._open.setdefault((ev.pid, ev.tid, ev.ip), [])
        sp = _sp(ev)
        if sp is not None:
            while stack and (_sp(stack[-1]) or 0) <= sp:
                stack.pop()  # left without returning: a live caller is higher up
                self.abandoned += 1
        stack.append(ev)

    def ret(self, ev: Event) -> Event | None:
        """The entry of the call `ev` returns from, or None."""
        func = ev.func if ev.func is not None else ev.ip
        stack = self._open.get((ev.pid, ev.tid, func))
        sp = _sp(ev)
        if sp is not None:
            while stack and (_sp(stack[-1]) or 0) < sp - 8:
                stack.pop()  # a deeper frame that was left without returning
                self.abandoned += 1
        if not stack:
            self.unpaired_returns += 1
            return None
        return stack.pop()

    def still_open(self) -> Iterator[Event]:
        """Entries whose return has not been seen (yet)."""
        for stack in self._open.values():
            yield from stack
