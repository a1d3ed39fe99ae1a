"""What a ring hands over -> `KernelRow`s, in one walk over its perf records.

This is the hot path of `trace --kernel`: a thread busy with system calls
fills the rings with raw_syscalls samples (two a call, a hundred thousand a
second and more), so those are decoded in the walk itself, with one unpack
of the record's header, the sample's fixed part and the raw record's first
words (the system call's number and, on exit, its return value), and the
shape of each call looked up by its number. Samples of other tracepoints
go to their decoders (decode.py); switch records are threads coming back
on a CPU; PERF_RECORD_LOST says how many records a full ring dropped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from uprobes.engines.kevents.decode import ON_CPU, Decoders, Syscalls
from uprobes.engines.kevents.runs import decode_run
from uprobes.errors import KernelError
from uprobes.model.kevent import KernelRow
from uprobes.sys.perf import (
    PERF_RECORD_LOST,
    PERF_RECORD_MISC_SWITCH_OUT,
    PERF_RECORD_SAMPLE,
    PERF_RECORD_SWITCH,
    PERF_RECORD_SWITCH_CPU_WIDE,
)
from uprobes.sys.perf_ring import RECORD_HEADER

# A record's header, and a sample's TID (pid, tid), TIME, CPU (cpu, and a
# reserved u32), RAW's size, then the raw record's common_type (the
# tracepoint it is) and its signed words at Syscalls.ID_AT and VALUE_AT. A
# shorter record's unpack reads what follows it, or `_PAD` past the end,
# and uses none of it.
_HEAD = struct.Struct(f"<IHHIIQI4xIH{Syscalls.ID_AT - 2}xqq")
_RAW_AT = RECORD_HEADER.size + 28  # the raw record, in a sample
_PAD = bytes(_HEAD.size)  # (runs.py needs 8 bytes of it)
_SAMPLE_ID = struct.Struct("<IIQII")  # a switch record's trailer: TID, TIME, CPU
_LOST = struct.Struct("<QQ")
_SWITCHES = (PERF_RECORD_SWITCH, PERF_RECORD_SWITCH_CPU_WIDE)


class Records:
    """Walks what rings hand over into rows, leaving out uprobes' own
    threads (`own_pid`: system-wide, its main thread is filtered in the
    kernel, the reader's thread cannot be). Counts `samples` per tracepoint
    id (uprobes' own too: the kernel counted them) and `lost` records; the
    rows of the tracepoints in `sched_ids` also go to `sched`, for the
    owner to see switches and wakeups without a pass over every row."""

    def __init__(self, decoders: Decoders, comm_of: Callable[[int], str], own_pid: int,
                 sched_ids: set[int]) -> None:
        self.decoders = decoders
        self.comm_of = comm_of
        self.own_pid = own_pid
        self.sched_ids = sched_ids
        self.samples: dict[int, int] = {}
        self.lost = 0
        self.sched: list[KernelRow] = []

    def read(self, data: bytes, out: list[KernelRow], corrupt: Callable[[int], KernelError],
             whole: bool = True) -> int:
        """Append the rows of `data`'s records to `out`, in its order, and say
        how many bytes they took. `whole`: `data` ends with a whole record
        (else its last may be cut: it is left for the next read); a record
        whose size cannot be: `corrupt(size)` is raised."""
        if not data:
            return 0
        end = len(data)
        data += _PAD
        calls = self.decoders.syscalls
        enter_id, exit_id, entered = calls.enter_id, calls.exit_id, calls.entered
        enters, exits = calls.enters, calls.exits
        args_at = _RAW_AT + Syscalls.VALUE_AT
        by_id, comms, comm_of = self.decoders.by_id, self.decoders.comms, self.comm_of
        samples, own, sched_ids, sched = self.samples, self.own_pid, self.sched_ids, self.sched
        append, head = out.append, _HEAD.unpack_from
        n_enter = n_exit = 0
        # What the previous record had: a busy thread's records come in runs.
        last_tid, comm = -1, ""
        last_enter, last_exit = None, None
        no_run_before = 0  # runs.py found no run of calls to decode before this
        pos = 0
        try:
            while pos < end:
                rtype, misc, size, pid, tid, ts, cpu, raw_size, event_id, nr, value = \
                    head(data, pos)
                if size < 8 or pos + size > end:
                    # A cut record (its 8-byte header too, maybe: then
                    # `size` was read from the padding): the next read has it whole.
                    if (size >= 8 or end - pos < 8) and not whole:
                        break
                    raise corrupt(size)
                if rtype == PERF_RECORD_SAMPLE:
                    if event_id == enter_id:
                        if pid != own:
                            if tid != last_tid:
                                last_tid, comm = tid, comms.get(tid) or comm_of(tid)
                            if pos >= no_run_before:
                                pairs, no_run_before = decode_run(data, pos, end, calls, comm,
                                                                  out)
                                if pairs:
                                    n_enter += pairs
                                    n_exit += pairs
                                    pos = no_run_before
                                    continue
                        n_enter += 1
                        if pid != own:
                            entered[tid] = nr
                            if last_enter is None or last_enter[0] != nr:
                                last_enter = (nr, *(enters.get(nr) or calls.enter(nr)))
                            _, shape, unpack = last_enter
                            append((ts, pid, tid, cpu, comm, shape,
                                    () if unpack is None else unpack(data, pos + args_at)))
                    elif event_id == exit_id:
                        n_exit += 1
                        if pid != own:
                            if tid != last_tid:
                                last_tid, comm = tid, comms.get(tid) or comm_of(tid)
                            if nr < 0:
                                # A call that rewrote its registers (the uretprobe
                                # trampoline's, rt_sigreturn) exits as -1: it is
                                # the call the thread entered.
                                nr = entered.get(tid, nr)
                            if last_exit is None or last_exit[0] != nr:
                                last_exit = (nr, exits.get(nr) or calls.exit(nr))
                            append((ts, pid, tid, cpu, comm, last_exit[1], (value,)))
                    else:
                        decoder = by_id.get(event_id)
                        if decoder is not None:
                            samples[event_id] = samples.get(event_id, 0) + 1
                            row = decoder(data, pos + _RAW_AT, raw_size, pid, tid, cpu, ts,
                                          comms.get(tid) or comm_of(tid))
                            last_tid = -1  # a switch off the CPU renames its thread
                            # The row's task, not the sample's: a wakeup's sample
                            # is its waker's, which may be uprobes (resuming a
                            # thread it stopped, or a timer that fired in it).
                            if row[1] != own:
                                append(row)
                                if event_id in sched_ids:
                                    sched.append(row)
                elif rtype in _SWITCHES and not misc & PERF_RECORD_MISC_SWITCH_OUT:
                    # Off the CPU is sched_switch's sample (it has the state); on is this.
                    pid, tid, ts, cpu, _res = _SAMPLE_ID.unpack_from(
                        data, pos + size - _SAMPLE_ID.size)
                    if pid != own:
                        append((ts, pid, tid, cpu, comm_of(tid), ON_CPU, ()))
                elif rtype == PERF_RECORD_LOST:
                    self.lost += _LOST.unpack_from(data, pos + 8)[1]
                pos += size
        finally:  # counted even when a corrupt record ends the walk
            if n_enter:
                samples[enter_id] = samples.get(enter_id, 0) + n_enter
            if n_exit:
                samples[exit_id] = samples.get(exit_id, 0) + n_exit
        return pos
