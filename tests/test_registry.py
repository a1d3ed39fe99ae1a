"""The probe registry: keys, order, refcounts, prepared dispatch, concurrency."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from uprobes.errors import EngineError
from uprobes.lang.ast import FileTarget, ProbeKind, ProbeSpec
from uprobes.model.probe import InodeKey, ResolvedProbe, VdsoKey
from uprobes.model.registry import Consumer, Registry, TaskFilter


@dataclass(frozen=True)
class Task:
    pid: int
    tid: int
    comm: str


def point(dev: int, ino: int, off: int, ref: int | None = None) -> ResolvedProbe:
    spec = ProbeSpec(ProbeKind.ENTRY, FileTarget("/x", offset=off))
    return ResolvedProbe(spec=spec, key=InodeKey(dev, ino, off), path="/x", file_offset=off,
                         kind=ProbeKind.ENTRY, group="g", event=f"e{off}", args=(),
                         ref_ctr_offset=ref)


def test_one_probe_per_key_with_refcount() -> None:
    reg = Registry()
    a, b = Consumer(handler=print), Consumer(handler=print)
    p1 = reg.add(point(1, 2, 0x10), a)
    p2 = reg.add(point(1, 2, 0x10), b)
    assert p1 is p2 and p1.refs == 2 and len(reg) == 1
    assert reg.remove(p1.key, a) is False and p1.refs == 1
    assert reg.remove(p1.key, b) is True and len(reg) == 0 and reg.get(p1.key) is None


def test_in_inode_is_a_sorted_range() -> None:
    reg = Registry()
    for dev, ino, off in [(1, 5, 0x30), (1, 4, 0x10), (1, 5, 0x10), (2, 5, 0x0), (1, 5, 0x20)]:
        reg.add(point(dev, ino, off), Consumer(handler=print))
    reg.add(ResolvedProbe(spec=point(0, 0, 0).spec, key=VdsoKey(7, 0x10), path="[vdso]",
                          file_offset=0x10, kind=ProbeKind.ENTRY, group="g", event="v",
                          args=()), Consumer(handler=print))
    assert [p.key.file_offset for p in reg.in_inode(1, 5)] == [0x10, 0x20, 0x30]
    assert [p.key for p in reg.in_inode(1, 4)] == [InodeKey(1, 4, 0x10)]
    assert reg.in_inode(3, 5) == []
    assert reg.inodes() == [(1, 4), (1, 5), (2, 5)]
    assert [p.key for p in reg.in_vdso(7)] == [VdsoKey(7, 0x10)]


def test_single_consumer_is_called_directly() -> None:
    reg = Registry()
    seen: list[Task] = []
    probe = reg.add(point(1, 1, 0), Consumer(handler=seen.append))
    assert probe.dispatch == seen.append  # no wrapper in the hit path
    probe.dispatch(Task(1, 1, "a"))
    assert seen == [Task(1, 1, "a")]


def test_several_consumers_with_filters() -> None:
    reg = Registry()
    calls: list[str] = []
    reg.add(point(1, 1, 0), Consumer(handler=lambda t: calls.append(f"all:{t.tid}")))
    reg.add(point(1, 1, 0), Consumer(handler=lambda t: calls.append(f"pid7:{t.tid}"),
                                     filter=TaskFilter(pids=frozenset({7}))))
    probe = reg.add(point(1, 1, 0), Consumer(
        ret_handler=lambda t: calls.append(f"ret:{t.tid}"),
        filter=TaskFilter(comms=frozenset({"sort"}))))
    probe.dispatch(Task(7, 8, "x"))
    probe.dispatch(Task(9, 9, "sort"))
    probe.ret_dispatch(Task(9, 9, "sort"))
    probe.ret_dispatch(Task(7, 7, "x"))
    assert calls == ["all:8", "pid7:8", "all:9", "ret:9"]
    assert probe.wants_return


def test_prefilter_decides_placement_per_process() -> None:
    reg = Registry()
    probe = reg.add(point(1, 1, 0), Consumer(handler=print, filter=TaskFilter(pids=frozenset({5}))))
    assert probe.wants_process(5) and not probe.wants_process(6)
    reg.add(point(1, 1, 0), Consumer(handler=print, filter=TaskFilter(comms=frozenset({"ls"}))))
    assert probe.wants_process(6, "ls") and not probe.wants_process(6, "cat")
    assert probe.wants_process(6)  # comm not known yet (before exec): keep it


def test_ref_ctr_mismatch_refused_like_the_kernel() -> None:
    reg = Registry()
    reg.add(point(1, 1, 0x40, ref=0x100), Consumer(handler=print))
    with pytest.raises(EngineError, match="reference counter offset mismatch"):
        reg.add(point(1, 1, 0x40, ref=0x200), Consumer(handler=print))


def test_removing_unknown_consumer_is_an_error() -> None:
    reg = Registry()
    p = reg.add(point(1, 1, 0), Consumer(handler=print))
    with pytest.raises(EngineError):
        reg.remove(p.key, Consumer(handler=print))


def test_consumers_change_while_probes_fire() -> None:
    """Hits on one thread, consumers added and removed on another: no error,
    and every hit reaches exactly the consumers present when it was dispatched."""
    reg = Registry()
    base: list[int] = []
    probe = reg.add(point(1, 1, 0), Consumer(handler=lambda t: base.append(1)))
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                c = Consumer(handler=lambda t: None)
                reg.add(probe.point, c)
                reg.remove(probe.key, c)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=churn)
    th.start()
    task = Task(1, 1, "t")
    for _ in range(20000):
        probe.dispatch(task)
    stop.set()
    th.join()
    assert not errors
    assert len(base) == 20000
    assert probe.refs == 1
