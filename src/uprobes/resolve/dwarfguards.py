"""Fault guards: telling a value that cannot be read from one that is 0.

A numeric fetcharg whose memory cannot be read does not say so: the kernel's
last read (copy_from_user) zero-fills what faulted, and a dereference
before it that faults leaves the record's bytes as the previous event left
them (trace_probe_tmpl.h stops the argument there). A string fetch does
say so: one whose address faults is recorded with length 0, which prints
`(fault)`. So each read a DWARF value's fetch makes through a pointer gets
a hidden companion, the string at the address that read reads (the same
`+OFF(...)` chain typed `:string`): a guard that faults says the read
faults. A string fetch also faults where its bytes are readable but run,
with no NUL, into memory that is not (a value at the end of a mapping), so
a guard's fault is taken for the read's own in two cases where that cannot
be. A pointer's read: a user-space pointer's top byte is 0 (x86-64 user
addresses are below 2**56), so a guard over the pointer's 8 readable bytes
ends in them; one without a 0 byte is no user address and the read through
it faults anyway. The value's own read (`ValueView.own_guard`): it counts
only where the value read as zeros, which a faulting read leaves (the kernel
zero-fills what copy_from_user could not copy); a readable first byte that
is 0 ends the guard's string there, and one that is not makes the value
nonzero. Checked in order this is exact: the first guard's chain has no
dereference that can fault before it, so it is right, and each later one is
right when the ones before it read. A string value's own last read reports
itself; reads of the function's frame (off the stack pointer, or off the
register the CFA is kept in there) and of statics are not guarded.

A guard copies the bytes at its address up to a NUL into the record, whose
strings share what is left of 4096 bytes: when that runs out, the strings
after are recorded empty too, as if they faulted. So the guards go before
the probe's own arguments (whose strings may take all of it: a `char *` of
4096 bytes) and end with a witness, `$comm` (the kernel copies the
thread's name, which never faults): a witness recorded empty means the
space ran out, and the guards say nothing then (the values read as the
kernel gives them). The witness is the first name of each value's
`ValueView.guards`.

The ptrace engine evaluates the same guards as the kernel does, so both
print `(fault)` for the same values. What a guard cannot see: a number whose
first byte is readable and whose last is on the next, unmapped, page (it
reads with its unreadable bytes as zeros); a bitfield that reads as 0 at the
end of a mapping, whose storage unit's other bits are not (`(fault)`); a
counted text or list (`&str`, `Vec`) of no elements is not read, so its
data pointer (often dangling) is not judged. Guards are added while the
probe stays within the kernel's 128 fetchargs, one `uprobe_events` line
and half a record of fixed fields; a value left without its guards reads
as the kernel gives it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from uprobes.lang.ast import (
    Comm,
    Deref,
    FetchArg,
    FetchExpr,
    FetchType,
    Register,
    StackPointer,
    ValueView,
)
from uprobes.lang.render import render_expr, render_fetcharg
from uprobes.model.event import MAX_ARGS

GUARD_PREFIX = "__guard"
LINE_BUDGET = 3500
"""Bytes of a probe's fetchargs past which no guard is added: the kernel
takes a `uprobe_events` line of less than 4096 bytes (WRITE_BUFSIZE), and
the line has the probe's name and place besides."""
FIXED_BUDGET = 2048
"""Bytes of a record's fixed fields past which no guard is added: the
strings share what is left of 4096."""


def _reads(expr: FetchExpr, is_string: bool, frame: Collection[str]) -> list[Deref]:
    """The dereferences of `expr` that read through a pointer, innermost
    first (a string's own last read left out: it reports its own fault);
    the last is `expr` itself when its own read is one of them."""
    out: list[Deref] = []
    node = expr
    while isinstance(node, Deref):
        inner = node.base
        in_frame = (isinstance(inner, Register) and inner.name in frame) \
            or isinstance(inner, StackPointer)
        if not in_frame and not (is_string and node is expr):
            out.append(node)
        node = inner
    out.reverse()
    return out


def guard_faults(args: Sequence[FetchArg], dwarf: Collection[int],
                 frame: Collection[str]) -> tuple[FetchArg, ...]:
    """`args` with guards for the values at positions `dwarf` (the fetches
    of DWARF values, not those the user typed), then the guards: one per
    address read, shared by the values that read it. `frame`: the registers
    that hold the function's frame at the probe's address."""
    used = {a.name for a in args}
    witness = FetchArg(_fresh(f"{GUARD_PREFIX}0", used), Comm(), FetchType("string"))
    line = sum(len(render_fetcharg(a)) + 1 for a in (*args, witness))
    fixed = sum((4 if a.type.is_string else a.type.size) * (a.type.array or 1)
                for a in (*args, witness))
    guards: dict[str, FetchArg] = {}
    out = list(args)
    for i in sorted(dwarf):
        a = args[i]
        names: list[str] = []
        reads = _reads(a.expr, a.type.is_string, frame)
        for node in reads:
            key = render_expr(node)
            if key not in guards:
                guard = FetchArg(_fresh(f"{GUARD_PREFIX}{len(guards) + 1}", used), node,
                                 FetchType("string"))
                cost = len(render_fetcharg(guard)) + 1
                if len(out) + len(guards) + 3 > MAX_ARGS or line + cost > LINE_BUDGET \
                        or fixed + 4 > FIXED_BUDGET:
                    names = []
                    break  # no room: this value reads as the kernel gives it
                guards[key] = guard
                line += cost
                fixed += 4
            names.append(guards[key].name)
        if names:
            view = a.type.view or ValueView("int", "")
            named = (witness.name, *names)
            own = reads[-1] is a.expr
            out[i] = replace(a, type=replace(a.type, view=replace(view, guards=named,
                                                                  own_guard=own)))
    used_guards = {n for a in out if a.type.view is not None for n in a.type.view.guards}
    if not used_guards:
        return tuple(out)
    # First in the record: a string of the probe's own (a `char *` of 4096
    # bytes) takes the strings' space before the guards could.
    return (*(g for g in guards.values() if g.name in used_guards), witness, *out)


def _fresh(name: str, used: set[str]) -> str:
    while name in used:
        name += "_"
    used.add(name)
    return name

