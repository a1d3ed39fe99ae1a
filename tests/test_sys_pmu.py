"""The uprobe PMU: exact counts, pid filter, system-wide, retprobe, format bits."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from test_sys_support import Waiting, file_offset, no_fd_leak, reported_calls, threads_exe  # noqa: F401

from uprobes.errors import KernelError
from uprobes.sys.pmu import PMU_ROOT, FormatField, UprobeCounter, UprobePmu
from uprobes.sys.tracefs import Tracefs


@pytest.fixture(scope="module")
def pmu() -> UprobePmu:
    need_root = os.geteuid() == 0
    from conftest import need
    need(need_root, "the uprobe PMU needs root here (perf_event_paranoid=2)")
    need(PMU_ROOT.is_dir(), "the kernel has no uprobe PMU")
    return UprobePmu.load()


@pytest.fixture(scope="module")
def target(compile_c: object) -> Path:
    return compile_c("target.c")  # type: ignore[operator,no-any-return]


def run(target: Path, loops: int) -> int:
    out = subprocess.run([str(target), str(loops)], check=True, capture_output=True,
                         text=True).stdout
    return reported_calls(out)["add"]


def test_format_bits_from_sysfs(pmu: UprobePmu) -> None:
    assert pmu.type == int((PMU_ROOT / "type").read_text())
    retprobe = pmu.fields["retprobe"]
    assert (retprobe.attr_field, retprobe.lo, retprobe.hi) == ("config", 0, 0)
    ref = pmu.fields["ref_ctr_offset"]
    assert (ref.attr_field, ref.lo, ref.hi) == ("config", 32, 63)
    assert pmu.config(retprobe=True, ref_ctr_offset=0x10) == (0x10 << 32) | 1
    with pytest.raises(KernelError, match="does not fit in 32 bits"):
        pmu.config(ref_ctr_offset=1 << 32)


def test_format_field_parse() -> None:
    assert FormatField.parse("x", "config1:8-15\n") == FormatField("x", "config1", 8, 15)
    assert FormatField.parse("y", "config:3").encode(1) == 8
    with pytest.raises(KernelError, match="cannot parse"):
        FormatField.parse("z", "bogus")
    pmu = UprobePmu(9, {"retprobe": FormatField("retprobe", "config", 0, 0)})
    with pytest.raises(KernelError, match="no ref_ctr_offset"):
        pmu.config(ref_ctr_offset=4)


def test_pid_counter_counts_only_its_process(pmu: UprobePmu, target: Path) -> None:
    child = Waiting(target, "11")
    try:
        with UprobeCounter(str(target), file_offset(target, "add"), pid=child.pid,
                           pmu=pmu) as counter:
            counter.enable()
            assert run(target, 5) == 5  # another process: not counted
            calls = reported_calls(child.release())["add"]
            assert counter.read() == calls == 11
    finally:
        child.kill()


def test_system_wide_counter(pmu: UprobePmu, target: Path) -> None:
    with UprobeCounter(str(target), file_offset(target, "add"), pmu=pmu) as counter:
        assert counter.read() == 0
        counter.enable()
        calls = run(target, 7) + run(target, 5)
        assert counter.read() == calls == 12
        counter.disable()
        run(target, 3)
        assert counter.read() == 12


def test_retprobe_counts_returns(pmu: UprobePmu, target: Path) -> None:
    off = file_offset(target, "fib")
    with UprobeCounter(str(target), off, retprobe=True, pmu=pmu) as rets, \
            UprobeCounter(str(target), off, pmu=pmu) as entries:
        rets.enable()
        entries.enable()
        run(target, 1)
        # fib(5) makes 15 calls; each returns once.
        assert entries.read() == rets.read() == 15


def test_probe_is_owned_by_the_fd(pmu: UprobePmu, target: Path, tracefs: Path) -> None:
    tfs = Tracefs(tracefs)
    def mentioning_target() -> list[str]:  # other runs may come and go meanwhile
        return [ln for ln in tfs.list_events() if str(target) in ln]
    before = mentioning_target()
    counter = UprobeCounter(str(target), file_offset(target, "add"), pmu=pmu)
    assert mentioning_target() == before  # no tracefs event is created
    counter.close()
    assert counter.events == []
    counter.close()  # idempotent


def test_missing_file_is_a_kernel_error(pmu: UprobePmu) -> None:
    with pytest.raises(KernelError, match="opening uprobe counter on /no/such") as info:
        UprobeCounter("/no/such/file", 0x10, pid=os.getpid(), pmu=pmu)
    assert info.value.errno == errno.ENOENT


def test_counter_leaves_threads_and_fork_as_untraced(pmu: UprobePmu, threads_exe: Path) -> None:
    """Why UprobeCounter does not set inherit: measured on 6.18, a pid-bound
    uprobe PMU event with inherit made the target's pthread_create and fork
    fail with EFAULT. Whatever the kernel does with inherit, our counter leaves
    the program printing what it prints untraced; only the named thread counts."""
    untraced = Waiting(threads_exe)
    try:
        plain = untraced.release()
    finally:
        untraced.kill()
    assert "threads=4 failed=0 forked=1" in plain
    child = Waiting(threads_exe)
    try:
        with UprobeCounter(str(threads_exe), file_offset(threads_exe, "add"), pid=child.pid,
                           pmu=pmu) as counter:
            counter.enable()
            out = child.release()
            count = counter.read()
    finally:
        child.kill()
    assert out == plain
    assert count == 0  # the main thread never calls add itself
