"""Group and event names: the kernel's checks and the names we generate."""

from __future__ import annotations

import re

from uprobes.lang import messages as msg
from uprobes.lang.messages import TokenError
from uprobes.lang.numbers import is_good_name, is_good_system_name

MAX_EVENT_NAME_LEN = 64
"""Kernel limit incl. NUL: an event name has at most 63 chars, a group too."""
DEFAULT_GROUP = "uprobes"
"""The group the kernel uses when a line names none (UPROBE_EVENT_SYSTEM)."""


def parse_event_name(text: str, offset: int) -> tuple[str | None, str | None]:
    """`[GRP/|GRP.][EVENT]` -> (group, event), checked as
    traceprobe_parse_event_name() does; `offset` is where `text` starts in
    its token (errors point there)."""
    slash = text.find("/")
    if slash < 0:
        slash = text.find(".")
    group: str | None = None
    event = text
    if slash >= 0:
        if slash == 0:
            raise TokenError(msg.NO_GROUP_NAME, offset)
        if slash + 1 > MAX_EVENT_NAME_LEN:
            raise TokenError(msg.GROUP_TOO_LONG, offset)
        group = text[:slash]
        if not is_good_system_name(group):
            raise TokenError(msg.BAD_GROUP_NAME, offset)
        offset += slash + 1
        event = text[slash + 1:]
    if not event:
        if slash >= 0:
            return group, None
        raise TokenError(msg.NO_EVENT_NAME, offset)
    if len(event) >= MAX_EVENT_NAME_LEN:
        raise TokenError(msg.EVENT_TOO_LONG, offset)
    if not is_good_name(event):
        raise TokenError(msg.BAD_EVENT_NAME, offset)
    return group, event


def auto_event_name(path: str, file_offset: int) -> str:
    """The name the kernel gives a probe line without one:
    `p_<basename cut at the first '.', '-' or '_'>_0x<offset>`, always `p_`
    (even for return probes), cut to 63 characters, and not sanitised
    (trace_uprobe.c __trace_uprobe_create)."""
    tail = path.rsplit("/", 1)[-1]
    cut = re.search(r"[.\-_]", tail)
    if cut:
        tail = tail[:cut.start()]
    return f"p_{tail}_0x{file_offset:x}"[:MAX_EVENT_NAME_LEN - 1]


def offset_event_name(path: str, file_offset: int) -> str:
    """The event name we give a probe at PATH:OFFSET: the kernel's own
    (`auto_event_name`) made a C identifier, since the kernel refuses the
    name it makes for a file named `pr:og` or `prög` (is_good_name)."""
    return c_identifier(auto_event_name(path, file_offset))


def symbol_event_name(symbol: str, is_return: bool) -> str:
    """A C-identifier event name for a probe on `symbol`, perf-probe style:
    `malloc`, `malloc__return`, `memcpy@GLIBC_2.14` -> `memcpy_GLIBC_2_14`.
    Each run of other characters becomes one '_'; the result fits the
    kernel's 63-character limit."""
    suffix = "__return" if is_return else ""
    return c_identifier(symbol, MAX_EVENT_NAME_LEN - 1 - len(suffix)) + suffix


def kernel_event_name(event: str) -> str:
    """`event` as the kernel takes an event name: itself when it is one, else
    made a C identifier (a C++ label `ns::C::add(int)%return` is
    `ns_C_add_int_return`, no '_' at either end)."""
    if len(event) < MAX_EVENT_NAME_LEN and is_good_name(event):
        return event
    name = c_identifier(event).strip("_") or "probe"
    return c_identifier(name)


def c_identifier(text: str, limit: int = MAX_EVENT_NAME_LEN - 1) -> str:
    """`text` with each run of characters other than ASCII letters, digits
    and '_' made one '_', never starting with a digit, at most `limit` long."""
    base = re.sub(r"[^A-Za-z0-9_]+", "_", text) or "probe"
    if "0" <= base[0] <= "9":
        base = "_" + base
    return base[:limit]
