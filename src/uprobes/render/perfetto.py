"""A native Perfetto trace (`.perfetto-trace`): Perfetto's own protobuf format.

Built with the `perfetto` package's definitions of the format
(`perfetto_trace_pb2`) and written packet by packet as events come, so a
long trace never sits in memory: a trace is `repeated TracePacket packet =
1`, so each packet is its field tag, its length and its bytes (what the
package's `StreamingTraceProtoBuilder` writes, without building a `Trace`
around each packet). What goes in:

- a `ClockSnapshot` at the start and at the end (MONOTONIC, REALTIME,
  BOOTTIME read together), MONOTONIC the trace's clock: every packet is
  stamped on it (`timestamp_clock_id`), as our events are;
- a track per process and per thread (`TrackDescriptor`, named by comm);
- a call (an entry and the return of one function, paired per thread) as
  a slice on its thread's track, with the entry's arguments and the
  return's (`return.NAME`) as debug annotations; other hits as instants;
- with `trace --kernel`: each system call a slice on a `syscalls` track
  under its thread (arguments at the entry, `ret` at the exit), the
  thread's state from its switches (`GenericKernelTaskStateEvent`:
  running on a CPU, runnable once woken or preempted, sleeping, blocked,
  stopped), and page faults
  and other tracepoints as instants on the thread's track;
- a counter per process and probe (`calls NAME` for a function's calls
  returned, `hits NAME` for other probes): how many so far, its values carried by
  the slices and instants themselves (`extra_counter_values`), no packet
  of its own;
- at the end, an instant `uprobes` on a track of its own with the counts
  (events, lost, kernel events and lost).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

from uprobes.analysis.calls import CallPairer
from uprobes.model.event import ArgValue, Event, Hit, ProbeInfo, hit_event
from uprobes.model.kevent import KernelEvent, KernelRow, KernelValue, row_event
from uprobes.render.values import plain_args
from uprobes.sys.clocks import ClockSnapshot, snapshot

SEQUENCE_ID = 1
"""Every packet is ours, on one sequence."""
SUMMARY_TRACK = 1
_PROCESS, _THREAD, _SYSCALLS = 1, 2, 3  # the low bits of a track's uuid, above a pid or tid
_COUNTERS = 1 << 62  # counter tracks' uuids: above every task's

# sched_switch's state letters (engines/kevents/decode.py) -> Perfetto's.
_STATES = {"R": "RUNNABLE", "S": "INTERRUPTIBLE_SLEEP", "D": "UNINTERRUPTIBLE_SLEEP",
           "T": "STOPPED", "t": "STOPPED", "X": "DEAD", "Z": "DEAD", "I": "INTERRUPTIBLE_SLEEP",
           "P": "UNINTERRUPTIBLE_SLEEP"}


def _pb() -> Any:
    # Imported when a Perfetto trace is asked for: the format's definitions
    # are large, and no other output needs them.
    from perfetto.protos.perfetto.trace import perfetto_trace_pb2
    return perfetto_trace_pb2


def track_uuid(task: int, kind: int) -> int:
    """The uuid of a process's (`_PROCESS`) or thread's track, or of a thread's syscalls."""
    return task << 2 | kind


class PerfettoRenderer:
    """Writes TracePackets to `out` (binary) as events come; `summary()` ends the trace.

    `calls`: names of the entry probes that have a return probe on the same
    function; their hits wait for the return to become slices. `past_entry`:
    those placed past their function's first instruction (`CallPairer.past_entry`).
    """

    def __init__(self, out: BinaryIO, probes: dict[str, ProbeInfo],
                 calls: Iterable[str] = (), clock_start: ClockSnapshot | None = None,
                 past_entry: Mapping[str, int] | None = None) -> None:
        self.pb = _pb()
        self.out = out
        self.probes = probes
        self.calls = frozenset(calls)
        self._pairer = CallPairer(past_entry=dict(past_entry or {}))
        self._tracks: set[int] = set()
        self._in_syscall: set[int] = set()  # threads whose syscall entry was written
        self._counts: dict[tuple[int, str], tuple[int, int]] = {}  # (pid, probe) -> (uuid, n)
        self._kernel_counts: tuple[int, int] | None = None
        self._first = True
        self.clock_end: ClockSnapshot | None = None  # None: the clocks at `summary`
        self._clocks(clock_start or snapshot())

    def _packet(self, ts_ns: int | None = None) -> Any:
        packet = self.pb.TracePacket()
        packet.trusted_packet_sequence_id = SEQUENCE_ID
        if self._first:
            packet.sequence_flags = self.pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
            self._first = False
        if ts_ns is not None:
            packet.timestamp = ts_ns
            packet.timestamp_clock_id = self.pb.BUILTIN_CLOCK_MONOTONIC
        return packet

    def _write(self, packet: Any) -> None:
        data = packet.SerializeToString()
        self.out.write(_PACKET_TAG + _varint(len(data)) + data)

    def _clocks(self, now: ClockSnapshot) -> None:
        pb = self.pb
        packet = self._packet()
        snap = packet.clock_snapshot
        snap.primary_trace_clock = pb.BUILTIN_CLOCK_MONOTONIC
        for clock_id, ts in ((pb.BUILTIN_CLOCK_MONOTONIC, now.monotonic_ns),
                             (pb.BUILTIN_CLOCK_REALTIME, now.realtime_ns),
                             (pb.BUILTIN_CLOCK_BOOTTIME, now.boottime_ns)):
            clock = snap.clocks.add()
            clock.clock_id = clock_id
            clock.timestamp = ts
        self._write(packet)

    def _thread_track(self, pid: int, tid: int, comm: str) -> int:
        """The uuid of the thread's track, described the first time."""
        uuid = track_uuid(tid, _THREAD)
        if uuid in self._tracks:
            return uuid
        process = track_uuid(pid, _PROCESS)
        if process not in self._tracks:
            self._tracks.add(process)
            packet = self._packet()
            packet.track_descriptor.uuid = process
            packet.track_descriptor.process.pid = pid
            packet.track_descriptor.process.process_name = comm
            self._write(packet)
        self._tracks.add(uuid)
        packet = self._packet()
        desc = packet.track_descriptor
        desc.uuid = uuid
        desc.parent_uuid = process
        desc.thread.pid = pid
        desc.thread.tid = tid
        desc.thread.thread_name = comm
        self._write(packet)
        return uuid

    def _syscall_track(self, pid: int, tid: int, comm: str) -> int:
        thread = self._thread_track(pid, tid, comm)
        uuid = track_uuid(tid, _SYSCALLS)
        if uuid not in self._tracks:
            self._tracks.add(uuid)
            packet = self._packet()
            packet.track_descriptor.uuid = uuid
            packet.track_descriptor.parent_uuid = thread
            packet.track_descriptor.name = "syscalls"
            self._write(packet)
        return uuid

    def _count(self, pid: int, probe: str, what: str) -> tuple[int, int]:
        """(counter track uuid, new value) of `probe`'s hits in process `pid`,
        the track described the first time."""
        uuid, n = self._counts.get((pid, probe), (0, 0))
        if not uuid:
            uuid = _COUNTERS + len(self._counts)
            packet = self._packet()
            desc = packet.track_descriptor
            desc.uuid = uuid
            desc.parent_uuid = track_uuid(pid, _PROCESS)
            desc.name = f"{what} {probe}"
            desc.counter.SetInParent()
            self._write(packet)
        self._counts[pid, probe] = (uuid, n + 1)
        return uuid, n + 1

    def _track_event(self, ts_ns: int, track: int, kind: str, name: str | None,
                     args: Iterable[tuple[str, ArgValue | KernelValue]] = (),
                     counter: tuple[int, int] | None = None) -> None:
        packet = self._packet(ts_ns)
        ev = packet.track_event
        ev.type = getattr(self.pb.TrackEvent, kind)
        ev.track_uuid = track
        if counter is not None:
            ev.extra_counter_track_uuids.append(counter[0])
            ev.extra_counter_values.append(counter[1])
        if name is not None:
            ev.name = name
        for key, value in args:
            _annotate(ev.debug_annotations.add(), key, value)
        self._write(packet)

    def hits(self, hits: list[Hit]) -> None:
        for hit in hits:
            self.event(hit_event(hit, self.probes[hit[4]]))

    def event(self, ev: Event) -> None:
        track = self._thread_track(ev.pid, ev.tid, ev.comm)
        start = self._pairer.route(ev, self.calls)
        if isinstance(start, Event):
            self._track_event(start.ts_ns, track, "TYPE_SLICE_BEGIN",
                              self.probes[start.probe].event, self._hit_args(start))
            self._track_event(ev.ts_ns, track, "TYPE_SLICE_END", None,
                              [(f"return.{k}", v) for k, v in self._args(ev).items()],
                              self._count(start.pid, start.probe, "calls"))
        elif not start:
            self._instant(ev)

    def _args(self, ev: Event) -> dict[str, ArgValue]:
        info = self.probes.get(ev.probe)
        return plain_args(ev.args, info.args) if info else ev.args

    def _hit_args(self, ev: Event) -> list[tuple[str, ArgValue | KernelValue]]:
        args: list[tuple[str, ArgValue | KernelValue]] = list(self._args(ev).items())
        if ev.stack is not None:
            frames: list[str | None] = [str(frame) for frame in ev.stack]
            args.append(("stack", frames))
        return args

    def _instant(self, ev: Event) -> None:
        info = self.probes.get(ev.probe)
        self._track_event(ev.ts_ns, self._thread_track(ev.pid, ev.tid, ev.comm), "TYPE_INSTANT",
                          info.event if info else ev.probe, self._hit_args(ev),
                          self._count(ev.pid, ev.probe, "hits"))

    def kernel_rows(self, rows: list[KernelRow]) -> None:
        for row in rows:
            self.kernel_event(row_event(row))

    def kernel_event(self, ev: KernelEvent) -> None:
        if ev.kind == "syscall_enter":
            self._in_syscall.add(ev.tid)
            self._track_event(ev.ts_ns, self._syscall_track(ev.pid, ev.tid, ev.comm),
                              "TYPE_SLICE_BEGIN", ev.name, ev.fields.items())
        elif ev.kind == "syscall_exit":
            # The exit of a call entered before tracing began (exec's) has no slice.
            if ev.tid in self._in_syscall:
                self._in_syscall.discard(ev.tid)
                self._track_event(ev.ts_ns, self._syscall_track(ev.pid, ev.tid, ev.comm),
                                  "TYPE_SLICE_END", None, ev.fields.items())
        elif ev.kind in ("off_cpu", "on_cpu", "wakeup"):
            self._task_state(ev)
        else:
            self._track_event(ev.ts_ns, self._thread_track(ev.pid, ev.tid, ev.comm),
                              "TYPE_INSTANT", ev.name, ev.fields.items())

    def _task_state(self, ev: KernelEvent) -> None:
        self._thread_track(ev.pid, ev.tid, ev.comm)
        if ev.kind == "on_cpu":
            state = "RUNNING"
        elif ev.kind == "wakeup":
            state = "RUNNABLE"
        else:
            letter = str(ev.fields.get("state", "R"))[:1]
            state = _STATES.get(letter, "UNKNOWN")
        packet = self._packet(ev.ts_ns)
        task = packet.generic_kernel_task_state_event
        task.cpu = ev.cpu
        task.comm = ev.comm
        task.tid = ev.tid
        task.state = getattr(self.pb.GenericKernelTaskStateEvent, f"TASK_STATE_{state}")
        self._write(packet)

    def kernel_summary(self, events: int, lost: int) -> None:
        self._kernel_counts = (events, lost)

    def summary(self, events: int, lost: int) -> None:
        for ev in sorted(self._pairer.still_open(), key=lambda e: e.ts_ns):
            self._instant(ev)
        end = self.clock_end or snapshot()
        packet = self._packet()
        packet.track_descriptor.uuid = SUMMARY_TRACK
        packet.track_descriptor.name = "uprobes"
        self._write(packet)
        counts: list[tuple[str, ArgValue]] = [("events", events), ("lost", lost)]
        if self._kernel_counts is not None:
            counts += [("kernel_events", self._kernel_counts[0]),
                       ("kernel_lost", self._kernel_counts[1])]
        self._track_event(end.monotonic_ns, SUMMARY_TRACK, "TYPE_INSTANT", "uprobes", counts)
        self._clocks(end)


_PACKET_TAG = b"\x0a"  # Trace.packet: field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _annotate(ann: Any, name: str, value: ArgValue | KernelValue) -> None:
    """One argument as a debug annotation: integers as ints (unsigned past
    int64), strings as strings, a faulted string `(fault)`, lists as arrays."""
    ann.name = name
    _annotation_value(ann, value)


def _annotation_value(ann: Any, value: ArgValue | KernelValue | str) -> None:
    if isinstance(value, list):
        for item in value:
            _annotation_value(ann.array_values.add(), item)
    elif isinstance(value, str):
        ann.string_value = value
    elif value is None:
        ann.string_value = "(fault)"
    elif value >= 1 << 63:
        ann.uint_value = value
    else:
        ann.int_value = value
