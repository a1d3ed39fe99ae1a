"""The kernel engine's fast path to text and JSON lines (engines/kernel/lines.py):
the same lines, byte for byte and in the same order, as the general renderers
write from each hit, on real records of a fixture whose comms need escaping."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from conftest import Compiler, without_clocks

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.engines.kernel.batches import agreeing
from uprobes.engines.kernel.lines import ALIKE, PERIODS, LineQueue
from uprobes.engines.kernel.tracer import KernelTracer
from uprobes.engines.launch import launch
from uprobes.model.event import Hit, hit_event
from uprobes.render.jsonl import JsonLinesRenderer
from uprobes.render.trace_text import TraceTextRenderer
from uprobes.resolve.resolver import Resolver

CALLS = 3000
NAMES = [b"plain", b'q"uo\\te%d%s', b"ctl\x01\t\n\x1f", b"bad\xff\xfeutf8",
         b"\xe2\x80\xa8sep\xc3\xa9", b'thr"\\%x']


@pytest.fixture
def awkward(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("awkward_comm.c", "-pthread")


def _specs(exe: Path, returns: bool = True) -> list[str]:
    return [f"{exe}:step i=%di:s64 m=%si:x32",
            *([f"r {exe}:step v=$retval:s64"] if returns else []),
            f"{exe}:named s=+0(%di):string i=%si:u16"]


Batches = list[tuple[bytes, list[tuple[int, int, int, int]]]]


def _records(exe: Path, uretprobe: bool, returns: bool) -> tuple[KernelTracer, Batches]:
    """Every record of one run of the fixture, read in one go after it
    exited (rings large enough to hold them all), and the tracer that read them."""
    probes = Resolver(uretprobe=uretprobe).resolve_all(parse_specs(_specs(exe, returns)))
    child = launch([str(exe), str(CALLS)])
    try:
        with KernelTracer(probes, child=child.pid, ring_pages=2048) as tracer:
            child.release()
            child.wait()
            streams = tracer._streams
            assert streams is not None
            batches = streams.read_runs(ALIKE, PERIODS)
            tracer._refresh_hit_functions()
            assert streams.lost_records == 0
    finally:
        child.abort()
    return tracer, batches


def _hits(tracer: KernelTracer, batches: Batches) -> list[Hit]:
    """The records decoded one by one, the general way (headers walked),
    in time order (stable)."""
    hits = []
    for data, _ in batches:
        pos = 0
        while pos < len(data):
            rtype, _, size = struct.unpack_from("<IHH", data, pos)
            if rtype == 9:  # PERF_RECORD_SAMPLE
                at = pos + ALIKE[0]
                hits.append(tracer._hit_functions[data[at] | data[at + 1] << 8](data, pos + 8))
            pos += size
    hits.sort(key=lambda h: h[0])
    return hits


@pytest.mark.parametrize("uretprobe,returns", [(False, False), (False, True), (True, True)],
                         ids=["entry", "ret-sites", "uretprobe"])
def test_fast_lines_are_the_general_renderers_lines(awkward: Path, uretprobe: bool,
                                                    returns: bool) -> None:
    tracer, batches = _records(awkward, uretprobe, returns)
    hits = _hits(tracer, batches)
    steps = (1 + returns) * CALLS * len(NAMES)
    assert len(hits) == steps + len(NAMES[:-1]) * (CALLS // 64 + 1)
    for renderer in (JsonLinesRenderer, TraceTextRenderer):
        general = io.StringIO()
        slow = renderer(general, tracer.infos)
        for h in hits:
            slow.event(hit_event(h, tracer.infos[h[4]]))
        queue = LineQueue(tracer.decoders, tracer._hit_functions, renderer(io.StringIO(),
                                                                            tracer.infos))
        queue.read(batches)
        # Released in two parts, cut at a time inside a piece, as rounds do.
        middle = hits[len(hits) // 2 + 7][0]
        fast = queue.take(middle) + queue.take(None)
        assert "".join(fast) == general.getvalue()
        # Most went through templates (an entry and its return alternate:
        # runs of period 2); the string probe went hit by hit.
        assert steps // 2 < queue.templated <= steps


def test_trace_json_escapes_comms_as_json_dumps(awkward: Path) -> None:
    out = io.StringIO()
    # Rings that hold the whole run: nothing is lost however late the reader runs.
    assert main(["trace", "--json", "--ring-pages", "2048", *_specs(awkward), "--",
                 str(awkward), str(CALLS)], out=out) == 0
    # split("\n"): a JSON string may hold U+2028, which splitlines() splits at
    lines = out.getvalue().split("\n")[:-1]
    docs = [json.loads(line) for line in lines]
    for line, doc in zip(lines, docs):
        assert line == json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    comms = {d["comm"] for d in docs[:-1]}
    assert comms == {n.decode("utf-8", "backslashreplace") for n in NAMES}
    steps = [d for d in docs[:-1] if d["probe"] == "uprobes/step"]
    assert len(steps) == CALLS * 6
    plain = [d["args"]["i"] for d in steps if d["comm"] == "plain"]
    assert plain == [i - CALLS // 2 for i in range(CALLS)]
    assert without_clocks(docs[-1]) == {"summary": {"events": len(docs) - 1, "lost": 0}}


def _records_of(words: list[tuple[int, int]]) -> bytes:
    """Synthetic 24-byte records: a header (type 9, size 24), then two u64
    words `(a, b)` each."""
    return b"".join(struct.pack("<IHHQQ", 9, 0, 24, a, b) for a, b in words)


@pytest.mark.parametrize("window", [1, 3, 1000])
def test_agreeing_finds_where_records_stop_agreeing(window: int) -> None:
    rows = [(1, i) for i in range(100)] + [(2, 0)] + [(1, 0)] * 5
    data = _records_of(rows)
    assert agreeing(data, 0, 24, 106, [(0, 8), (8, 8)], window) == 100
    assert agreeing(data, 0, 24, 106, [(0, 8), (16, 8)], window) == 1
    assert agreeing(data, 0, 24, 50, [(8, 4)], window) == 50
    assert agreeing(data, 24 * 101, 24, 5, [(8, 2), (12, 4)], window) == 5
    for cut in (1, 2, 63, 99):
        assert agreeing(data, 24 * cut, 24, 106 - cut, [(0, 8), (8, 8)], window) == 100 - cut


def _chunked(lines: list[str], size: int) -> list[str]:
    """`lines` as LineQueue keeps template output: `size` lines in one
    string at the first's place, "" at the others'."""
    out = []
    for i in range(0, len(lines), size):
        block = lines[i:i + size]
        out += ["".join(block)] + [""] * (len(block) - 1)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_merged_is_a_stable_sort_by_time(seed: int) -> None:
    """Parts (each in time order, some in chunks) merge into what a stable
    sort of their concatenation gives: blocks when CPUs took turns,
    line by line when they interleave, ties in the parts' order."""
    import random
    rnd = random.Random(seed)
    ts_parts, line_parts, flat = [], [], []
    count = rnd.randint(2, 5)
    stamps = sorted(rnd.randint(0, 3000) for _ in range(1200))  # with ties
    turns: list[list[int]] = [[] for _ in range(count)]
    at = 0
    while at < len(stamps):  # CPUs taking turns: blocks of 20 to 80
        n = rnd.randint(20, 80)
        turns[rnd.randrange(count)] += stamps[at:at + n]
        at += n
    for p in range(count):
        if seed % 2:
            ts = turns[p]
        else:  # interleaving closely, with ties
            ts = sorted(rnd.randint(0, 400) for _ in range(rnd.randint(0, 300)))
        lines = [f'{{"p":{p},"i":{i},"ts":{t}}}\n' for i, t in enumerate(ts)]
        ts_parts.append(ts)
        line_parts.append(_chunked(lines, rnd.choice([1, 4, 32])))
        flat += zip(ts, lines)
    queue = LineQueue({}, {}, JsonLinesRenderer(io.StringIO(), {}))
    queue._chunked = True
    ts, lines = queue._merged(ts_parts, line_parts)
    expected = sorted(flat, key=lambda x: x[0])
    assert ts == [t for t, _ in expected]
    assert "".join(lines) == "".join(line for _, line in expected)
    assert len(lines) == len(ts)
    cut = len(ts) // 3
    queue.ts, queue.lines = ts, lines
    assert "".join(queue.take(ts[cut] if ts else None) + queue.take(None)) == "".join(
        line for _, line in expected)
