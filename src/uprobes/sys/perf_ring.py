"""perf_event_open(2)'s mmap ring buffer and the records in it: sample
layouts by PERF_SAMPLE_* bits, PERF_RECORD_LOST and MMAP2 records, the
user registers and stack copied into a sample. sys/perf.py opens the
events; this module reads what they write.
"""

from __future__ import annotations

import errno
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

from uprobes.errors import KernelError
from uprobes.sys.libc import kernel_errors
from uprobes.sys.perf import (
    PAGE_SIZE,
    PERF_RECORD_FORK,
    PERF_RECORD_LOST,
    PERF_RECORD_MMAP2,
    PERF_RECORD_SAMPLE,
    PERF_SAMPLE_ADDR,
    PERF_SAMPLE_CPU,
    PERF_SAMPLE_ID,
    PERF_SAMPLE_IDENTIFIER,
    PERF_SAMPLE_IP,
    PERF_SAMPLE_PERIOD,
    PERF_SAMPLE_RAW,
    PERF_SAMPLE_REGS_USER,
    PERF_SAMPLE_STACK_USER,
    PERF_SAMPLE_STREAM_ID,
    PERF_SAMPLE_TID,
    PERF_SAMPLE_TIME,
    PerfEvent,
)

_DATA_HEAD = 1024
_DATA_TAIL = 1032
_DATA_OFFSET = 1040
_DATA_SIZE = 1048

_PARSEABLE = (PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME
              | PERF_SAMPLE_ADDR | PERF_SAMPLE_ID | PERF_SAMPLE_STREAM_ID | PERF_SAMPLE_CPU
              | PERF_SAMPLE_PERIOD | PERF_SAMPLE_RAW | PERF_SAMPLE_REGS_USER
              | PERF_SAMPLE_STACK_USER)

# What each PERF_SAMPLE_* bit puts in a sample, in the kernel's order
# (perf_output_sample()), as struct codes and the names of their values; a
# name of "" is padding. RAW ends the fixed part with its u32 size.
_SAMPLE_FIELDS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (PERF_SAMPLE_IDENTIFIER, "Q", ("id",)),
    (PERF_SAMPLE_IP, "Q", ("ip",)),
    (PERF_SAMPLE_TID, "II", ("pid", "tid")),
    (PERF_SAMPLE_TIME, "Q", ("time_ns",)),
    (PERF_SAMPLE_ADDR, "Q", ("",)),
    (PERF_SAMPLE_ID, "Q", ("id",)),
    (PERF_SAMPLE_STREAM_ID, "Q", ("",)),
    (PERF_SAMPLE_CPU, "II", ("cpu", "")),
    (PERF_SAMPLE_PERIOD, "Q", ("",)),
    (PERF_SAMPLE_RAW, "I", ("raw_size",)),
)
RECORD_HEADER = struct.Struct("<IHH")  # struct perf_event_header: type, misc, size
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def user_tail(data: bytes, raw_size_at: int, nregs: int,
              stack: bool) -> tuple[tuple[int, ...] | None, bytes]:
    """The user registers and stack of a sample whose RAW size (u32) is at
    `raw_size_at` in `data`: (`nregs` register values in mask-bit order, or
    None when the hit had no user registers; the bytes copied from the
    user stack pointer up, whose address is the sampled sp). Layout
    (perf_output_sample()): RAW's size counts its padding to 8 bytes;
    REGS_USER is u64 abi, then the registers if abi != 0; STACK_USER is
    u64 size, `size` bytes, then u64 dyn_size (what was really copied) if
    size != 0."""
    at = raw_size_at + 4 + _U32.unpack_from(data, raw_size_at)[0]
    regs = None
    if nregs:
        abi = _U64.unpack_from(data, at)[0]
        at += 8
        if abi:
            regs = struct.unpack_from(f"<{nregs}Q", data, at)
            at += 8 * nregs
    copied = b""
    if stack:
        size = _U64.unpack_from(data, at)[0]
        at += 8
        if size:
            dyn = _U64.unpack_from(data, at + size)[0]
            copied = data[at:at + min(size, dyn)]
    return regs, copied
_LOST = struct.Struct("<QQ")  # PERF_RECORD_LOST: id, lost
# PERF_RECORD_MMAP2: pid, tid, addr, len, pgoff, maj, min, ino, ino_generation,
# prot, flags, then the NUL-terminated file name.
_MMAP2 = struct.Struct("<IIQQQIIQQII")
_FORK = struct.Struct("<IIIIQ")  # PERF_RECORD_FORK: pid, ppid, tid, ptid, time


@dataclass(frozen=True)
class ForkRecord:
    """A PERF_RECORD_FORK of a new process (not a thread): `pid`'s address
    space starts as a copy of `ppid`'s, mappings included; `time` as the
    samples' (the event's clock)."""

    pid: int
    ppid: int
    time: int


@dataclass(frozen=True)
class MmapRecord:
    """A PERF_RECORD_MMAP2: task `pid` mapped `path` at [`start`, `start +
    length`) from `file_offset` (bytes)."""

    pid: int
    tid: int
    start: int
    length: int
    file_offset: int
    dev_major: int
    dev_minor: int
    inode: int
    prot: int
    path: str

    @classmethod
    def parse(cls, body: bytes) -> MmapRecord:
        pid, tid, start, length, pgoff, maj, mnr, ino, _gen, prot, _flags = \
            _MMAP2.unpack_from(body)
        name = body[_MMAP2.size:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        return cls(pid, tid, start, length, pgoff, maj, mnr, ino, prot, name)


@dataclass(frozen=True)
class SampleLayout:
    """The fixed part of a PERF_RECORD_SAMPLE body for one `sample_type`.

    `code` is a struct code (no byte-order prefix) for every field up to and
    including RAW's u32 size; `names` names each value it unpacks ("" for
    what we skip); the raw record, if any, starts `size` bytes into the body.
    A reader that knows the record's own layout appends its code to `code`
    and unpacks sample and record with one call.
    """

    code: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, sample_type: int) -> SampleLayout:
        if sample_type & ~_PARSEABLE:
            raise KernelError(f"cannot parse perf samples of sample_type {sample_type:#x}",
                              errno.EINVAL)
        code = ""
        names: tuple[str, ...] = ()
        for bit, c, n in _SAMPLE_FIELDS:
            if sample_type & bit:
                code += c
                names += n
        return cls(code, names)

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.code)

    def index(self, name: str) -> int | None:
        """Where `name` is in the unpacked values (None when not sampled)."""
        return self.names.index(name) if name in self.names else None


@dataclass(frozen=True)
class Sample:
    """A PERF_RECORD_SAMPLE: who, when (ns of the event's clock), where, and the raw record."""

    pid: int
    tid: int
    time_ns: int
    cpu: int
    raw: bytes
    ip: int = 0
    id: int = 0


class RingBuffer:
    """The mmap ring of one perf event: 1 metadata page + 2^n data pages.

    The kernel writes records and advances `data_head`; we read up to it and
    publish `data_tail`, which lets the kernel reuse the space. When the ring
    is full the kernel drops records and later writes one PERF_RECORD_LOST
    with how many; `lost` sums them.
    """

    def __init__(self, event: PerfEvent, data_pages: int = 64) -> None:
        if data_pages < 1 or data_pages & (data_pages - 1):
            raise KernelError(f"ring buffer data pages must be a power of two, not {data_pages}",
                              errno.EINVAL)
        self.event = event
        self.sample_type = int(event.attr.sample_type)
        self.layout = SampleLayout.of(self.sample_type)
        self._sample = struct.Struct("<" + self.layout.code)
        self.lost = 0
        self.samples = 0
        # PERF_RECORD_MMAP2s and process FORKs read, in order, for the owner to take
        self.mmaps: list[MmapRecord | ForkRecord] = []
        size = (1 + data_pages) * PAGE_SIZE
        with kernel_errors(f"mapping the ring buffer of {event.what}", {
                errno.EINVAL: "a per-task event with inherit cannot be mmapped: "
                              "open one event per CPU", errno.EPERM:
                "over the locked-memory limit (perf_event_mlock_kb)"}):
            self._map = mmap.mmap(event.fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        # The metadata page as u64 words: a memoryview item is one 8-byte
        # load or store (memcpy of a u64), where struct's "<Q" goes byte by
        # byte. A torn data_tail, seen by the kernel while we write it, can
        # look far behind and make a nearly full ring seem empty to
        # perf_output_begin() (its space check is modulo the ring size):
        # the kernel then overwrites records we have not read (measured:
        # "corrupt perf record of size 0" in about 1 run in 8 of a burst).
        self._words = memoryview(self._map)[:PAGE_SIZE].cast("Q")
        self._offset = self._u64(_DATA_OFFSET) or PAGE_SIZE
        self._size = self._u64(_DATA_SIZE) or data_pages * PAGE_SIZE

    def _u64(self, at: int) -> int:
        return int(self._words[at // 8])

    def _publish_tail(self, tail: int) -> None:
        self._words[_DATA_TAIL // 8] = tail

    def fileno(self) -> int:
        """The event fd: poll it for POLLIN (wakeup_events / watermark reached)."""
        return self.event.fd

    def _copy(self, pos: int, n: int) -> bytes:
        start = self._offset + pos % self._size
        end = start + n
        limit = self._offset + self._size
        if end <= limit:
            return self._map[start:end]
        return self._map[start:limit] + self._map[self._offset:self._offset + end - limit]

    def take(self) -> bytes:
        """Everything the kernel wrote since the last take, in one copy
        (records whole: the kernel writes a record before it moves
        `data_head` past it).

        `data_head` is read once; x86-64 does not reorder loads with loads,
        so no barrier is needed before the copy (other arches need the
        smp_rmb() of perf's reader, which Python cannot issue). `data_tail`
        is published once, after the copy, which frees the whole batch for
        the kernel."""
        if self._map.closed:
            return b""
        head = int(self._words[_DATA_HEAD // 8])
        tail = int(self._words[_DATA_TAIL // 8])
        if tail >= head:
            return b""
        data = self._copy(tail, head - tail)
        self._publish_tail(head)
        return data

    def peek(self, limit: int) -> tuple[bytes, bool]:
        """Up to `limit` bytes of what the kernel wrote since the last
        `advance` (or take), and whether that is all of it. The caller reads
        the whole records among them and frees those by `advance`; the
        last record of a cut copy may be cut too (`take`'s ordering notes
        hold)."""
        if self._map.closed:
            return b"", True
        tail = int(self._words[_DATA_TAIL // 8])
        n = int(self._words[_DATA_HEAD // 8]) - tail
        if n <= 0:
            return b"", True
        return self._copy(tail, min(n, limit)), n <= limit

    def advance(self, n: int) -> None:
        """Free the first `n` bytes that `peek` showed for the kernel."""
        if n and not self._map.closed:
            self._publish_tail(int(self._words[_DATA_TAIL // 8]) + n)

    def corrupt(self, size: int) -> KernelError:
        """The error for a record header whose size cannot be (a reader of
        `take()`'s bytes raises it and reads no further)."""
        return KernelError(f"corrupt perf record of size {size} in {self.event.what}")

    def account(self, rtype: int, data: bytes, pos: int, size: int) -> None:
        """A record other than a sample, at `pos` in `data`: PERF_RECORD_LOST
        adds to `lost`, PERF_RECORD_MMAP2 and a new process's
        PERF_RECORD_FORK are kept in `mmaps`."""
        if rtype == PERF_RECORD_LOST:
            self.lost += _LOST.unpack_from(data, pos + 8)[1]
        elif rtype == PERF_RECORD_MMAP2:
            self.mmaps.append(MmapRecord.parse(data[pos + 8:pos + size]))
        elif rtype == PERF_RECORD_FORK:
            pid, ppid, _tid, _ptid, when = _FORK.unpack_from(data, pos + 8)
            if pid != ppid:
                self.mmaps.append(ForkRecord(pid, ppid, when))

    def read(self) -> Iterator[Sample]:
        """The samples the kernel has written since the last read, as
        `Sample`s, record by record (the convenient, slower way; the kernel
        engine reads runs of records: engines/kernel/batches.py)."""
        data = self.take()
        bodies: list[int] = []
        pos, end = 0, len(data)
        while pos < end:
            rtype, _misc, rsize = RECORD_HEADER.unpack_from(data, pos)
            if rsize < 8 or pos + rsize > end:
                raise self.corrupt(rsize)
            if rtype == PERF_RECORD_SAMPLE:
                bodies.append(pos + 8)
            else:
                self.account(rtype, data, pos, rsize)
            pos += rsize
        self.samples += len(bodies)
        for at in bodies:
            yield self._parse_sample(data, at)

    def _parse_sample(self, data: bytes, at: int) -> Sample:
        vals = dict(zip(self.layout.names, self._sample.unpack_from(data, at)))
        raw = b""
        if "raw_size" in vals:
            start = at + self._sample.size
            raw = data[start:start + vals["raw_size"]]
        return Sample(pid=vals.get("pid", 0), tid=vals.get("tid", 0),
                      time_ns=vals.get("time_ns", 0), cpu=vals.get("cpu", 0), raw=raw,
                      ip=vals.get("ip", 0), id=vals.get("id", 0))

    def close(self) -> None:
        """Unmap the ring (the event fd stays with its owner)."""
        if not self._map.closed:
            self._words.release()
            self._map.close()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["ForkRecord", "MmapRecord", "RingBuffer", "Sample", "SampleLayout", "user_tail"]
