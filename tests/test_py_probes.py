"""`py:` probes (docs/python.md): Python functions by module and qualified name,
on both engines and every CPython 3.11 build here, and 3.12 and 3.13 where
they are installed.

Oracles: the fixture counts its own calls and returns and prints them; the
kernel engine is the reference for the ptrace engine (the same events with
the same values); the interpreter's own `dis` and DWARF labels stand behind
the handlers (tests/test_pyeval.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import CPYTHONS, LATER_CPYTHONS, killed_after, over_later_cpythons, read_fd_until

from uprobes.sys import procfs

pytestmark = pytest.mark.root  # the kernel engine, and the ptrace engine on -p
INTERPRETERS = CPYTHONS + LATER_CPYTHONS
FIXTURE = str(Path(__file__).parent / "fixtures" / "py_funcs.py")
RETURNS_FIXTURE = str(Path(__file__).parent / "fixtures" / "py_returns.py")
UPROBES = [sys.executable, "-m", "uprobes"]
ENGINES = ["kernel", "ptrace"]


# name as the fixture counts it -> the probe that counts it
FUNCTIONS = {
    "work": "py:__main__.work",
    "Job.run": "py:__main__.Job.run",
    "outer.<locals>.inner": "py:__main__.outer.<locals>.inner",
    "fib": "py:__main__.fib",
    "gen": "py:__main__.gen",
    "boom": "py:__main__.boom",
    "py_funcs_lib.work": "py:py_funcs_lib.work",
    "pyfuncs_pkg.geometry.area": "py:pyfuncs_pkg.geometry.area",
    "pyfuncs_pkg.helper": "py:pyfuncs_pkg.helper",
}
RETURNS = {"work": "r py:__main__.work", "fib": "r py:__main__.fib",
           "boom": "r py:__main__.boom"}


def _uprobes(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UPROBES, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _own(stdout: str, word: str) -> dict[str, int]:
    """What the fixture says of itself: `WORD NAME N` lines."""
    return {parts[1]: int(parts[2]) for parts in (line.split() for line in stdout.splitlines())
            if len(parts) == 3 and parts[0] == word}


def _counted(stdout: str) -> dict[str, int]:
    """`count --json`'s document (the line after the program's output)."""
    doc: dict[str, int] = json.loads(stdout.splitlines()[-1])
    return doc


@pytest.mark.parametrize("engine", [*ENGINES, "ptrace --no-trapfree"])
@pytest.mark.parametrize("python", INTERPRETERS, ids=[Path(p).name for p in INTERPRETERS])
def test_counts_are_the_programs_own(engine: str, python: str) -> None:
    """On the ptrace engine a py: function is counted in the jump's code
    (its name compared there, no stop), or with --no-trapfree by an int3
    and the guard tested at each stop: the same counts either way."""
    specs = [*FUNCTIONS.values(), *RETURNS.values()]
    done = _uprobes("count", "--json", "-e", *engine.split(), *specs, "--", python, FIXTURE,
                    "60")
    assert done.returncode == 0, done.stderr
    if engine == "ptrace":  # (each handler of the eval loop, its functions tested in turn)
        assert re.search(r"\b(\d+) of \1 probes trap-free", done.stderr), done.stderr
    own, returned = _own(done.stdout, "COUNT"), _own(done.stdout, "RETURNS")
    counted = _counted(done.stdout)
    assert own["work"] > own["Job.run"] > 0 and own["boom"] > 0  # the fixture ran
    for name, probe in FUNCTIONS.items():
        assert counted[probe.removeprefix("py:").join(["py/", ""])] == own[name], name
    assert counted["py/__main__.work%return"] == returned["work"]
    assert counted["py/__main__.fib%return"] == returned["fib"]
    # boom raises: it leaves through the eval loop's unwinding (exit_unwind), no RETURN_VALUE
    assert counted["py/__main__.boom%return"] == own["boom"]


@pytest.mark.parametrize(("spec", "trapfree"), [("py:__main__.Job.*", True),
                                                 ("py:__main__.J?b.run", False)])
def test_a_glob_in_the_name(spec: str, trapfree: bool) -> None:
    """A prefix glob is compared in the jump's code; another glob makes the
    probe stop at each call and test the guard there: counted alike."""
    done = _uprobes("count", "--json", "-e", "ptrace", spec, "--", "/usr/bin/python3.11",
                    FIXTURE, "30")
    assert done.returncode == 0, done.stderr
    assert ("1 of 1 probes trap-free" in done.stderr) is trapfree, done.stderr
    assert _counted(done.stdout) == {f"py/{spec[3:]}": _own(done.stdout, "COUNT")["Job.run"]}


def _events(engine: str, python: str) -> tuple[list[tuple[object, ...]], str]:
    # (-o: uprobes writes its stdout in blocks, which may cut the fixture's lines)
    with tempfile.NamedTemporaryFile("r") as traced:
        done = _uprobes("trace", "-e", engine, "--json", "-o", traced.name,
                        "py:__main__.Job.run", "r py:__main__.Job.run",
                        "py:pyfuncs_pkg.geometry.area", "--", python, FIXTURE, "12")
        assert done.returncode == 0, done.stderr
        lines = traced.read().splitlines()
    events = []
    for line in lines:
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        if "summary" in ev:
            continue
        args = {k: v for k, v in ev["args"].items() if not k.startswith("__")}
        # (where in the page: a shared libpython moves with each run)
        where = (ev["ip"] & 0xfff, (ev.get("func") or 0) & 0xfff)
        events.append((ev["probe"], ev["kind"], where, tuple(sorted(args.items()))))
    return events, done.stdout


@pytest.mark.parametrize("python", INTERPRETERS, ids=[Path(p).name for p in INTERPRETERS])
def test_ptrace_sees_what_the_kernel_sees(python: str) -> None:
    kernel, out = _events("kernel", python)
    ptrace, _ = _events("ptrace", python)
    own = _own(out, "COUNT")
    assert len(kernel) == 2 * own["Job.run"] + own["pyfuncs_pkg.geometry.area"], kernel
    assert ptrace == kernel
    run = next(args for probe, kind, _, args in kernel if kind == "p" and "run" in probe)
    # (arguments are read on 3.11 only so far)
    shown = {"args": "(self=<Job>, k=0)"} if python in CPYTHONS else {}
    assert dict(run) == {"qualname": "Job.run", "file": FIXTURE, "line": 26, **shown}
    ret = next(args for probe, kind, _, args in kernel if kind == "r")
    assert dict(ret) == {"qualname": "Job.run", "file": FIXTURE, "type": "int"}
    area = next(args for probe, kind, _, args in kernel if "area" in probe)
    assert dict(area)["file"].endswith("/fixtures/pyfuncs_pkg/geometry.py")


@pytest.mark.parametrize("python", ["/usr/bin/python3.11", *LATER_CPYTHONS],
                         ids=["python3.11", *(Path(p).name for p in LATER_CPYTHONS)])
@pytest.mark.parametrize("engine", ENGINES)
def test_latency_pairs_calls_by_their_frame(engine: str, python: str) -> None:
    """fib recurses (a frame per call, one thread's calls nested); two
    generators run interleaved (their calls do not nest); boom raises, and
    its exit by the exception pairs with its entry."""
    done = _uprobes("latency", "-e", engine, "--json", "py:__main__.fib", "py:__main__.boom",
                    "py:__main__.gen", "--", python, FIXTURE, "40")
    assert done.returncode == 0, done.stderr
    own, returned = _own(done.stdout, "COUNT"), _own(done.stdout, "RETURNS")
    doc = json.loads(done.stdout[done.stdout.index("{"):])
    histograms = doc.get("histograms", doc)
    assert histograms["py/__main__.fib"]["count"] == own["fib"]
    assert histograms["py/__main__.gen"]["count"] == returned["gen"] == own["gen"]
    assert histograms["py/__main__.boom"]["count"] == own["boom"]
    assert "never returned" not in done.stderr, done.stderr


@pytest.mark.parametrize("python", ["/usr/bin/python3.11", *LATER_CPYTHONS],
                         ids=["python3.11", *(Path(p).name for p in LATER_CPYTHONS)])
def test_attach_to_a_running_program(python: str) -> None:
    """-p: the interpreter from the process's maps, `__main__` from its
    command line (a relative script path made absolute against its cwd)."""
    prog = subprocess.Popen([python, "py_funcs.py", "30", "--wait"],
                            cwd=os.path.dirname(FIXTURE), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert prog.stdin is not None and prog.stdout is not None
    with killed_after(prog):
        assert prog.stdout.readline().strip() == "ready"
        tracer = subprocess.Popen([*UPROBES, "count", "--json", "-e", "ptrace", "-p",
                                   str(prog.pid),
                                   "py:__main__.work", "py:py_funcs_lib.work"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        with killed_after(tracer):
            read_fd_until(tracer.stderr.fileno(), "counting")
            prog.stdin.write("go\n")
            prog.stdin.flush()
            own = _own(prog.stdout.read(), "COUNT")
            assert prog.wait(timeout=60) == 0
            out, _ = tracer.communicate(timeout=120)
    counted = _counted(out)
    assert counted["py/__main__.work"] == own["work"]
    assert counted["py/py_funcs_lib.work"] == own["py_funcs_lib.work"]


@over_later_cpythons
@pytest.mark.parametrize("monitored", [False, True], ids=["plain", "monitored"])
@pytest.mark.parametrize("engine", ENGINES)
def test_returns_of_constants_and_monitored_code(python: str, engine: str,
                                                 monitored: bool) -> None:
    """From 3.12 a function returning a constant (here None) returns through
    RETURN_CONST, and code that sys.monitoring watches runs the instrumented
    forms of RESUME and the returns: each return counted once, with its
    value's type; each call once, but for the first call of each function
    after the monitoring began, which the interpreter starts twice (RESUME
    finds the code not yet instrumented, instruments it and runs the
    instruction again, now INSTRUMENTED_RESUME)."""
    specs = ["py:__main__.nothing", "r py:__main__.nothing", "py:__main__.value",
             "r py:__main__.value"]
    extra = ["monitored"] if monitored else []
    done = _uprobes("count", "--json", "-e", engine, *specs, "--", python, RETURNS_FIXTURE,
                    "25", *extra)
    assert done.returncode == 0, done.stderr
    own = _own(done.stdout, "COUNT")
    assert own == {"nothing": 25, "value": 25}
    if engine == "ptrace":
        assert "4 of 4 probes trap-free" in done.stderr, done.stderr
    again = 1 if monitored else 0
    assert _counted(done.stdout) == {
        "py/__main__.nothing": 25 + again, "py/__main__.nothing%return": 25,
        "py/__main__.value": 25 + again, "py/__main__.value%return": 25}
    traced = _uprobes("trace", "--json", "-e", engine, "r py:__main__.nothing",
                      "r py:__main__.value", "--", python, RETURNS_FIXTURE, "3", *extra)
    assert traced.returncode == 0, traced.stderr
    types = Counter((ev["probe"], ev["args"]["type"]) for ev in map(json.loads, (
        line for line in traced.stdout.splitlines() if line.startswith('{"')))
        if "args" in ev)
    assert types == {("py/__main__.nothing%return", "NoneType"): 3,
                     ("py/__main__.value%return", "int"): 3}


def _handler_bytes(pid: int, spec: str) -> list[bytes]:
    """The first byte at each place of `spec` in process `pid`."""
    resolved = _uprobes("resolve", spec.replace("py:", f"py:{pid}:", 1))
    assert resolved.returncode == 0, resolved.stderr
    offsets = [int(m.group(1), 16) for m in re.finditer(r":(0x[0-9a-f]+) qualname=",
                                                        resolved.stdout)]
    assert offsets
    out = []
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for off in offsets:
            for m in procfs.maps(pid):
                if m.path == "/usr/bin/python3.11" and m.executable \
                        and m.contains_file_offset(off):
                    mem.seek(m.file_to_runtime_addr(off))
                    out.append(mem.read(1))
    return out


def _waiting_program(calls: str) -> subprocess.Popen[str]:
    prog = subprocess.Popen(["/usr/bin/python3.11", "py_funcs.py", calls, "--wait"],
                            cwd=os.path.dirname(FIXTURE), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert prog.stdout is not None and prog.stdout.readline().strip() == "ready"
    return prog


def test_trace_stops_only_the_functions_calls() -> None:
    """A traced py: function's handlers hold jumps, not int3s: each call is
    tested in the program and only the function's own stop (at an int3 in
    the jump's code); its events are the program's own calls, and detach
    leaves the handlers as they were."""
    spec = "py:__main__.Job.run"
    prog = _waiting_program("40")
    assert prog.stdin is not None and prog.stdout is not None
    with killed_after(prog):
        assert b"\xe9" not in _handler_bytes(prog.pid, spec)  # (the program's own code)
        tracer = subprocess.Popen([*UPROBES, "trace", "--json", "-e", "ptrace", "-p",
                                   str(prog.pid), spec, f"r {spec}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        with killed_after(tracer):
            read_fd_until(tracer.stderr.fileno(), "Ctrl-C")
            assert set(_handler_bytes(prog.pid, spec)) == {b"\xe9"}  # jmp rel32
            prog.stdin.write("go\n")
            prog.stdin.flush()
            own = _own(prog.stdout.read(), "COUNT")
            assert prog.wait(timeout=60) == 0
            out, _ = tracer.communicate(timeout=120)
    kinds = Counter(ev["kind"] for ev in map(json.loads, out.splitlines())
                    if "summary" not in ev)
    assert kinds == {"p": own["Job.run"], "r": own["Job.run"]}


def test_kill_9_of_uprobes_while_tracing_leaves_the_program_running() -> None:
    """uprobes killed while the jumps and their int3s are in the program:
    the program runs on to its own end, its output and status untouched."""
    plain = subprocess.run(["/usr/bin/python3.11", "py_funcs.py", "40"],
                           cwd=os.path.dirname(FIXTURE), capture_output=True, text=True,
                           timeout=120, check=True)
    prog = _waiting_program("40")
    assert prog.stdin is not None and prog.stdout is not None
    with killed_after(prog):
        tracer = subprocess.Popen([*UPROBES, "trace", "-e", "ptrace", "-p", str(prog.pid),
                                   "py:__main__.Job.run", "py:__main__.fib"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        with killed_after(tracer):
            read_fd_until(tracer.stderr.fileno(), "Ctrl-C")
            tracer.kill()
            tracer.wait(timeout=60)
        prog.stdin.write("go\n")
        prog.stdin.flush()
        out = prog.stdout.read()
        assert prog.wait(timeout=120) == 0
    assert out == plain.stdout


@pytest.mark.parametrize(("spec", "words"), [
    ("py:work", "MODULE.QUALNAME"),
    ("py:/bin/true:m.f", "no CPython eval loop"),
    ("py:python3.11:m.caf\u00e9", "only ASCII names"),
    ("py:python3.11:m.f x=%di", "fetches its own values"),
])
def test_bad_py_probes_are_one_line(spec: str, words: str) -> None:
    done = _uprobes("trace", spec, "--", "/bin/true")
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 3


def test_without_an_interpreter_it_says_where_one_is_named() -> None:
    done = _uprobes("resolve", "py:json.dumps")
    assert done.returncode == 2
    assert "needs its interpreter" in done.stderr and "Traceback" not in done.stderr


def test_resolve_shows_the_kernels_filter() -> None:
    done = _uprobes("resolve", "py:python3.11:json.decoder.JSONDecoder.decode")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len([line for line in lines if line.startswith("p:py/")]) == 2  # RESUME, RESUME_QUICK
    assert any('qualname == "JSONDecoder.decode" && (file ~ "*/json/decoder.py"' in line
               for line in lines if line.startswith("  filter "))
    counts = Counter(line.split()[1].split(":")[0] for line in lines if line.startswith("p:"))
    assert set(counts) == {os.path.realpath("/usr/bin/python3.11")} or \
        set(counts) == {"/usr/bin/python3.11"}


def test_the_script_as_python_names_it() -> None:
    """`python3.11 -u ./py_funcs.py`: an option before the script, and the
    path kept as given (CPython joins it to the working directory, no more)."""
    done = subprocess.run([*UPROBES, "count", "--json", "-e", "kernel", "py:__main__.work",
                           "py:/usr/bin/python3.11:__main__.work", "--", "/usr/bin/python3.11",
                           "-u", "./py_funcs.py", "20"],
                          cwd=os.path.dirname(FIXTURE), capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    own, counted = _own(done.stdout, "COUNT"), _counted(done.stdout)
    # two lines naming one function: two rows, each its own count
    assert counted == {"py/__main__.work": own["work"], "py/__main__.work_2": own["work"]}


def test_a_frozen_module() -> None:
    """os and posixpath are frozen into the interpreter: their code's file is
    `<frozen posixpath>`, not a path."""
    code = "import os\nfor _ in range(50):\n    os.path.join('a', 'b')\n"
    done = _uprobes("count", "--json", "-e", "kernel", "py:posixpath.join",
                    "--", "/usr/bin/python3.11", "-c", code)
    assert done.returncode == 0, done.stderr
    assert _counted(done.stdout)["py/posixpath.join"] >= 50


@pytest.mark.parametrize("engine", ENGINES)
def test_record_then_report_times_py_calls(engine: str, tmp_path: Path) -> None:
    """A recording's report pairs a py: function's calls by their frames."""
    out = tmp_path / "rec"
    done = _uprobes("record", "-e", engine, "-o", str(out), "py:__main__.fib",
                    "r py:__main__.fib", "--", "/usr/bin/python3.11", FIXTURE, "20")
    assert done.returncode == 0, done.stderr
    own = _own(done.stdout, "COUNT")
    report = _uprobes("report", "--json", str(out))
    assert report.returncode == 0, report.stderr
    doc = json.loads(report.stdout)
    assert doc["counts"]["py/__main__.fib"] == own["fib"]
    assert doc["latency"]["py/__main__.fib"]["count"] == own["fib"]
    assert doc["unpaired_returns"] == 0 and doc["never_returned"] == 0


def test_a_wrapper_script_on_path_is_named(tmp_path: Path) -> None:
    """`-- python3.11 app.py` where python3.11 on PATH is a script (a pyenv
    shim): the probes go in the first ELF python3.11 on PATH, which a shim
    may not start; a note says where they are. This one starts that very
    file, so the calls are counted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3.11"
    shim.write_text('#!/bin/sh\nexec /usr/bin/python3.11 "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run([*UPROBES, "count", "--json", "-e", "kernel", "py:__main__.work",
                           "--", "python3.11", FIXTURE, "3"], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert f"python3.11 on PATH is {shim}, a script: the probes are in /usr/bin/python3.11" \
        in done.stderr
    assert _counted(done.stdout)["py/__main__.work"] == _own(done.stdout, "COUNT")["work"]


def test_stacks_at_a_py_function_show_it_innermost() -> None:
    """At a py: entry the function's frame is made but has run nothing yet
    (CPython's tracebacks leave such a frame out): the stack still ends in
    it, at its `def` line, under its caller's line."""
    done = _uprobes("stacks", "--python", "--folded", "py:__main__.work",
                    "--", "/usr/bin/python3.11", FIXTURE, "5")
    assert done.returncode == 0, done.stderr
    source = Path(FIXTURE).read_text().splitlines()
    def_line = source.index("def work(i):") + 1
    stacks = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
              for line in done.stdout.splitlines() if line.startswith("python3.11;")}
    leaves = {stack.split(";")[-1] for stack in stacks}
    assert leaves == {f"work (py_funcs.py:{def_line})"}, stacks
    own = _own(done.stdout, "COUNT")
    assert sum(stacks.values()) == own["work"]
    assert any(stack.endswith(f";Job.run (py_funcs.py:{def_line + 10});work (py_funcs.py:"
                              f"{def_line})") for stack in stacks), stacks


@pytest.mark.parametrize("engine", ENGINES)
def test_text_lines_leave_the_engines_own_fields_out(engine: str) -> None:
    """`__frame` and `__py_oparg` pair and filter the calls: JSON has them,
    a text line shows the function's own values only."""
    done = _uprobes("trace", "-e", engine, "py:__main__.Job.run", "r py:__main__.Job.run",
                    "--", "/usr/bin/python3.11", FIXTURE, "3")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if ": __main__.Job.run" in line]
    assert len(lines) == 2, done.stdout
    assert lines[0].endswith(f'(0x{lines[0].split("(0x")[1].split(")")[0]}) '
                             f'qualname="Job.run" file="{FIXTURE}" line=26 '
                             'args=(self=<Job>, k=0)')
    assert lines[1].endswith(f'qualname="Job.run" file="{FIXTURE}" type="int"')
    assert "__" not in lines[0].split(": ", 2)[2] + lines[1].split(": ", 2)[2]


SWITCHES = """
import sys
def other():
    pass
def target(i):
    return i
for i in range(50000):
    other()
for i in range(10):
    target(i)
status = open("/proc/self/status").read().splitlines()
switches = sum(int(line.split()[1]) for line in status if line.endswith("ctxt_switches")
               or "ctxt_switches:" in line)
open(sys.argv[1], "w").write(str(switches))
"""


def test_a_session_handler_stops_only_the_functions_calls(tmp_path: Path) -> None:
    """A Session's handler on a py: function runs while the thread is
    stopped (`ev.hit`), at each of the function's calls, and at no other
    Python call: the guard is tested in the program (a stop per Python call
    before: 50,000 calls of another function were 50,000 stops, which the
    program's own count of its context switches shows)."""
    import uprobes

    out = tmp_path / "switches"
    seen: list[int] = []
    s = uprobes.Session(engine="ptrace")

    @s.probe("py:__main__.target")
    def on_target(ev: uprobes.Event) -> None:
        assert ev.hit is not None  # stopped: its registers are there
        seen.append(ev.hit.regs.rip)

    status = s.spawn(["/usr/bin/python3.11", "-c", SWITCHES, str(out)])
    assert status == 0
    assert len(seen) == 10
    assert int(out.read_text()) < 10000, out.read_text()
