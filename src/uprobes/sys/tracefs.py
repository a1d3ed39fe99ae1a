"""tracefs: where it is, `uprobe_events`, event ids and formats, and owned probe groups.

The kernel's dynamic uprobe events are defined by writing lines to
`uprobe_events` (kernel/trace/trace_uprobe.c). A refused line leaves its
reason, with a caret position, in `error_log`; we read it back so the user
sees the kernel's own words.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from uprobes.errors import KernelError
from uprobes.sys.event_format import EventFormat, parse_format
from uprobes.sys.libc import kernel_error, kernel_errors, mount

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_EVENT_LINE_RE = re.compile(
    r"^(?P<kind>[pr-])(?::(?:(?P<group>[^/\s.]*)[/.])?(?P<event>\S*))?(?:\s|$)")

_WRITE_HINTS: Mapping[int, str] = {
    errno.EACCES: "need root (tracefs is writable by root only)",
    errno.EPERM: "need root; or the kernel is locked down (lockdown=integrity forbids tracefs)",
    errno.EBUSY: "event in use: close its perf events (or disable it) first",
    errno.ENOENT: "no such event",
    errno.ENODEV: "the kernel has no uprobe events (CONFIG_UPROBE_EVENTS)",
}


class ProbeRejected(KernelError):
    """The kernel refused a line; `command` and `pos` locate the kernel's caret."""

    def __init__(self, message: str, err: int, kernel_message: str,
                 command: str, pos: int) -> None:
        super().__init__(message, err)
        self.kernel_message = kernel_message
        self.command = command
        self.pos = pos

    def lines(self) -> list[str]:
        if not self.command:
            return [str(self)]
        return [str(self), "  " + self.command, "  " + " " * self.pos + "^"]


@dataclass(frozen=True)
class ErrorLogEntry:
    """One `error_log` entry: `[ts] subsystem: error: message`, command, caret."""

    subsystem: str
    message: str
    command: str
    pos: int
    # the kernel's clock at the error: tells two entries of one command apart
    stamp: str = ""


@dataclass(frozen=True)
class ProfileEntry:
    """One `uprobe_profile` line: the probed file, the event name, its hits."""

    path: str
    event: str
    hits: int


def parse_error_log(text: str) -> list[ErrorLogEntry]:
    """Parse `error_log`; the caret column counts from the start of the command."""
    entries: list[ErrorLogEntry] = []
    lines = text.splitlines()
    prefix = "  Command: "
    for i, line in enumerate(lines):
        m = re.match(r"^\[(?P<stamp>[^\]]*)\]\s*(?P<sub>[^:]+): error: (?P<msg>.*)$", line)
        if not m:
            continue
        command, pos = "", 0
        if i + 1 < len(lines) and lines[i + 1].startswith(prefix):
            command = lines[i + 1][len(prefix):]
            if i + 2 < len(lines) and "^" in lines[i + 2]:
                pos = max(lines[i + 2].index("^") - len(prefix), 0)
        entries.append(ErrorLogEntry(m.group("sub").strip(), m.group("msg").strip(), command, pos,
                                     m.group("stamp").strip()))
    return entries


def _mounted_tracefs() -> list[str]:
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs":
            # /proc/self/mounts escapes space, tab, newline and backslash in octal.
            found.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1]))
    return found


def find_tracefs(*, mount_if_absent: bool = True) -> Path:
    """The tracefs root holding `uprobe_events`; mounts it when absent and root."""
    denied = None
    for cand in [*_mounted_tracefs(), *CANDIDATES]:
        try:
            os.stat(Path(cand, "uprobe_events"))
            return Path(cand)
        except PermissionError:
            # The kernel makes tracefs 0700 root: it is there, but not for us.
            denied = denied or cand
        except OSError:
            continue
    if denied is not None:
        raise KernelError(f"tracefs at {denied} is for root only: run as root for the "
                          "kernel engine, or use `-e ptrace` on your own processes",
                          errno.EACCES)
    target = CANDIDATES[0]
    if mount_if_absent and os.geteuid() == 0 and Path(target).is_dir():
        mount("nodev", target, "tracefs", what=f"mounting tracefs at {target}",
              hints={errno.ENODEV: "the kernel has no tracefs (CONFIG_TRACING)"})
        if Path(target, "uprobe_events").exists():
            return Path(target)
        raise KernelError(f"tracefs at {target} has no uprobe_events: the kernel lacks "
                          "CONFIG_UPROBE_EVENTS; use `-e ptrace`", errno.ENODEV)
    if os.geteuid() != 0:
        raise KernelError("tracefs is not available: need root to mount and use it "
                          "(or use `-e ptrace`)", errno.EACCES)
    raise KernelError("tracefs is not mounted and /sys/kernel/tracing does not exist; "
                      "use `-e ptrace`", errno.ENODEV)


def split_event_line(line: str) -> tuple[str, str, str]:
    """(kind, group, event) of a `uprobe_events` line; empty strings if absent."""
    m = _EVENT_LINE_RE.match(line.strip())
    if not m:
        raise KernelError(f"not a uprobe_events line: {line!r}", errno.EINVAL)
    return m.group("kind"), m.group("group") or "", m.group("event") or ""


class Tracefs:
    """One tracefs mount, and the uprobe files in it."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else find_tracefs()

    def _path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def _read(self, *parts: str) -> str:
        path = self._path(*parts)
        with kernel_errors(f"reading {path}", _WRITE_HINTS):
            return path.read_text(errors="surrogateescape")  # others' paths: any bytes

    def _write(self, text: str, *parts: str, append: bool = True) -> None:
        path = self._path(*parts)
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC) | os.O_CLOEXEC
        with kernel_errors(f"opening {path}", _WRITE_HINTS):
            fd = os.open(path, flags)
        try:
            data = os.fsencode(text)  # a name from the command line as its bytes
            while data:  # a long list of lines may take more than one write
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)

    def _error_log(self) -> list[ErrorLogEntry]:
        try:
            return parse_error_log(self._path("error_log").read_text(errors="surrogateescape"))
        except OSError:
            return []  # kernels before 5.4 have no error_log; we fall back to errno

    def _write_checked(self, text: str, what: str, *parts: str) -> None:
        """Write `text`; on failure raise with the kernel's `error_log` message.

        error_log is one file for every writer on the machine: another run may
        write its own bad line between our write and our read. So we never clear
        it (that would wipe another run's entry), and we take only an entry that
        is new since our write and whose command is one of the lines we wrote;
        without one, the errno speaks."""
        before = set(self._error_log())
        try:
            self._write(text, *parts)
        except OSError as e:
            err = e.errno or errno.EIO
            ours = {" ".join(line.split()) for line in text.splitlines()}
            mine = [x for x in self._error_log()
                    if x not in before and " ".join(x.command.split()) in ours]
            if mine and err not in (errno.EACCES, errno.EPERM, errno.EBUSY):
                entry = mine[-1]
                raise ProbeRejected(f"{what}: the kernel says: {entry.message}", err,
                                    entry.message, entry.command, entry.pos) from e
            raise kernel_error(what, err, _WRITE_HINTS) from e

    def add_probe(self, line: str) -> None:
        """Append one definition line to `uprobe_events`."""
        self._write_checked(line.strip() + "\n", f"adding probe {line.strip()!r}",
                            "uprobe_events")

    def add_probes(self, lines: list[str]) -> None:
        """Append many definition lines in one write (the kernel runs them in
        order and stops at the first it refuses; those before it stay)."""
        text = "".join(line.strip() + "\n" for line in lines)
        self._write_checked(text, f"adding {len(lines)} probes", "uprobe_events")

    def remove_event(self, group: str, event: str) -> None:
        """Delete event `group/event` (EBUSY while a perf event or ftrace uses it)."""
        self._write_checked(f"-:{group}/{event}\n", f"removing event {group}/{event}",
                            "uprobe_events")

    def remove_events(self, group: str, events: list[str]) -> None:
        """Delete events `group/EVENT...` with one write. The kernel runs the
        `-:` lines one by one and stops at the first it refuses; an event no
        perf fd uses any more goes without a grace period, so one write costs
        little per event."""
        text = "".join(f"-:{group}/{event}\n" for event in events)
        self._write_checked(text, f"removing {len(events)} events of {group}", "uprobe_events")

    def list_events(self) -> list[str]:
        """The lines of `uprobe_events`, one per probe point."""
        return [ln for ln in self._read("uprobe_events").splitlines() if ln.strip()]

    def events_of_group(self, group: str) -> list[str]:
        """Names of the events of `group`, each once, in definition order."""
        names: dict[str, None] = {}
        for line in self.list_events():
            _, g, ev = split_event_line(line)
            if g == group:
                names[ev] = None
        return list(names)

    def groups_with_prefix(self, prefix: str) -> list[str]:
        """Uprobe groups whose name starts with `prefix` (e.g. `uprobes_`)."""
        groups: dict[str, None] = {}
        for line in self.list_events():
            _, g, _ = split_event_line(line)
            if g.startswith(prefix):
                groups[g] = None
        return list(groups)

    def remove_group(self, group: str) -> None:
        """Remove every event of `group`; raises the first failure after trying all."""
        first: KernelError | None = None
        for ev in self.events_of_group(group):
            try:
                self.remove_event(group, ev)
            except KernelError as e:
                first = first or e
        if first is not None:
            raise first

    def event_id(self, group: str, event: str) -> int:
        """The tracepoint id of `group/event` (perf's `config` for PERF_TYPE_TRACEPOINT)."""
        return int(self._read("events", group, event, "id"))

    def available_events(self) -> list[str]:
        """Every trace event of this kernel, as `group:event` (`available_events`)."""
        return self._read("available_events").split()

    def event_format(self, group: str, event: str) -> EventFormat:
        """The parsed `format` file of `group/event`."""
        return parse_format(self._read("events", group, event, "format"))

    def set_filter(self, group: str, event: str, expr: str) -> None:
        """Set the event's ftrace filter (`0` clears it). This filters the ftrace
        buffer; perf events take their own filter (PERF_EVENT_IOC_SET_FILTER)."""
        self._write_checked(expr + "\n", f"setting filter {expr!r} on {group}/{event}",
                            "events", group, event, "filter")

    def profile(self) -> list[ProfileEntry]:
        """`uprobe_profile`: hits per probe point (summed over CPUs by the kernel)."""
        out = []
        for line in self._read("uprobe_profile").splitlines():
            parts = line.rsplit(None, 2)
            if len(parts) == 3 and parts[2].isdigit():
                out.append(ProfileEntry(parts[0].strip(), parts[1], int(parts[2])))
        return out


class ProbeGroup:
    """A group of uprobe events we own: everything added is removed on exit.

    Close the perf events on them first: the kernel refuses (EBUSY) to remove
    an event in use. On an exception the group's leftovers are removed too
    (events added by a line whose name we could not learn).
    """

    def __init__(self, tracefs: Tracefs, name: str) -> None:
        self.tracefs = tracefs
        self.name = name
        self.events: list[str] = []

    def add(self, line: str) -> str:
        """Add a `p:`/`r:` line of this group; returns the event's name."""
        kind, group, event = split_event_line(line)
        if kind == "-" or group != self.name:
            raise KernelError(f"probe line {line!r} does not define an event of group "
                              f"{self.name}", errno.EINVAL)
        before = set(self.tracefs.events_of_group(self.name)) if not event else set()
        self.tracefs.add_probe(line)
        if not event:  # `p:GRP/ ...`: the kernel names it; find which one is new
            new = [e for e in self.tracefs.events_of_group(self.name) if e not in before]
            event = new[0] if new else ""
        if event and event not in self.events:
            self.events.append(event)
        return event

    def add_event(self, event: str, lines: list[str]) -> None:
        """Define `event` by `lines` (one probe point each) in one write; on
        failure nothing of it is left."""
        for line in lines:
            kind, group, name = split_event_line(line)
            if kind == "-" or group != self.name or name != event:
                raise KernelError(f"probe line {line!r} does not define {self.name}/{event}",
                                  errno.EINVAL)
        if event not in self.events:
            self.events.append(event)
        try:
            self.tracefs.add_probes(lines)
        except KernelError:
            if event in self.tracefs.events_of_group(self.name):
                self.remove(event)
            else:
                self.events.remove(event)
            raise

    def remove(self, event: str) -> None:
        """Remove one of our events now (every probe point it holds)."""
        self.tracefs.remove_event(self.name, event)
        if event in self.events:
            self.events.remove(event)

    def remove_all(self, *, leftovers: bool = False) -> None:
        """Remove our events (and, with `leftovers`, anything else in the group)."""
        first: KernelError | None = None
        for ev in reversed(self.events):
            try:
                self.tracefs.remove_event(self.name, ev)
            except KernelError as e:
                if e.errno != errno.ENOENT:
                    first = first or e
        self.events.clear()
        if leftovers:
            try:
                self.tracefs.remove_group(self.name)
            except KernelError as e:
                first = first or e
        if first is not None:
            raise first

    def __enter__(self) -> ProbeGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.remove_all(leftovers=exc is not None)
        except KernelError:
            if exc is None:
                raise
            # The exception in flight says more than a failed clean-up does.
