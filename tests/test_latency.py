"""`uprobes latency`: calls paired per thread, histograms with the known calls of a fixture."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler

from uprobes.analysis.histogram import Histogram
from uprobes.commands import main

MS = 1_000_000


@pytest.fixture
def latency_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("latency.c")


def run_latency(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(["latency", *argv], out=out)
    return status, out.getvalue()


def untraced(exe: Path) -> tuple[str, dict[str, int]]:
    """The fixture's output untraced, and the calls it counted itself."""
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    m = re.fullmatch(r"nap=(\d+)\+(\d+) fib=(\d+) \(\d+\) leap=(\d+)\+(\d+)\n", out)
    assert m, out
    keys = ("naps", "quick", "fib", "returned", "jumped")
    return out, dict(zip(keys, map(int, m.groups())))


def test_histograms_hold_exactly_the_fixtures_calls(latency_exe: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    printed, calls = untraced(latency_exe)
    capfd.readouterr()
    status, out = run_latency("--json", f"{latency_exe}:nap", f"{latency_exe}:fib",
                              f"{latency_exe}:leap", "--", str(latency_exe))
    assert status == 0
    assert capfd.readouterr().out == printed
    doc = json.loads(out.splitlines()[-1])
    nap, fib, leap = doc["uprobes/nap"], doc["uprobes/fib"], doc["uprobes/leap"]
    # nap: every call paired; a sleep of 2 ms never takes less (a quick return can
    # take long on a loaded machine, so the rest of the buckets are not asserted).
    assert nap["count"] == calls["naps"] + calls["quick"]
    assert sum(n for lo, hi, n in nap["buckets"] if lo >= 2**20) >= calls["naps"]
    assert nap["max_ns"] >= 2 * MS
    # fib(10): every one of the nested, recursive calls paired.
    assert fib["count"] == calls["fib"]
    assert sum(n for _, _, n in fib["buckets"]) == calls["fib"]
    # leap: the calls left by longjmp are dropped, not paired with later returns.
    assert leap["count"] == calls["returned"]


def test_text_output_draws_a_histogram_per_function(latency_exe: Path) -> None:
    status, out = run_latency("--unit", "us", f"{latency_exe}:nap", "--", str(latency_exe))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "uprobes/nap"
    assert lines[1].split()[:3] == ["usecs", ":", "count"]
    rows = [ln for ln in lines if "->" in ln]
    _, calls = untraced(latency_exe)
    naps = calls["naps"] + calls["quick"]
    assert sum(int(r.split(":")[1].split()[0]) for r in rows) == naps
    assert lines[-1].strip().startswith(f"count {naps}  mean ")


def test_bad_specs_are_one_clear_error(latency_exe: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for spec in (f"r {latency_exe}:nap", f"{latency_exe}:nap us=%di", "usdt:/x:p:n"):
        assert main(["latency", spec, "--", "/bin/true"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("uprobes: error: ") and "Traceback" not in err


def test_histogram_percentiles_are_within_the_bucket_precision() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(9, 2)) for _ in range(20_000)]
    h = Histogram()
    for v in values:
        h.add(v)
    values.sort()
    assert h.count == len(values) and h.min == values[0] and h.max == values[-1]
    assert h.mean == pytest.approx(sum(values) / len(values))
    for p in (50, 90, 99, 99.9):
        true = values[max(0, int(-(-len(values) * p // 100)) - 1)]
        assert abs(h.percentile(p) - true) <= true / 64 + 1
    assert sum(n for _, _, n in h.log2_buckets()) == len(values)
    for lo, hi, n in h.log2_buckets():
        assert n == sum(1 for v in values if lo <= v <= hi)


def test_filters_apply_to_calls(latency_exe: Path) -> None:
    status, out = run_latency("--comm", "nobody", f"{latency_exe}:nap", "--", str(latency_exe))
    assert status == 0 and out == "no calls seen\n"
    status, out = run_latency("--json", "--if", f'comm == "{latency_exe.name[:15]}"',
                              f"{latency_exe}:nap", "--", str(latency_exe))
    _, calls = untraced(latency_exe)
    assert json.loads(out)["uprobes/nap"]["count"] == calls["naps"] + calls["quick"]


def test_the_ptrace_engine_pairs_the_same_calls(compile_c: Compiler) -> None:
    exe = compile_c("latency.c")
    status, out = run_latency("-e", "ptrace", "--json", f"{exe}:fib", f"{exe}:leap",
                              "--if", "pid > 0", "--", str(exe))
    assert status == 0
    doc = json.loads(out.splitlines()[-1])
    _, calls = untraced(exe)
    assert doc["uprobes/fib"]["count"] == calls["fib"]
    assert doc["uprobes/leap"]["count"] == calls["returned"]
    assert sum(n for _, _, n in doc["uprobes/fib"]["buckets"]) == calls["fib"]


@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_an_exception_through_a_timed_function_leaves_the_program_unharmed(
        engine: str, tracefs: Path, compile_c: Compiler) -> None:
    """`retsites throw` throws out of thrower() and through() in 2 of 6 calls.
    The return probes fetch nothing, so they sit on the functions' own rets:
    the unwinder finds every frame as the compiler left it (a uretprobe's
    swapped return address made it call std::terminate), and the program
    prints and exits as it does untraced. The 4 calls that return are timed;
    the 2 an exception left are never paired with a later return."""
    exe = compile_c("retsites.cc")
    plain = subprocess.run([str(exe), "throw"], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 3 and plain.stdout == "total=165 caught=2\n"
    proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", engine, "--json",
                           f"{exe}:through", f"{exe}:thrower", f"{exe}:fact", "--", str(exe),
                           "throw"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "uretprobe" not in proc.stderr and "terminate" not in proc.stderr
    printed, doc = proc.stdout.splitlines()
    assert printed == "total=165 caught=2"
    counts = {name: h["count"] for name, h in json.loads(doc).items()}
    # fact: fact(5) is 5 calls, tail_call(-8) jumps to fact(2): 2 more, whose
    # outermost returns to tail_call's caller, the return address at its entry.
    assert counts == {"uprobes/through": 4, "uprobes/thrower": 4, "uprobes/fact": 7}
    # Calls the exceptions left: the pairer of events (kernel) counts the first
    # throw's two (a later entry of the same function drops them; the second's
    # are still open at exit); timed in the program (ptrace), one stack of
    # open calls per thread, every later entry drops them: all four.
    left = 4 if engine == "ptrace" else 2
    assert f"{left} calls never returned" in proc.stderr


def test_returns_pair_by_the_return_address_fetched_at_entry() -> None:
    """Recursion from one call site: the newest entry with the address
    returned to closes; entries above it were left (abandoned); a return to
    an address no open entry holds pairs with nothing and pops nothing."""
    from uprobes.analysis.calls import CallPairer
    from uprobes.model.event import Event

    def entry(sp: int, ra: int) -> Event:
        return Event("f", "p", 1, 1, "x", 0, 0, 0x100, args={"__sp": sp, "__ra": ra})

    def ret(to: int) -> Event:
        return Event("f__return", "r", 1, 1, "x", 0, 0, to, func=0x100)

    pairer = CallPairer()
    outer, inner, left = entry(1000, 0xA), entry(900, 0xB), entry(800, 0xB)
    for e in (outer, inner, left):
        pairer.entry(e)
    assert pairer.ret(ret(0xC)) is None and pairer.unpaired_returns == 1  # not ours
    assert pairer.ret(ret(0xB)) is left  # the newest of the two with 0xB
    assert pairer.ret(ret(0xA)) is outer and pairer.abandoned == 1  # inner was left
    assert list(pairer.still_open()) == []


@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_by_thread_the_same_on_both_engines(engine: str, tracefs: Path,
                                            compile_c: Compiler) -> None:
    """`--by tid`: events paired in Python (kernel) and calls timed in the
    program (ptrace) give each of 3 threads its own histogram of its 300
    calls; `--by comm` one of all 900, under the program's name."""
    exe = compile_c("timed.c", "-pthread")
    for by, want in (("tid", [300, 300, 300]), ("comm", [900])):
        proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", engine,
                               "--json", "--by", by, f"{exe}:tiny", "--", str(exe), "threads",
                               "3", "300"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout.splitlines()[-1])
        assert sorted(h["count"] for h in doc.values()) == want, doc.keys()
        assert all(name.startswith(f"uprobes/tiny {by}=") for name in doc)
        if by == "comm":
            assert list(doc) == [f"uprobes/tiny comm={exe.name[:15]}"]


@pytest.mark.parametrize("engine", [pytest.param("kernel", marks=pytest.mark.root), "ptrace"])
def test_by_comm_is_the_name_at_each_call(engine: str, compile_c: Compiler) -> None:
    """`--by comm` while the thread renames itself every 70 calls (by prctl
    and by /proc in turn): each call goes to the histogram of the name it
    was made under, on both engines (in the program: asked of the kernel
    at each entry and kept with the open call)."""
    exe = compile_c("timed.c", "-pthread")
    proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", engine, "--json",
                           "--by", "comm", f"{exe}:tiny", "--", str(exe), "renames", "3000",
                           "70"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    evens = sum(1 for i in range(3000) if (i // 70) % 2 == 0)
    assert {k: h["count"] for k, h in doc.items()} == {"uprobes/tiny comm=even": evens,
                                                        "uprobes/tiny comm=odd": 3000 - evens}
    assert all(("subtracted_ns" in h) == (engine == "ptrace") for h in doc.values())


@pytest.mark.parametrize("how", [("kernel",), ("ptrace",), ("ptrace", "--if", "pid > 0")],
                         ids=["kernel", "ptrace-in-program", "ptrace-events"])
def test_by_a_fetched_argument(how: tuple[str, ...], latency_exe: Path,
                               compile_c: Compiler) -> None:
    """`--by us 'nap us=%di'`: a histogram per value the entry fetched (as
    bpftrace's @[arg0] = hist()), the calls of each known from the fixture:
    5 naps of 2 ms, 20 that return at once; `--by n` over fib(10)'s 177
    recursive calls gives each n its count in the call tree. The same on
    the kernel engine (events paired here), on the ptrace engine timed in
    the program (the entry keeps the key with its open call; `subtracted_ns`
    shows it was timed there) and from its recorded events (a filter on
    `pid`, which the program's code cannot test).
    In the program, `nap` is left out: it ends in `leave; ret` right after a
    call, where no jump fits (its answer is the other two's)."""
    in_program = how == ("ptrace",)

    def run(by: str, spec: str, exe: Path = latency_exe, *argv: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", *how,
                               "--json", "--by", by, f"{exe}:{spec}", "--", str(exe), *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
        assert all(("subtracted_ns" in h) == in_program for h in doc.values()), doc
        return doc
    if not in_program:
        naps = run("us", "nap us=%di:s64")
        assert {k: h["count"] for k, h in naps.items()} == {"uprobes/nap us=2000": 5,
                                                             "uprobes/nap us=0": 20}
        assert naps["uprobes/nap us=2000"]["min_ns"] >= 2 * MS \
            > naps["uprobes/nap us=0"]["p50_ns"]
    # spin(10) and spin(200000) in turn, 40 calls: 20 of each, the long ones
    # (~100 us) each longer than most short ones (~10 ns)
    spins = run("iters", "spin iters=%di:s64", compile_c("timed.c", "-pthread"),
                "spins", "40", "10", "200000")
    assert {k: h["count"] for k, h in spins.items()} == {"uprobes/spin iters=10": 20,
                                                          "uprobes/spin iters=200000": 20}
    assert spins["uprobes/spin iters=200000"]["min_ns"] > spins["uprobes/spin iters=10"]["p50_ns"]
    fibs = {k: h["count"] for k, h in run("n", "fib n=%di:s32").items()}
    calls = {n: 0 for n in range(11)}

    def fib(n: int) -> None:
        calls[n] += 1
        if n >= 2:
            fib(n - 1)
            fib(n - 2)
    fib(10)
    assert fibs == {f"uprobes/fib n={n}": c for n, c in calls.items()}


def _fib_calls(top: int) -> dict[int, int]:
    calls = {n: 0 for n in range(top + 1)}

    def fib(n: int) -> None:
        calls[n] += 1
        if n >= 2:
            fib(n - 1)
            fib(n - 2)
    fib(top)
    return calls


@pytest.mark.root
def test_a_filter_on_the_key_is_the_same_on_every_engine(compile_c: Compiler) -> None:
    """`--by n --if 'n >= 5'`: the filter tests the entry's fetched key, which
    the return has not. Every engine decides it at the entry, as the program's
    own code does, and pairs each kept call with its own return: fib(10)'s
    recursive calls with n >= 5 (a rejected fib(4) returns where the fib(5)
    it was called from does), and short4 (4 bytes: no jump, the run left to
    events) beside longer. The kernel engine is the reference; the same
    counts in the program, with --no-trapfree (int3s) and in the event
    fallback. (All but the in-program run refused it: "has no field 'n'".)"""
    runs: dict[str, list[str]] = {
        "fib": ["--by", "n", "--if", "n >= 5", "{latency}:fib n=%di:s32", "--", "{latency}"],
        "short": ["--by", "x", "--if", "x >= 1", "{short}:short4 x=%di:s32",
                  "{short}:longer x=%di:s32", "--", "{short}", "30"]}
    exes = {"latency": compile_c("latency.c"), "short": compile_c("short_func.c")}
    fibs = _fib_calls(10)
    want = {"fib": {f"uprobes/fib n={n}": c for n, c in fibs.items() if n >= 5},
            "short": {"uprobes/short4 x=1": 10, "uprobes/short4 x=2": 10,
                      "uprobes/longer x=2": 7}}
    for name, argv in runs.items():
        for how in (("kernel",), ("ptrace",), ("ptrace", "--no-trapfree")):
            proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", *how,
                                   "--json", *(a.format(**exes) for a in argv)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (how, proc.stderr)
            assert "returns without an entry" not in proc.stderr, proc.stderr
            if how == ("ptrace",) and name == "short":
                assert "(uprobes/short4 can be no jump)" in proc.stderr, proc.stderr
            doc = json.loads(proc.stdout.splitlines()[-1])
            in_program = how == ("ptrace",) and name == "fib"
            assert all(("subtracted_ns" in h) == in_program for h in doc.values()), doc
            assert {k: h["count"] for k, h in doc.items()} == want[name], (how, doc)


@pytest.mark.parametrize("flags", ["-O0", "-O0 -fomit-frame-pointer"])
@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_by_a_dwarf_parameter_at_O0(engine: str, flags: str, tracefs: Path,
                                    compile_c: Compiler) -> None:
    """`--by n 'fib n'` at -O0: the entry probe goes after fib's prologue,
    where n is stored, and still pairs with its returns (the return address
    read at the CFA there, the call known by its function's address): each
    n its count in fib(10)'s call tree, no return left unpaired. Without a
    frame pointer n is a stack word the in-program timer could key by, but
    its entry code pairs by the probe's stack pointer, lower than the
    return's past the prologue: such calls are paired from events."""
    exe = compile_c("latency.c", *flags.split())
    proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", engine, "--json",
                           "--by", "n", f"{exe}:fib n", "--", str(exe)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "probed after its prologue" in proc.stderr
    assert "returns without an entry" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert {k: h["count"] for k, h in doc.items()} == {
        f"uprobes/fib n={n}": c for n, c in _fib_calls(10).items()}


def test_by_an_argument_the_spec_does_not_fetch_is_one_line(latency_exe: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    for spec in (f"{latency_exe}:nap", f"{latency_exe}:nap us=%di x=%si"):
        assert main(["latency", "--by", "us", spec, "--", "/bin/true"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("uprobes: error: --by us keys calls by a fetcharg"), err


def test_a_key_the_program_cannot_read_is_paired_from_events(latency_exe: Path) -> None:
    """`--by ip 'nap ip=%ip'`: the ip is no register the timing code reads;
    one note says so and what to change, and the calls are paired from
    events instead, all 25 under the one address."""
    proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", "ptrace", "--json",
                           "--by", "ip", f"{latency_exe}:nap ip=%ip", "--", str(latency_exe)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "keyed from events" in ln]
    assert len(notes) == 1 and "fetch it from a register or a stack word" in notes[0], \
        proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert [h["count"] for h in doc.values()] == [25]


def test_keys_beyond_the_table_are_counted_and_said(compile_c: Compiler) -> None:
    """3,000 calls of tiny(i), each its own key, into a table of 1,024
    keyed histograms: every call is in a histogram or in the one line
    saying how many could not be keyed."""
    exe = compile_c("timed.c", "-pthread")
    proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", "ptrace", "--json",
                           "--by", "a", f"{exe}:tiny a=%di", "--", str(exe), "keys", "3000",
                           "3000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    said = re.findall(r"^uprobes: (\d+) calls could not be keyed", proc.stderr, re.M)
    assert len(said) == 1, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert all(h["count"] == 1 for h in doc.values())
    assert 0 < int(said[0]) and len(doc) + int(said[0]) == 3000
    assert {h["unkeyed_calls"] for h in doc.values()} == {int(said[0])}  # in --json too


@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_by_a_dwarf_value_that_faulted(engine: str, tracefs: Path,
                                       compile_c: Compiler) -> None:
    """`--by p_in_x 'look p->in->x'` where p->in points into an unmapped
    page, or p is NULL or unmapped (its first 3 calls): keyed `(fault)`, as the
    trace line prints the value (they were keyed by the raw 0, then None)."""
    exe = compile_c("dwarf_faults.c", "-O0")
    proc = subprocess.run([sys.executable, "-m", "uprobes", "latency", "-e", engine, "--json",
                           "--by", "p_in_x", f"{exe}:look p->in->x", "--", str(exe)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    counts = {k: h["count"] for k, h in doc.items()}
    assert counts["uprobes/look p_in_x=(fault)"] == 3, counts
    assert not any(k.endswith(("=None", "=0")) for k in counts), counts
