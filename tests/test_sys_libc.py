"""The errno layer and the features snapshot."""

from __future__ import annotations

import errno
import os
import platform

import pytest
from test_sys_support import no_fd_leak  # noqa: F401

from uprobes.errors import KernelError
from uprobes.sys import libc
from uprobes.sys.features import detect, features


def test_syscall_numbers_per_arch() -> None:
    assert libc.syscall_number("perf_event_open", "x86_64") == 298
    assert libc.syscall_number("perf_event_open", "aarch64") == 241
    with pytest.raises(KernelError, match="not known on sparc"):
        libc.syscall_number("perf_event_open", "sparc")


def test_syscall_success_and_errno() -> None:
    if platform.machine() != "x86_64":
        pytest.skip("gettid number checked on x86_64")
    assert libc.syscall("gettid", what="gettid") == os.getpid()
    with pytest.raises(KernelError, match=r"pidfd_open of pid -5: Invalid argument \(EINVAL\)"):
        libc.syscall("pidfd_open", -5, 0, what="pidfd_open of pid -5")


def test_kernel_error_messages() -> None:
    e = libc.kernel_error("writing uprobe_events", errno.EBUSY, {errno.EBUSY: "event in use"})
    assert isinstance(e, KernelError) and e.errno == errno.EBUSY
    assert str(e) == "writing uprobe_events: Device or resource busy (EBUSY): event in use"
    assert str(libc.kernel_error("x", errno.EACCES)).endswith("need root")
    with pytest.raises(KernelError, match="reading /nonexistent: .*ENOENT"):
        with libc.kernel_errors("reading /nonexistent"):
            open("/nonexistent")
    with pytest.raises(KernelError) as info:
        libc.os_call(os.close, 10 ** 6, what="closing")
    assert info.value.errno == errno.EBADF


def test_ioctl_errors() -> None:
    with pytest.raises(KernelError, match="bogus ioctl") as info:
        libc.ioctl(10 ** 6, 0x2400, 0, what="bogus ioctl")
    assert info.value.errno == errno.EBADF


def test_features_report() -> None:
    f = detect()
    rows = dict(f.report())
    assert rows["kernel"] == platform.release()
    assert rows["root"] == ("yes" if os.geteuid() == 0 else "no")
    paranoid = int(open("/proc/sys/kernel/perf_event_paranoid").read())
    assert f.perf_event_paranoid == paranoid
    if os.path.isdir("/sys/bus/event_source/devices/uprobe"):
        assert f.uprobe_pmu_type == int(open("/sys/bus/event_source/devices/uprobe/type").read())
        assert rows["uprobe PMU retprobe"] == open(
            "/sys/bus/event_source/devices/uprobe/format/retprobe").read().strip()
    if os.geteuid() == 0 and f.tracefs is not None:
        assert f.uprobe_events_writable and f.kernel_engine_usable
        assert rows["kernel engine"] == "usable"
    assert f.ptrace_scope is None or 0 <= f.ptrace_scope <= 3
    assert features() is features()
