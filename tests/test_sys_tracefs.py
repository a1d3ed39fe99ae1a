"""tracefs: probe lines in, exact values out through perf rings; errors; owned groups."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from test_sys_support import file_offset, no_fd_leak, reported_calls  # noqa: F401

from uprobes.errors import KernelError
from uprobes.sys.event_format import EventFormat, parse_format
from uprobes.sys.perf import PerfEvent, online_cpus, open_tracepoint
from uprobes.sys.perf_ring import RingBuffer, Sample
from uprobes.sys.tracefs import (
    ProbeGroup,
    ProbeRejected,
    Tracefs,
    parse_error_log,
    split_event_line,
)

LOOPS = 7


@contextmanager
def recording(tfs: Tracefs, group: str, events: list[str],
              data_pages: int = 16) -> Iterator[tuple[dict[int, EventFormat], list[RingBuffer]]]:
    """Per-CPU sampling events on `events`, one ring per CPU shared by all of them."""
    formats = {f.id: f for f in (tfs.event_format(group, e) for e in events)}
    with ExitStack() as stack:
        rings: list[RingBuffer] = []
        perf_events: list[PerfEvent] = []
        for cpu in online_cpus():
            lead: PerfEvent | None = None
            for fmt in formats.values():
                ev = stack.enter_context(open_tracepoint(fmt.id, cpu=cpu))
                if lead is None:
                    lead = ev
                    rings.append(stack.enter_context(RingBuffer(ev, data_pages)))
                else:
                    ev.set_output(lead)
                perf_events.append(ev)
        for ev in perf_events:
            ev.enable()
        yield formats, rings


def drain(formats: dict[int, EventFormat],
          rings: list[RingBuffer]) -> list[tuple[str, dict[str, object], Sample]]:
    out: list[tuple[str, dict[str, object], Sample]] = []
    for ring in rings:
        for s in ring.read():
            fmt = formats[int.from_bytes(s.raw[:2], "little")]
            out.append((fmt.name, dict(fmt.decode(s.raw)), s))
    return sorted(out, key=lambda r: r[2].time_ns)


def run(target: Path, loops: int = LOOPS) -> dict[str, int]:
    out = subprocess.run([str(target), str(loops)], check=True, capture_output=True,
                         text=True).stdout
    return reported_calls(out)


def test_format_fields(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "add")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"p:{group}/add {target}:{off:#x} a=%di:s64 b=%si:u32 s=+0(%di):string "
               "d=+0(%si):x16[2]")
        fmt = tfs.event_format(group, "add")
        assert fmt.name == "add" and fmt.id == tfs.event_id(group, "add")
        assert [f.name for f in fmt.fields] == ["__probe_ip", "a", "b", "s", "d"]
        a, b, s, d = (fmt.field(n) for n in "absd")
        assert (a.size, a.signed, a.type) == (8, True, "s64")
        assert (b.size, b.signed, b.type) == (4, False, "u32")
        assert s.data_loc and s.is_string and s.size == 4
        assert d.array_len == 2 and d.element_size == 2 and not d.data_loc
        assert a.offset == 16 and not fmt.is_return
        assert fmt.print_fmt.startswith('"(%lx) a=%Ld')
        # (other runs on the machine may have events of their own groups)
        assert [ln for ln in tfs.list_events() if ln.startswith(f"p:{group}/")] == [
            f"p:{group}/add {target}:{off:#018x} a=%di:s64 b=%si:u32 s=+0(%di):string "
            "d=+0(%si):x16[2]"]


def test_entry_probe_exact_values(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "add")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"p:{group}/add {target}:{off:#x} a=%di:s64 b=%si:s64")
        with recording(tfs, group, pg.events) as (formats, rings):
            calls = run(target)
            records = drain(formats, rings)
    assert [r[0] for r in records] == ["add"] * calls["add"]
    assert [(r[1]["a"], r[1]["b"]) for r in records] == [(i, 100) for i in range(LOOPS)]
    ips = {r[1]["__probe_ip"] for r in records}
    assert len(ips) == 1 and all(r[2].pid == r[2].tid for r in records)


def test_return_probe_retval(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "add")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"r:{group}/add_ret {target}:{off:#x} rv=$retval:s64")
        fmt = tfs.event_format(group, "add_ret")
        assert fmt.is_return and [f.name for f in fmt.args] == ["rv"]
        with recording(tfs, group, pg.events) as (formats, rings):
            calls = run(target)
            records = drain(formats, rings)
    assert [r[1]["rv"] for r in records] == [i + 100 for i in range(calls["add"])]


def test_string_argument_via_data_loc(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "greet")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"p:{group}/greet {target}:{off:#x} name=+0(%di):string times=%si:s32 "
               "bad=+0(%si):string")
        with recording(tfs, group, pg.events) as (formats, rings):
            calls = run(target)
            records = drain(formats, rings)
    assert len(records) == calls["greet"] == LOOPS
    # `bad` dereferences the int 2 as a pointer: the kernel records a fault.
    assert {(r[1]["name"], r[1]["times"], r[1]["bad"]) for r in records} == {("world", 2, None)}


def test_entry_and_return_share_one_ring(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "add")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"p:{group}/add {target}:{off:#x} a=%di:s64")
        pg.add(f"r:{group}/add_ret {target}:{off:#x} rv=$retval:s64")
        with recording(tfs, group, pg.events) as (formats, rings):
            run(target)
            records = drain(formats, rings)
    names = [r[0] for r in records]
    assert names == ["add", "add_ret"] * LOOPS


def test_profile_counts_hits(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "point_sum")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"p:{group}/point_sum {target}:{off:#x}")
        with recording(tfs, group, pg.events):
            calls = run(target)
            hits = {p.event: p for p in tfs.profile()}["point_sum"]
    assert hits.hits == calls["point_sum"] and hits.path == str(target)


def test_bad_line_raises_kernel_message(tfs: Tracefs, group: str, target: Path) -> None:
    line = f"p:{group}/nope {target}:0x10 x=%di:nosuchtype"
    with pytest.raises(ProbeRejected) as info:
        tfs.add_probe(line)
    e = info.value
    assert isinstance(e, KernelError) and e.errno == errno.EINVAL
    assert e.kernel_message == "Unknown type is specified"
    assert e.command == line and e.command[e.pos:].startswith("nosuchtype")
    assert e.lines()[2].index("^") - 2 == e.pos
    with pytest.raises(ProbeRejected, match="Failed to find the given file"):
        tfs.add_probe(f"p:{group}/nope /no/such/file:0x10")


class _AnotherRunBetween(Tracefs):
    """Our tracefs layer, with another run's bad write landing right after
    each write of ours fails. With `clear`, that run clears error_log first
    (as uprobes once did), so our entry is gone when we read."""

    def __init__(self, root: Path, other_line: str) -> None:
        super().__init__(root)
        self.other_line = other_line
        self.clear = True

    def _write(self, text: str, *parts: str, append: bool = True) -> None:
        try:
            super()._write(text, *parts, append=append)
        except OSError:
            if parts == ("uprobe_events",):
                if self.clear:
                    super()._write("", "error_log", append=False)
                with pytest.raises(OSError):
                    super()._write(self.other_line + "\n", "uprobe_events")
            raise


def test_bad_line_never_takes_another_runs_message(tfs: Tracefs, group: str,
                                                   target: Path) -> None:
    other = f"p:{group}/other {target}:0x1z"  # "Invalid uprobe offset"
    racing = _AnotherRunBetween(tfs.root, other)
    with pytest.raises(KernelError) as info:
        racing.add_probe(f"p:{group}/nope {target}:0x10 x=%di:nosuchtype")
    assert "Invalid uprobe offset" not in str(info.value)
    assert not isinstance(info.value, ProbeRejected)  # our entry is gone: the errno speaks
    assert info.value.errno == errno.EINVAL
    # ours is found before a later entry of another run, and theirs survive ours
    racing.clear = False
    with pytest.raises(ProbeRejected, match="Unknown type is specified"):
        racing.add_probe(f"p:{group}/nope {target}:0x10 x=%di:nosuchtype")
    commands = [e.command for e in parse_error_log((tfs.root / "error_log").read_text())]
    tfs_line = f"p:{group}/nope2 {target}:0x10 x=%di:nosuchtype2"
    with pytest.raises(ProbeRejected, match="Unknown type is specified"):
        tfs.add_probe(tfs_line)
    after = [e.command for e in parse_error_log((tfs.root / "error_log").read_text())]
    assert other in commands and other in after, "a failed write of ours wiped error_log"


def test_many_lines_take_the_refused_lines_message(tfs: Tracefs, group: str,
                                                   target: Path) -> None:
    off = file_offset(target, "add")
    good = f"p:{group}/add {target}:{off:#x}"
    bad = f"p:{group}/nope {target}:0x10 x=%di:nosuchtype"
    try:
        with pytest.raises(ProbeRejected, match="Unknown type is specified") as info:
            tfs.add_probes([good, bad])
        assert info.value.command == bad
    finally:
        tfs.remove_group(group)


def test_remove_busy_and_missing(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "add")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"p:{group}/add {target}:{off:#x}")
        with open_tracepoint(tfs.event_id(group, "add"), cpu=0):
            with pytest.raises(KernelError, match="event in use") as info:
                tfs.remove_event(group, "add")
            assert info.value.errno == errno.EBUSY
    with pytest.raises(KernelError) as missing:
        tfs.remove_event(group, "add")
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(KernelError, match="reading .*/events/"):
        tfs.event_id(group, "add")


def test_probe_group_removes_on_exit(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "add")
    with ProbeGroup(tfs, group) as pg:
        assert pg.add(f"p:{group}/add {target}:{off:#x}") == "add"
        assert pg.add(f"r:{group}/ {target}:{off:#x}") == f"p_{target.name.split('-')[0]}_{off:#x}"
        pg.add(f"p:{group}/add {target}:{off + 1:#x}")  # a second point on the same event
        # (other test sessions on this machine may have groups of their own)
        assert [g for g in tfs.groups_with_prefix("uprobes_test_") if g == group] == [group]
        assert len(tfs.list_events()) >= 3 and pg.events[0] == "add"
    assert group not in tfs.groups_with_prefix("uprobes_test_")


def test_probe_group_removes_leftovers_on_exception(tfs: Tracefs, group: str,
                                                     target: Path) -> None:
    off = file_offset(target, "add")
    with pytest.raises(RuntimeError):
        with ProbeGroup(tfs, group) as pg:
            pg.add(f"p:{group}/add {target}:{off:#x}")
            tfs.add_probe(f"p:{group}/stray {target}:{off:#x}")  # not recorded by pg
            raise RuntimeError("boom")
    assert group not in tfs.groups_with_prefix("uprobes_test_")


def test_probe_group_refuses_foreign_lines(tfs: Tracefs, group: str, target: Path) -> None:
    with ProbeGroup(tfs, group) as pg:
        with pytest.raises(KernelError, match="does not define an event of group"):
            pg.add(f"p:other/add {target}:0x10")


def test_perf_filter_and_tracefs_filter(tfs: Tracefs, group: str, target: Path) -> None:
    off = file_offset(target, "add")
    with ProbeGroup(tfs, group) as pg:
        pg.add(f"p:{group}/add {target}:{off:#x} a=%di:s64")
        tfs.set_filter(group, "add", "a == 3")
        with pytest.raises(KernelError, match="setting filter"):
            tfs.set_filter(group, "add", "nosuchfield == 3")
        tfs.set_filter(group, "add", "a == 3")  # ftrace only: perf does not see it
        fmt = tfs.event_format(group, "add")
        with ExitStack() as stack:
            rings = []
            for cpu in online_cpus():
                ev = stack.enter_context(open_tracepoint(fmt.id, cpu=cpu))
                ev.set_filter("a >= 5")
                rings.append(stack.enter_context(RingBuffer(ev, 4)))
                ev.enable()
            run(target)
            values = sorted(int(fmt.decode(s.raw)["a"]) for r in rings for s in r.read())  # type: ignore[arg-type]
    assert values == [5, 6]


def test_parse_error_log_and_event_lines() -> None:
    text = ("[  298.820311] trace_uprobe: error: Invalid uprobe offset\n"
            "  Command: p:g/e /bin/true:zz\n"
            "                           ^\n")
    (entry,) = parse_error_log(text)
    assert (entry.subsystem, entry.message, entry.command) == (
        "trace_uprobe", "Invalid uprobe offset", "p:g/e /bin/true:zz")
    assert entry.command[entry.pos:] == "zz"
    assert split_event_line("r:uprobes_x/ev /bin/true:0x10 a=%ax") == ("r", "uprobes_x", "ev")
    assert split_event_line("-:g.ev") == ("-", "g", "ev")
    assert split_event_line("p /bin/true:0x10") == ("p", "", "")
    with pytest.raises(KernelError, match="not a uprobe_events line"):
        split_event_line("x:g/e /bin/true:0x10")


def test_parse_format_pure() -> None:
    text = """name: ev
ID: 77
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;
\tfield:s8 n;\toffset:16;\tsize:1;\tsigned:1;
\tfield:u16 d[];\toffset:17;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] s;\toffset:21;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] e;\toffset:25;\tsize:4;\tsigned:1;

print fmt: "(%lx) n=%d", REC->__probe_ip, REC->n
"""
    fmt = parse_format(text)
    assert fmt.id == 77 and [f.name for f in fmt.common_fields] == ["common_type", "common_pid"]
    raw = bytearray(40)
    raw[0:2] = (77).to_bytes(2, "little")
    raw[8:16] = (0x1234).to_bytes(8, "little")
    raw[16] = 0xFF
    raw[17:21] = b"\x01\x00\x02\x00"
    raw[21:25] = ((3 << 16) | 29).to_bytes(4, "little")
    raw[25:29] = (0).to_bytes(4, "little")
    raw[29:32] = b"hi\0"
    assert fmt.record_type(bytes(raw)) == 77
    assert fmt.decode(bytes(raw)) == {"__probe_ip": 0x1234, "n": -1, "d": (1, 2), "s": "hi",
                                      "e": None}
    with pytest.raises(KernelError, match="too short"):
        fmt.decode(bytes(raw[:20]))


def test_parse_format_string_array() -> None:
    """`string[3]` as the kernel declares it: `__data_loc char[][3]`, three
    data_locs of 4 bytes side by side, one string each (length 0: faulted)."""
    text = """name: sa
ID: 78
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;

\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__data_loc char[][3] sa;\toffset:16;\tsize:12;\tsigned:1;

print fmt: "(%lx) sa={\\"%s\\",\\"%s\\",\\"%s\\"}", REC->__probe_ip, __get_str(sa[0])
"""
    [ip, sa] = parse_format(text).fields
    assert (sa.name, sa.array_len, sa.element_size, sa.is_string) == ("sa", 3, 4, True)
    raw = bytearray(40)
    raw[16:20] = ((2 << 16) | 28).to_bytes(4, "little")
    raw[20:24] = (0).to_bytes(4, "little")
    raw[24:28] = ((4 << 16) | 30).to_bytes(4, "little")
    raw[28:34] = b"a\0bcd\0"
    assert sa.decode(bytes(raw)) == ("a", None, "bcd")


def test_another_tools_probe_on_a_path_that_is_not_utf8(tfs: Tracefs, group: str, target: Path,
                                                        tmp_path: Path) -> None:
    """A probe of another tool's on a file whose name is not UTF-8 (any bytes
    but / and NUL) is read past, and ours are added and listed beside it
    (before: a UnicodeDecodeError traceback for every kernel-engine run)."""
    odd = tmp_path / os.fsdecode(b"odd\xffname")
    odd.write_bytes(target.read_bytes())
    foreign = f"{group}_foreign"
    events = os.open(tfs.root / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    os.write(events, b"p:%s/odd %s:0x10\n" % (foreign.encode(), os.fsencode(odd)))
    try:
        with ProbeGroup(tfs, group) as pg:
            pg.add(f"p:{group}/add {target}:0x10")
            listed = tfs.list_events()
            assert any(os.fsencode(odd) in os.fsencode(ln) for ln in listed), listed
            assert tfs.events_of_group(group) == ["add"]
    finally:
        os.write(events, b"-:%s/odd\n" % foreign.encode())
        os.close(events)
