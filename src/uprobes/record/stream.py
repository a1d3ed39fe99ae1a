"""events.bin: a stream of chunks, each `KIND (4 bytes) LENGTH (u32 LE) PAYLOAD`.

Kinds (see the package's docstring): RING (`created`, `now`: u64 TSC stamps
of the ring's making and of the read, `read`: which read of the run it came
from, `slot_bytes`: the ring's slot size, then whole ring slots), OWNR and
HITS (JSON). A reader stops at a chunk
that is cut short (a run killed mid-write) and says so; it never reads a
length it has no bytes for.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from uprobes.engines.trapfree.layout import SHORT
from uprobes.errors import RecordingError

HEADER = struct.Struct("<4sI")
RING_HEAD = struct.Struct("<QQQQ")
RING, OWNERS, HITS = b"RING", b"OWNR", b"HITS"
KINDS = (RING, OWNERS, HITS)
MAX_CHUNK = 1 << 28  # no writer makes a chunk this long (a ring holds 4 MiB)


def dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class ChunkWriter:
    """Chunks to the file descriptor `fd`, each in one system call (writev),
    straight from the pieces given: a ring's slots go to the file from the
    ring, with no copy of ours and no buffer in between."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes = 0

    def write(self, kind: bytes, *pieces: bytes | memoryview) -> None:
        length = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)
        todo: list[bytes | memoryview] = [HEADER.pack(kind, length), *pieces]
        left = HEADER.size + length
        while True:
            done = os.writev(self.fd, todo)
            left -= done
            if not left:
                break
            while done:  # a short write (a signal, a full disk): the rest again
                size = len(memoryview(todo[0]).cast("B"))
                if done < size:
                    todo[0] = memoryview(todo[0]).cast("B")[done:]
                    break
                done -= size
                todo.pop(0)
        self.bytes += HEADER.size + length


def chunks(f: BinaryIO, path: str) -> Iterator[tuple[bytes, bytes]]:
    """(kind, payload) of each whole chunk; RecordingError for what no
    writer of ours makes. A last chunk cut short ends the stream (see
    `truncated`)."""
    while True:
        head = f.read(HEADER.size)
        if not head:
            return
        if len(head) < HEADER.size:
            raise Truncated(path)
        kind, length = HEADER.unpack(head)
        if kind not in KINDS or length > MAX_CHUNK or (
                kind == RING and (length < RING_HEAD.size
                                  or (length - RING_HEAD.size) % SHORT.slot_bytes)):
            raise RecordingError(f"{path}: not a chunk uprobes writes at byte "
                                 f"{f.tell() - HEADER.size}")
        payload = f.read(length)
        if len(payload) < length:
            raise Truncated(path)
        yield kind, payload


class Truncated(RecordingError):
    """The stream ends inside a chunk: the recording run was killed mid-write."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} ends inside a chunk (the recording was cut short)")
