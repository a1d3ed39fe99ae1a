"""The `uprobe` perf PMU: fd-owned probes that count hits with no tracefs event.

`perf_event_open` with `type` = /sys/bus/event_source/devices/uprobe/type
creates a uprobe for (path, file offset) that lives exactly as long as the fd
(kernel/trace/trace_uprobe.c create_local_trace_uprobe). The layout of
`config` (retprobe bit, ref_ctr_offset bits) is read from the PMU's
`format/` directory at run time, as libbpf does, never hard-coded.
"""

from __future__ import annotations

import ctypes
import errno
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from uprobes.errors import KernelError
from uprobes.sys.libc import kernel_errors
from uprobes.sys.perf import ATTR_DISABLED, ATTR_INHERIT, PerfEvent, PerfEventAttr, online_cpus

PMU_ROOT = Path("/sys/bus/event_source/devices/uprobe")

_HINTS: Mapping[int, str] = {
    errno.ENOENT: "the file to probe does not exist",
    errno.EINVAL: "the kernel refused the probe (offset beyond the file, not a regular "
                  "file, or ref_ctr_offset mismatch with an existing probe)",
    524: "the kernel cannot probe the instruction at this offset",  # ENOTSUPP, kernel-internal
}


@dataclass(frozen=True)
class FormatField:
    """One `format/NAME` file: `config:0` or `config:32-63` (bits lo..hi of `attr.config`)."""

    name: str
    attr_field: str
    lo: int
    hi: int

    @classmethod
    def parse(cls, name: str, text: str) -> FormatField:
        """Parse `config:0` / `config1:32-63`."""
        m = re.fullmatch(r"\s*(\w+):(\d+)(?:-(\d+))?\s*", text)
        if not m:
            raise KernelError(f"cannot parse uprobe PMU format {name!r}: {text.strip()!r}")
        lo = int(m.group(2))
        return cls(name, m.group(1), lo, int(m.group(3) or lo))

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    def encode(self, value: int) -> int:
        """`value` shifted into place; KernelError if it does not fit."""
        if value < 0 or value >= 1 << self.width:
            raise KernelError(f"{self.name}={value:#x} does not fit in {self.width} bits "
                              f"of {self.attr_field}", errno.EINVAL)
        return value << self.lo


@dataclass(frozen=True)
class UprobePmu:
    """The PMU's dynamic `type` and its `format/` fields by name."""

    type: int
    fields: Mapping[str, FormatField]

    @classmethod
    def load(cls, root: Path = PMU_ROOT) -> UprobePmu:
        """Read the PMU from sysfs; KernelError if the kernel has none."""
        if not root.is_dir():
            raise KernelError("the kernel has no `uprobe` perf PMU "
                              f"({root} missing): use tracefs events", errno.ENODEV)
        with kernel_errors(f"reading the uprobe PMU in {root}"):
            pmu_type = int((root / "type").read_text())
            fields = {p.name: FormatField.parse(p.name, p.read_text())
                      for p in sorted((root / "format").iterdir())}
        return cls(pmu_type, fields)

    def config(self, *, retprobe: bool = False, ref_ctr_offset: int = 0) -> int:
        """`attr.config` for these options, bits placed as `format/` says."""
        value = 0
        for name, want in (("retprobe", int(retprobe)), ("ref_ctr_offset", ref_ctr_offset)):
            if not want:
                continue
            field = self.fields.get(name)
            if field is None or field.attr_field != "config":
                raise KernelError(f"this kernel's uprobe PMU has no {name} in config",
                                  errno.EOPNOTSUPP)
            value |= field.encode(want)
        return value


class UprobeCounter:
    """A counting uprobe (or uretprobe) on (path, file offset), owned.

    With `pid` the kernel installs the breakpoint only in that task's mm, and
    counts hits of that one *thread* (perf's pid is a tid: hits in the
    process's other threads are not counted). With `pid=None` it counts
    system-wide through one event per online CPU, summed.

    Never set `inherit` (kept only so tests can show why): measured on 6.18,
    a pid-bound uprobe PMU event with inherit makes every pthread_create (and
    fork) of the target fail with EFAULT. The child's copy of the event runs
    the PMU's init again, which reads the path through the `config1` user
    pointer, now in the target's address space where it is not mapped.
    """

    def __init__(self, path: str, file_offset: int, *, pid: int | None = None,
                 retprobe: bool = False, ref_ctr_offset: int = 0, inherit: bool = False,
                 pmu: UprobePmu | None = None) -> None:
        self.path = path
        self.file_offset = file_offset
        self.pmu = pmu or UprobePmu.load()
        # The kernel copies the string at open (strndup_user); we keep it for
        # the object's life anyway so the pointer in attr is never dangling.
        self._path_buf = ctypes.create_string_buffer(path.encode())
        self.events: list[PerfEvent] = []
        kind = "uretprobe" if retprobe else "uprobe"
        what = f"opening {kind} counter on {path}:{file_offset:#x}"
        targets = [(pid, -1)] if pid is not None else [(-1, c) for c in online_cpus()]
        try:
            for tpid, cpu in targets:
                attr = PerfEventAttr()
                attr.size = ctypes.sizeof(attr)
                attr.type = self.pmu.type
                attr.config = self.pmu.config(retprobe=retprobe, ref_ctr_offset=ref_ctr_offset)
                attr.config1 = ctypes.addressof(self._path_buf)
                attr.config2 = file_offset
                attr.flags = ATTR_DISABLED | (ATTR_INHERIT if inherit else 0)
                self.events.append(PerfEvent.open(attr, pid=tpid, cpu=cpu, what=what,
                                                  hints=_HINTS))
        except BaseException:
            self.close()
            raise

    def enable(self) -> None:
        """Start counting (breakpoints go in on open; counting starts here)."""
        for ev in self.events:
            ev.enable()

    def disable(self) -> None:
        """Stop counting."""
        for ev in self.events:
            ev.disable()

    def read(self) -> int:
        """Hits so far, summed over the per-CPU events."""
        return sum(ev.read_count() for ev in self.events)

    def close(self) -> None:
        """Close every fd: the kernel removes the probe with the last one."""
        for ev in self.events:
            ev.close()
        self.events.clear()

    def __enter__(self) -> UprobeCounter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
