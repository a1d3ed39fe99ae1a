"""`uprobes record`, `replay` and `report` (src/uprobes/record/): a run kept on
disk renders as the live run would have. The oracle is `trace` itself on the
same fixture with the same probe lines (no ASLR: the same values and
addresses), on both engines; counts against the fixture's known calls."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, without_clocks

from uprobes.commands.resolve import parse_specs
from uprobes.engines.trapfree.layout import CPU_BITS, LONG, SHORT, SLOT_PROBE, SLOT_TID
from uprobes.engines.trapfree.reader import valid_records
from uprobes.record import stream
from uprobes.record.codec import decode, encode
from uprobes.resolve.resolver import Resolver

UPROBES = [sys.executable, "-m", "uprobes"]
WORK_ARGS = ("a=%di:s64 b=%si:s32 c=%dx:s16 d=%cx:s8 e=%r8:x64 f=%r9:u32 g=$stack1:s64 "
             "h=$stack2:u64 ret=$stack0:x64 sp=$stack:x64 ip=%ip bits=%si:b4@2/32 "
             "imm=\\42:u16 lo=+8(%sp):u8 comm=$comm")
NOT_REPLAYED = ("ts_ns", "pid", "tid", "cpu")
"""What differs between two runs of the fixture (or is the CPU it ran on)."""


@pytest.fixture(scope="module")
def exe(compile_c: Compiler) -> Path:
    return compile_c("recording.c", "-pthread")


def specs(exe: Path) -> list[str]:
    return [f"{exe}:work {WORK_ARGS}", f"r {exe}:work ret=$retval:s64", f"{exe}:other x=%di"]


def uprobes(*argv: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([*UPROBES, *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return run


def jsonl(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    *events, last = [json.loads(line) for line in text.splitlines()]
    return events, last


def comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in NOT_REPLAYED} for e in events]


def record_and_trace(engine: str, exe: Path, tmp_path: Path, *argv: str
                     ) -> tuple[Path, str, str]:
    """`record` and `trace --json` of the fixture run by `argv`: (the
    recording, trace's output, record's stderr). The program prints the same
    under both."""
    rec, live = tmp_path / f"rec-{engine}", tmp_path / f"{engine}.jsonl"
    command = ("--", "setarch", "-R", str(exe), *argv)
    made = uprobes("record", "-e", engine, "-o", str(rec), *specs(exe), *command)
    traced = uprobes("trace", "--json", "-e", engine, "-o", str(live), *specs(exe), *command)
    assert made.stdout == traced.stdout and made.stdout.startswith("sum ")
    return rec, live.read_text(), made.stderr


def check_replay_is_trace(rec: Path, live: str) -> list[dict[str, Any]]:
    """`replay --json` of `rec` gives the live run's events and summary (but what
    differs between two runs), in the same order; its clocks are the run's."""
    replay, summary = jsonl(uprobes("replay", "--json", str(rec)).stdout)
    live_events, live_summary = jsonl(live)
    assert comparable(replay) == comparable(live_events)
    assert without_clocks(summary) == without_clocks(live_summary)
    stamps = [e["ts_ns"] for e in replay]
    clocks = summary["summary"]["clocks"]
    assert stamps == sorted(stamps)
    assert clocks["start"]["monotonic_ns"] <= stamps[0] <= stamps[-1] \
        <= clocks["end"]["monotonic_ns"]
    meta = json.loads((rec / "meta.json").read_text())
    assert meta["clocks"] == clocks
    return replay


def ring_chunks(rec: Path) -> list[bytes]:
    with open(rec / "events.bin", "rb") as f:
        return [payload for kind, payload in stream.chunks(f, "events.bin")
                if kind == stream.RING]


def test_ptrace_recording_replays_as_trace(exe: Path, tmp_path: Path) -> None:
    """Trap-free probes (every kind of fetch the ring can carry, and a return
    probe) are kept as raw ring slots, and replay as `trace` prints them."""
    rec, live, err = record_and_trace("ptrace", exe, tmp_path, "loop", "3000")
    assert "3 of 3 probes trap-free" in err, err
    chunks = ring_chunks(rec)
    slots = sum((len(c) - stream.RING_HEAD.size) // stream.RING_HEAD.unpack_from(c)[3]
                for c in chunks)
    assert slots == 9000  # every hit a raw record, none as JSON
    # One slot size for the run's rings, long: `work`'s record needs them (each chunk says).
    assert {stream.RING_HEAD.unpack_from(c)[3] for c in chunks} == {LONG.slot_bytes}
    events = check_replay_is_trace(rec, live)
    assert Counter(e["probe"] for e in events) == {
        "uprobes/work": 3000, "uprobes/work__return": 3000, "uprobes/other": 3000}
    assert [e["args"]["a"] for e in events if e["probe"] == "uprobes/work"] == \
        list(range(100, 3100))


@pytest.mark.kernel
def test_kernel_recording_replays_as_trace(tracefs: Path, exe: Path, tmp_path: Path) -> None:
    rec, live, _ = record_and_trace("kernel", exe, tmp_path, "loop", "200")
    assert not ring_chunks(rec)
    check_replay_is_trace(rec, live)


def test_int3_probes_and_ring_records_interleave_in_time(exe: Path, tmp_path: Path) -> None:
    """A probe that reads memory keeps its int3 (a hit as JSON), the others
    are ring records: the replay has them in the run's order."""
    rec = tmp_path / "rec"
    uprobes("record", "-e", "ptrace", "-o", str(rec), f"{exe}:work a=%di:s64",
            f"{exe}:other x=+0(%sp):u64 y=+0(%di):u8", "--", str(exe), "loop", "5")
    hits = [e for e in jsonl(uprobes("replay", "--json", str(rec)).stdout)[0]]
    assert [e["probe"] for e in hits] == ["uprobes/other", "uprobes/work"] * 5
    assert ring_chunks(rec)


def test_threads_and_a_fork(exe: Path, tmp_path: Path) -> None:
    """4 threads x 12k calls (more than a ring holds) and a forked child: every
    hit once, with its own tid and pid, in time order."""
    rec = tmp_path / "rec"
    uprobes("record", "-e", "ptrace", "-o", str(rec), f"{exe}:work a=%di:s64", "--", str(exe),
            "threads", "12000")
    events, summary = jsonl(uprobes("replay", "--json", str(rec)).stdout)
    assert sorted(Counter(e["tid"] for e in events).values()) == [12000] * 4
    assert summary["summary"]["events"] == 48000 and summary["summary"]["lost"] == 0
    uprobes("record", "-e", "ptrace", "-o", str(rec), f"{exe}:work a=%di:s64", "--", str(exe),
            "fork", "3000")
    events, _ = jsonl(uprobes("replay", "--json", str(rec)).stdout)
    assert sorted(Counter(e["pid"] for e in events).values()) == [3000, 3000]


def test_report_counts_and_times_the_calls(exe: Path, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    uprobes("record", "-e", "ptrace", "-o", str(rec), *specs(exe), "--", str(exe), "loop", "777")
    doc = json.loads(uprobes("report", "--json", str(rec)).stdout)
    assert doc["counts"] == {"uprobes/other": 777, "uprobes/work": 777,
                             "uprobes/work__return": 777}
    work = doc["latency"]["uprobes/work"]
    assert work["count"] == 777 and 0 < work["p50_ns"] <= work["max_ns"]
    assert doc["unpaired_returns"] == 0 and doc["never_returned"] == 0
    text = uprobes("report", str(rec)).stdout
    assert "uprobes/work__return" in text and "p50" in text


def test_replay_filters_as_trace_filters(exe: Path, tmp_path: Path) -> None:
    """`replay --if/--tid` keeps what `trace --if/--tid` keeps."""
    rec = tmp_path / "rec"
    uprobes("record", "-e", "ptrace", "-o", str(rec), specs(exe)[0], "--", "setarch", "-R",
            str(exe), "loop", "200")
    cond = ("--if", "a > 140 && b < -20000")
    kept, _ = jsonl(uprobes("replay", "--json", *cond, str(rec)).stdout)
    out = tmp_path / "live.jsonl"
    uprobes("trace", "--json", "-e", "ptrace", "-o", str(out), *cond, specs(exe)[0], "--",
            "setarch", "-R", str(exe), "loop", "200")
    live, _ = jsonl(out.read_text())
    assert comparable(kept) == comparable(live)
    assert [e["args"]["a"] for e in kept] == list(range(141, 300))
    none, summary = jsonl(uprobes("replay", "--json", "--tid", "1", str(rec)).stdout)
    assert none == [] and summary["summary"]["events"] == 0


def test_perfetto_replay_decodes(exe: Path, tmp_path: Path) -> None:
    """`replay --format perfetto`: calls as slices, by Perfetto's own protos."""
    from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

    rec, out = tmp_path / "rec", tmp_path / "t.perfetto-trace"
    uprobes("record", "-e", "ptrace", "-o", str(rec), f"{exe}:work", f"r {exe}:work", "--",
            str(exe), "loop", "50")
    uprobes("replay", "--format", "perfetto", "-o", str(out), str(rec))
    trace = pb.Trace()
    trace.ParseFromString(out.read_bytes())
    begins = [p for p in trace.packet if p.HasField("track_event")
              and p.track_event.type == pb.TrackEvent.TYPE_SLICE_BEGIN]
    assert len(begins) == 50
    meta = json.loads((rec / "meta.json").read_text())
    snaps = [p.clock_snapshot for p in trace.packet if p.HasField("clock_snapshot")]
    assert {c.timestamp for c in snaps[0].clocks} >= {meta["clocks"]["start"]["monotonic_ns"]}


# ---------------------------------------------------------------- bad input


def test_bad_directories_are_one_line(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cases = [
        (["replay", str(tmp_path / "nothing")], "is not a recording (no meta.json)"),
        (["report", str(other)], "is not a recording"),
        (["record", "-e", "ptrace", "-o", str(other), "libc:getppid", "--", "/bin/true"],
         "holds other files"),
        (["record", "-e", "ptrace", "libc:getppid", "--", "/bin/true"], "give -o DIR"),
    ]
    for argv, message in cases:
        run = subprocess.run([*UPROBES, *argv], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (argv, run.stderr)
        assert run.stderr.startswith("uprobes: error: ") and message in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert (other / "notes.txt").read_text() == "mine"


def test_altered_recordings_never_crash_the_replay(exe: Path, tmp_path: Path) -> None:
    """A ring record the program overwrote (a probe id or a tid no probe's
    code writes) is left out and counted; a stream cut mid-chunk replays what
    came before it; a meta.json naming a class we do not keep, or a site
    whose records its ring's slots cannot hold, is refused in a line; an
    unfinished recording says so."""
    rec = tmp_path / "rec"
    uprobes("record", "-e", "ptrace", "-o", str(rec), f"{exe}:work a=%di:s64", "--", str(exe),
            "loop", "100")
    data = bytearray((rec / "events.bin").read_bytes())
    head = data.index(stream.RING) + stream.HEADER.size
    slot_bytes = stream.RING_HEAD.unpack_from(data, head)[3]
    assert slot_bytes == SHORT.slot_bytes  # (every record of the run is short)
    first = head + stream.RING_HEAD.size
    struct.pack_into("<I", data, first + SLOT_PROBE, 999)
    struct.pack_into("<I", data, first + slot_bytes + SLOT_TID, 1)
    data += stream.HEADER.pack(stream.RING, stream.RING_HEAD.size + 10 * slot_bytes) + bytes(100)
    (rec / "events.bin").write_bytes(data)
    run = uprobes("replay", "--json", str(rec))
    events, _ = jsonl(run.stdout)
    assert "2 ring records that no probe's code can have written" in run.stderr
    assert "ends inside a chunk" in run.stderr
    assert [e["args"]["a"] for e in events] == list(range(102, 200))
    good = (rec / "meta.json").read_text()
    for path, value, said in ((("probes", 0, "$"), "Popen", "cannot read back"),
                              (("probes", 0, "event"), 5, "cannot read back"),
                              (("events",), 1e309, "not what uprobes record writes"),
                              (("sites", 0, "lines", 0), 99, "not what uprobes record writes"),
                              (("tsc", "scale"), -1, "not what uprobes record writes"),
                              (("tsc", "scale"), 1e-320, "not what uprobes record writes"),
                              (("probes", 0, "kind"), {"$enum": "FetchType", "v": [1]},
                               "cannot read back"),
                              (("probes",), [[[[[[[[[[[]]]]]]]]]]] * 10, "not probes"),
                              # a recipe of more words than the run's short slots hold
                              (("sites", 0, "recipe", "regs", "$t"),
                               ["rax", "rbx", "rcx", "rdx", "rsi", "rdi"],
                               "more words than its ring's slots")):
        meta = json.loads(good)
        at: Any = meta
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = value
        (rec / "meta.json").write_text(json.dumps(meta))
        run2 = subprocess.run([*UPROBES, "replay", str(rec)], capture_output=True, text=True,
                              timeout=120)
        assert run2.returncode == 2 and said in run2.stderr, (path, run2.stderr)
        assert run2.stderr.count("\n") == 1 and "Traceback" not in run2.stderr
    (rec / "meta.json").unlink()
    run3 = subprocess.run([*UPROBES, "report", str(rec)], capture_output=True, text=True,
                          timeout=120)
    assert run3.returncode == 2 and "was not finished" in run3.stderr, run3.stderr


def test_ring_records_are_taken_by_the_live_readers_rule() -> None:
    """`valid_records`, the one rule of the live reader and of the replay:
    each thing no probe's code can write leaves its record out, whether the
    batch is checked column by column (all good) or record by record; an
    empty RING chunk (a replay's input can hold one) is no records."""
    owners = {7: (7, "w"), 8: None}  # None: a thread that is not ours
    rule = ({0, 1}, 2, owners, 50, 150)  # probe ids, cpus, owners, TSC from 50 to 150
    words = (0,) * LONG.words

    def rec(probe: int = 0, high: int = 0, aux: int = 1, tsc: int = 100, tid: int = 7
            ) -> tuple[int, ...]:
        return (1, tsc, tid, aux, probe, high, *words)

    good, on_node_1 = rec(), rec(aux=1 << CPU_BITS | 1)
    assert valid_records([good, good], *rule) == [good, good]
    assert valid_records([good, on_node_1], *rule) == [good, on_node_1]
    for bad in (rec(probe=2), rec(high=1), rec(aux=2), rec(aux=1024 << CPU_BITS), rec(tsc=49),
                rec(tsc=151), rec(tid=8), rec(tid=9)):
        assert valid_records([good, bad, good], *rule) == [good, good], bad
    assert valid_records([], *rule) == []


def test_codec_round_trip_of_resolved_probes(exe: Path) -> None:
    """The probes a recording keeps come back equal, types and all."""
    probes = Resolver().resolve_all(parse_specs([*specs(exe), "libc:malloc size=%di:u64",
                                                 f"{exe}:work x=+8(+0(%di)):string"]))
    back = decode(json.loads(json.dumps(encode(probes))))
    assert back == probes and all(type(a) is type(b) for a, b in zip(back, probes))


def test_altered_chunks_are_one_line(exe: Path, tmp_path: Path) -> None:
    """An OWNR chunk with a number JSON cannot hold as an int, a HITS chunk
    whose values are not values an engine makes: one line, no traceback."""
    rec = tmp_path / "rec"
    uprobes("record", "-e", "ptrace", "-o", str(rec), f"{exe}:work a=%di:s64",
            f"{exe}:other x=+0(%di):u8", "--", str(exe), "loop", "3")
    good = (rec / "events.bin").read_bytes()
    hit = json.loads(next(payload for kind, payload in _chunks(rec) if kind == stream.HITS))[0]
    for kind, payload in ((stream.OWNERS, b'[[1, [1e309, "x"]]]'),
                          (stream.HITS, json.dumps([hit[:8] + [[{"a": 1}]]]).encode())):
        (rec / "events.bin").write_bytes(stream.HEADER.pack(kind, len(payload)) + payload + good)
        run = subprocess.run([*UPROBES, "replay", "--json", str(rec)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 2 and "is not what uprobes writes" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    # A RING chunk of slots of a size no ring has.
    ring = next(payload for kind, payload in _chunks(rec) if kind == stream.RING)
    created, now, read, _ = stream.RING_HEAD.unpack_from(ring)
    odd = stream.RING_HEAD.pack(created, now, read, 96) + ring[stream.RING_HEAD.size:]
    (rec / "events.bin").write_bytes(stream.HEADER.pack(stream.RING, len(odd)) + odd)
    run = subprocess.run([*UPROBES, "replay", "--json", str(rec)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "ring slots of 96 bytes" in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def _chunks(rec: Path) -> list[tuple[bytes, bytes]]:
    with open(rec / "events.bin", "rb") as f:
        return list(stream.chunks(f, "events.bin"))


def test_report_pairs_recursion_as_the_event_pairer(compile_c: Compiler, tmp_path: Path) -> None:
    """fib(10)'s 177 recursive calls, recorded at entry and return: report's
    pairing on the hit tuples gives what analysis.calls.CallPairer gives on
    events (the same durations, in the same histogram), and every call."""
    from uprobes.analysis.calls import CallPairer
    from uprobes.analysis.histogram import Histogram
    from uprobes.commands.report import _Stacks
    from uprobes.model.event import hit_event
    from uprobes.record.replay import Recording

    exe = compile_c("latency.c")
    rec = tmp_path / "rec"
    uprobes("record", "-e", "ptrace", "-o", str(rec), f"{exe}:fib", f"r {exe}:fib", "--",
            str(exe))
    doc = json.loads(uprobes("report", "--json", str(rec)).stdout)
    assert doc["latency"]["uprobes/fib"]["count"] == 177
    assert doc["unpaired_returns"] == 0 and doc["never_returned"] == 0
    recording = Recording(str(rec))
    hits = [h for batch in recording.batches() for h in batch]
    calls = frozenset(recording.calls)
    fast, slow = {"uprobes/fib": Histogram()}, {"uprobes/fib": Histogram()}
    _Stacks({}).pair(hits, calls, frozenset({"uprobes/fib__return"}), fast)
    pairer = CallPairer()
    for h in hits:
        ev = hit_event(h, recording.infos[h[4]])
        start = pairer.route(ev, calls)
        if not isinstance(start, bool):
            slow[start.probe].add(ev.ts_ns - start.ts_ns)
    assert (fast["uprobes/fib"].count, fast["uprobes/fib"].mean) == \
        (slow["uprobes/fib"].count, slow["uprobes/fib"].mean)


@pytest.mark.parametrize("marked", [False, True])
def test_report_pairs_calls_probed_past_an_unoptimized_prologue(
        compile_c: Compiler, tmp_path: Path, marked: bool) -> None:
    """`fib n` at -O0 is probed after fib's prologue (where n is stored),
    its return at fib's ret: report times every call, and replay's slices
    are the calls (they were instants, and no latency at all), with or
    without the stack pointer and return address to pair by."""
    exe = compile_c("latency.c", "-O0")
    rec = tmp_path / "rec"
    entry = f"{exe}:fib n" + (" __sp=%sp __ra=+0(%sp)" if marked else "")
    uprobes("record", "-e", "ptrace", "-o", str(rec), entry, f"r {exe}:fib", "--", str(exe))
    doc = json.loads(uprobes("report", "--json", str(rec)).stdout)
    assert doc["latency"]["uprobes/fib"]["count"] == 177, doc
    assert doc["unpaired_returns"] == 0 and doc["never_returned"] == 0
    chrome = json.loads(uprobes("replay", "--format", "chrome-json", str(rec)).stdout)
    slices = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == 177 and {e["args"]["n"] for e in slices} == set(range(11))
