"""Whether a probe fits one kernel event: `kernel_cannot_take` says why
the kernel would refuse it as too big (fetchargs, bytes of fields, the
length of the uprobe_events line the kernel engine writes)."""

from __future__ import annotations

from uprobes.engines.kernel.groups import run_group
from uprobes.engines.kernel.probe_line import kernel_can_name, kernel_cannot_read
from uprobes.engines.kernel.records import kernel_probes
from uprobes.errors import SpecError
from uprobes.lang.grammar import parse
from uprobes.model.event import MAX_ARGS
from uprobes.model.probe import ResolvedProbe, VdsoKey

MAX_PROBE_EVENT_SIZE = 3072
"""Bytes of fixed fields one probe event takes (kernel/trace/trace_probe.h):
past it the kernel says `Event too big (too many fields?)`."""
_TOO_LONG = "Line length is too long"
"""The kernel's words (and our parser's) for a uprobe_events line of 4094
bytes or more (WRITE_BUFSIZE)."""


def kernel_cannot_take(probe: ResolvedProbe) -> str | None:
    """Why the kernel would refuse `probe` as too big (more fetchargs, bytes
    of fields or characters of line than it takes); None when it takes it,
    or refuses it for another reason (said where the line is written;
    whitespace in the path, the vDSO and SSE registers are said apart)."""
    if isinstance(probe.key, VdsoKey) or not kernel_can_name(probe.path) \
            or any(kernel_cannot_read(a) for a in probe.args):
        return None
    # what the kernel engine adds: the return address on a `ret`, the thread's name
    at_ret = 1 if probe.is_return and probe.ret_sites is not None else 0
    if len(probe.args) + at_ret > MAX_ARGS:
        return f"its {len(probe.args)} fetches are more than the kernel's {MAX_ARGS}"
    size = sum((4 if a.type.is_string else a.type.size) * (a.type.array or 1)
               for a in probe.args) + 8 * at_ret
    if len(probe.args) + at_ret < MAX_ARGS:
        size += 4
    if size > MAX_PROBE_EVENT_SIZE:
        return (f"its fetches take {size} bytes of one event, more than the kernel's "
                f"{MAX_PROBE_EVENT_SIZE}")
    # The lines the engine writes, parsed as the kernel parses them: in the
    # longest group a run can have (its pid's), with the thread's name and,
    # on a `ret`, the return address added.
    try:
        for kp in kernel_probes([probe], run_group(_PID_MAX_LIMIT)):
            parse(kp.line)
    except SpecError as e:
        if e.message.startswith(_TOO_LONG):
            return f"its uprobe_events line is too long for the kernel ({e.message})"
    return None


_PID_MAX_LIMIT = 4194304
"""The largest pid the kernel gives on 64 bits (the longest run group name)."""
