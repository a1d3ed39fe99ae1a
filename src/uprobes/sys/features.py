"""What this kernel offers uprobes, detected once, printable by `uprobes doctor`."""

from __future__ import annotations

import functools
import gzip
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from uprobes.errors import KernelError
from uprobes.sys.libc import SYSCALL_NUMBERS
from uprobes.sys.pmu import PMU_ROOT, UprobePmu
from uprobes.sys.tracefs import find_tracefs

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38


@dataclass(frozen=True)
class Features:
    """A snapshot of the kernel's uprobe support and our privileges.

    Fields are None (or False) where a thing is missing; the `*_why` fields
    say why, in words a user can act on.
    """

    kernel: str
    machine: str
    arch_supported: bool
    is_root: bool
    cap_sys_admin: bool
    cap_perfmon: bool
    tracefs: str | None
    tracefs_why: str
    uprobe_events_writable: bool
    uprobe_pmu_type: int | None
    uprobe_pmu_bits: tuple[tuple[str, str], ...]
    uprobe_pmu_why: str
    perf_event_paranoid: int | None
    ptrace_scope: int | None
    btf: bool

    @property
    def kernel_engine_usable(self) -> bool:
        """tracefs events can be defined and read through perf."""
        return self.tracefs is not None and self.uprobe_events_writable and self.arch_supported

    def report(self) -> list[tuple[str, str]]:
        """(item, finding) rows, in the order a reader checks them."""
        def yes(b: bool) -> str:
            return "yes" if b else "no"

        return [
            ("kernel", self.kernel),
            ("architecture", self.machine + ("" if self.arch_supported else " (unsupported)")),
            ("root", yes(self.is_root)),
            ("CAP_SYS_ADMIN", yes(self.cap_sys_admin)),
            ("CAP_PERFMON", yes(self.cap_perfmon)),
            ("tracefs", self.tracefs or f"unavailable: {self.tracefs_why}"),
            ("uprobe_events writable", yes(self.uprobe_events_writable)),
            ("uprobe PMU", f"type {self.uprobe_pmu_type}" if self.uprobe_pmu_type is not None
             else f"unavailable: {self.uprobe_pmu_why}"),
            *((f"uprobe PMU {name}", spec) for name, spec in self.uprobe_pmu_bits),
            ("perf_event_paranoid", _opt(self.perf_event_paranoid)),
            ("ptrace_scope (yama)", _opt(self.ptrace_scope, "yama absent: no restriction")),
            ("BTF (/sys/kernel/btf/vmlinux)", yes(self.btf)),
            ("kernel engine", "usable" if self.kernel_engine_usable else
             "not usable: use `-e ptrace`"),
        ]


def _opt(v: int | None, missing: str = "unknown") -> str:
    return missing if v is None else str(v)


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def detect() -> Features:
    """Probe the kernel now (cheap: a few sysfs/procfs reads, no events created)."""
    caps = _effective_caps()
    tracefs: str | None = None
    why = ""
    writable = False
    try:
        root = find_tracefs()
        tracefs = str(root)
        writable = os.access(root / "uprobe_events", os.W_OK)
    except KernelError as e:
        why = str(e)
    pmu_type: int | None = None
    bits: tuple[tuple[str, str], ...] = ()
    pmu_why = ""
    try:
        pmu = UprobePmu.load(PMU_ROOT)
        pmu_type = pmu.type
        bits = tuple((n, f"{f.attr_field}:{f.lo}" + (f"-{f.hi}" if f.hi != f.lo else ""))
                     for n, f in sorted(pmu.fields.items()))
    except KernelError as e:
        pmu_why = str(e)
    return Features(
        kernel=platform.release(), machine=platform.machine(),
        arch_supported=platform.machine() in SYSCALL_NUMBERS,
        is_root=os.geteuid() == 0,
        cap_sys_admin=bool(caps >> CAP_SYS_ADMIN & 1),
        cap_perfmon=bool(caps >> CAP_PERFMON & 1),
        tracefs=tracefs, tracefs_why=why, uprobe_events_writable=writable,
        uprobe_pmu_type=pmu_type, uprobe_pmu_bits=bits, uprobe_pmu_why=pmu_why,
        perf_event_paranoid=_read_int("/proc/sys/kernel/perf_event_paranoid"),
        ptrace_scope=_read_int("/proc/sys/kernel/yama/ptrace_scope"),
        btf=Path("/sys/kernel/btf/vmlinux").exists(),
    )


def vdso_images() -> tuple[str, ...]:
    """The vDSO images this kernel maps into processes, by ABI as the vdsofs
    proposal names them: `64` always on x86-64, `32` with IA32 emulation
    (unless `abi.vsyscall32` is 0, which maps none into 32-bit processes),
    `x32` when the kernel's configuration has the x32 ABI."""
    if platform.machine() != "x86_64":
        return ()
    images = ["64"]
    if (_read_int("/proc/sys/abi/vsyscall32") or 0) > 0:
        images.append("32")
    if "CONFIG_X86_X32_ABI=y" in _kernel_config():
        images.append("x32")
    return tuple(images)


def _kernel_config() -> str:
    """The kernel's build configuration, where it can be read ('' if not)."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read()
    except OSError:
        pass
    try:
        return Path(f"/boot/config-{platform.release()}").read_text()
    except OSError:
        return ""


@functools.cache
def features() -> Features:
    """`detect()` once per process."""
    return detect()
