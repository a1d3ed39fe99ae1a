"""Python stacks at native probes (`--python`, docs/python.md): the frames a
CPython program runs, read from its interpreter at each hit, against the
program's own traceback.extract_stack() at the call, py-spy's dump of the
same process and its own call counter; on every 3.11 interpreter here, and
on 3.12 and 3.13 where they are installed."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CPYTHONS,
    LATER_CPYTHONS,
    Compiler,
    killed_after,
    over_installed,
    over_later_cpythons,
    read_fd_until,
    wait_until,
)

from uprobes.commands import main
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.resolve.pydwarf import debug_file_for, fields_from_dwarf
from uprobes.resolve.pylayout import (
    PythonLayoutError,
    compute_layout,
    debug_offsets,
    fields_for,
    layout_for,
)
from uprobes.resolve.pyversions import CHANGED, minor
from uprobes.unwind.cpython import linetable
from uprobes.unwind.cpython.linetable import LineTable, line_at
from uprobes.unwind.cpython.reader import MAX_PY_FRAMES

INTERPRETERS = CPYTHONS + LATER_CPYTHONS
FIXTURE = str(Path(__file__).parent / "fixtures" / "py_stacks.py")
PYTHON311 = "/usr/bin/python3.11"
UPROBES = [sys.executable, "-m", "uprobes"]
PY_SPY = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")


Frames = tuple[tuple[str, str, int], ...]


def _python_frames(frames: list[dict[str, object]]) -> Frames:
    """A JSON stack's Python frames as the fixture prints them: outermost first."""
    return tuple((str(f["symbol"]), str(f["file"]), int(str(f["line"])))
                 for f in reversed(frames) if f.get("python"))


def _calls(text: str) -> Counter[Frames]:
    return Counter(tuple(tuple(x) for x in json.loads(line[5:]))  # type: ignore[misc]
                   for line in text.splitlines() if line.startswith("CALL "))


def test_line_table_gives_the_lines_cpython_gives() -> None:
    """Every code unit of real code objects, against code.co_lines()."""
    import asyncio.base_events
    import email.parser
    import inspect
    import json.decoder
    checked = 0

    def walk(code: object) -> None:
        nonlocal checked
        assert hasattr(code, "co_lines") and hasattr(code, "co_consts")
        for start, end, line in code.co_lines():
            for at in range(start, end, 2):
                assert line_at(code.co_linetable, code.co_firstlineno, at // 2) == line
                checked += 1
        for const in code.co_consts:
            if hasattr(const, "co_lines"):
                walk(const)

    for mod in (asyncio.base_events, email.parser, json.decoder):
        walk(compile(inspect.getsource(mod), str(mod.__file__), "exec"))
    assert checked > 10000


@over_later_cpythons
def test_line_table_of_later_versions(python: str) -> None:
    """3.12's and 3.13's location tables are read the same way: the module
    run by that interpreter on its own code objects, against co_lines()."""
    check = f"""
import asyncio.base_events, email.parser, inspect, json.decoder, runpy
line_at = runpy.run_path({linetable.__file__!r})["line_at"]
checked = 0
def walk(code):
    global checked
    for start, end, line in code.co_lines():
        for at in range(start, end, 2):
            assert line_at(code.co_linetable, code.co_firstlineno, at // 2) == line, (code, at)
            checked += 1
    for const in code.co_consts:
        if hasattr(const, "co_lines"):
            walk(const)
for mod in (asyncio.base_events, email.parser, json.decoder):
    walk(compile(inspect.getsource(mod), mod.__file__, "exec"))
print(checked)
"""
    done = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 10000


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_stacks_give_the_programs_own_python_frames(python: str,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    status = main(["stacks", "-e", "ptrace", "--python", "--json", "libc:getpid", "--",
                   python, FIXTURE], out=out)
    assert status == 0
    printed = capfd.readouterr().out
    assert "calls 5" in printed
    expected = _calls(printed)
    assert sum(expected.values()) == 5
    (probe,) = json.loads(out.getvalue()).values()
    assert probe["hits"] == 5 and probe["unwalked"] == 0
    got: Counter[Frames] = Counter()
    for stack in probe["stacks"]:
        got[_python_frames(stack["frames"])] += stack["count"]
        names = [str(f["symbol"]) for f in stack["frames"]]
        # Each eval-loop frame stands replaced by the Python frames it ran.
        assert not [n for n in names if n.startswith("_PyEval_EvalFrameDefault")]
        if "outer.<locals>.<lambda>" in names:
            lam, sort, out_ = (names.index("outer.<locals>.<lambda>"),
                               next(i for i, n in enumerate(names)
                                    if n.startswith("builtin_sorted")), names.index("outer"))
            assert lam < sort < out_, names
    assert got == expected


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS[:1] + LATER_CPYTHONS)
def test_session_events_carry_the_python_frames(python: str,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    """`Session(python=True)`: each event's stack has the Python frames the
    program itself saw at the call."""
    import uprobes
    session = uprobes.Session(python=True)
    got: Counter[Frames] = Counter()

    @session.probe("libc:getpid")
    def on_getpid(ev: Any) -> None:
        got[tuple((f.symbol, f.path, f.line) for f in reversed(ev.stack) if f.python)] += 1

    session.spawn([python, FIXTURE])
    expected = _calls(capfd.readouterr().out)
    assert sum(expected.values()) == 5
    assert got == expected


@pytest.mark.root
@pytest.mark.parametrize("how", ["thread", "exec"])
def test_other_threads_and_after_exec(how: str, capfd: pytest.CaptureFixture[str]) -> None:
    """A hit in a thread other than the main one finds that thread's frames;
    a process that had no interpreter when first hit (a shell) is looked at
    again once it has exec'd Python."""
    python = INTERPRETERS[0]
    command = [python, FIXTURE, "thread"] if how == "thread" else \
        ["/bin/sh", "-c", f"echo $$ >/dev/null; exec {python} {FIXTURE}"]
    out = io.StringIO()
    status = main(["stacks", "-e", "ptrace", "--python", "--json", "libc:getpid", "--",
                   *command], out=out)
    assert status == 0
    expected = _calls(capfd.readouterr().out)
    assert sum(expected.values()) == 5
    (probe,) = json.loads(out.getvalue()).values()
    got: Counter[Frames] = Counter()
    for stack in probe["stacks"]:
        frames = _python_frames(stack["frames"])
        if frames:
            got[frames] += stack["count"]
    assert got == expected
    if how == "thread":
        assert all(f[0][0] == "Thread._bootstrap" for f in got)


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_running_process_against_py_spy(python: str, tmp_path: Path) -> None:
    if PY_SPY is None:
        pytest.skip("py-spy is not installed (pip install py-spy)")
    assert PY_SPY is not None
    spy = PY_SPY
    dumps: list[str] = []
    expected, nap, stacks, _ = _traced_run(python, tmp_path, during=lambda pid: dumps.append(
        subprocess.run([spy, "dump", "--nonblocking", "--json", "--pid", str(pid)],
                       capture_output=True, text=True, timeout=120, check=True).stdout))
    assert sum(expected.values()) == 5
    assert Counter(_python_frames(s) for s in stacks) == expected
    (thread,) = json.loads(dumps[0])
    dumped = tuple((f["name"], f["filename"], f["line"]) for f in reversed(thread["frames"]))
    assert nap == dumped and nap[-1][0] == "Sleeper.nap"


@pytest.mark.root
def test_kernel_engine_says_it_cannot(capfd: pytest.CaptureFixture[str]) -> None:
    status = main(["stacks", "-e", "kernel", "--python", "libc:getpid", "--",
                   "/usr/bin/python3.11", FIXTURE], out=io.StringIO())
    assert status == 2
    captured = capfd.readouterr()
    assert "CALL" not in captured.out  # the command never ran
    (line,) = captured.err.splitlines()
    assert line.startswith("uprobes: error: --python: the kernel engine cannot read Python")


@pytest.mark.root
def test_a_process_without_python_keeps_native_stacks(compile_c: Compiler,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    exe = compile_c("callers.c", "-O2")
    out = io.StringIO()
    status = main(["stacks", "--python", "--json", f"{exe}:hot", "--", str(exe)], out=out)
    assert status == 7
    (probe,) = json.loads(out.getvalue()).values()
    assert probe["hits"] == 8 and probe["unwalked"] == 0
    assert all(f["symbol"] for s in probe["stacks"] for f in s["frames"])
    notes = [x for x in capfd.readouterr().err.splitlines() if "CPython" in x]
    assert len(notes) == 1 and "runs no CPython interpreter" in notes[0], notes


@pytest.mark.parametrize("hexversion, says", [
    (0x030E00F0, "Python 3.14.0 (/usr/bin/python3.11): its frames cannot be read (uprobes "
                 "reads CPython 3.11, 3.12, 3.13)"),
    (0x030B63F0, "Python 3.11.99 (/usr/bin/python3.11): its frames cannot be read without its "
                 "own headers (none found in /usr/include/python3.11 (headers of 3.11."),
])
def test_an_interpreter_we_cannot_read_says_its_version(hexversion: int, says: str) -> None:
    if not os.path.exists("/usr/include/python3.11/internal/pycore_frame.h"):
        pytest.skip("python3.11-dev is not installed")
    image = ElfImage.open("/usr/bin/python3.11")
    with pytest.raises(PythonLayoutError) as e:
        layout_for(image, "/usr/bin/python3.11", hexversion)
    assert str(e.value).startswith(says)
    assert "\n" not in str(e.value)


def _with_dwarf() -> list[tuple[str, str]]:
    """(file holding the runtime, its headers) of the builds here with DWARF."""
    found = []
    for path in INTERPRETERS:
        real = os.path.realpath(path)
        prefix = os.path.dirname(os.path.dirname(real))
        name = os.path.basename(real)
        lib = os.path.join(prefix, "lib", f"lib{name.rstrip('d')}.so.1.0")
        runtime = lib if os.path.exists(lib) else real
        include = os.path.join(prefix, "include", name)
        image = ElfImage.open(runtime)
        if debug_file_for(runtime, image.build_id) and os.path.isdir(include):
            found.append((runtime, include))
    return found


def _derived(runtime: str) -> tuple[int, dict[str, int], dict[str, int] | None]:
    """(Py_Version, the fields from the DWARF, the debug offsets) of a build."""
    image = ElfImage.open(runtime)
    symbols = SymbolTable.load(image)
    (version,) = symbols.lookup("Py_Version")[:1]
    hexversion = int.from_bytes(image.read_link(version.link_addr, 4), "little")
    addrs = [symbols.lookup(name)[0].link_addr for name in (
        "_PyEval_EvalFrameDefault", "PyStaticMethod_New", "PyDescr_NewGetSet", "_PyRuntime")]
    debug = debug_file_for(runtime, image.build_id)
    assert debug is not None
    fields = fields_from_dwarf(debug, *addrs[:3], CHANGED[minor(hexversion)])
    assert fields is not None
    return hexversion, fields, debug_offsets(image, addrs[3], hexversion)


@pytest.mark.parametrize("runtime, include", _with_dwarf())
def test_dwarf_and_headers_give_one_layout(runtime: str, include: str) -> None:
    """Two derivations from the build itself agree on every field."""
    hexversion, fields, _ = _derived(runtime)
    assert set(fields) == fields_for(hexversion)  # the module walk's too (resolve/pycode.py)
    assert fields == compute_layout(include, hexversion).fields


@over_installed("runtime", [r for r, _ in _with_dwarf() if "3.13" in r])
def test_debug_offsets_agree_with_the_dwarf(runtime: str) -> None:
    """What 3.13 describes about itself, read by pyversions.py's order of
    `_Py_DebugOffsets`, gives the offsets its DWARF gives."""
    _, fields, described = _derived(runtime)
    assert described is not None
    shared = {k for k in described if k in fields}
    assert len(shared) > 30
    assert {k: described[k] for k in shared} == {k: fields[k] for k in shared}


EDGES = str(Path(__file__).parent / "fixtures" / "py_edges.py")


def _edge_stacks(python: str, case: str, capfd: pytest.CaptureFixture[str]
                 ) -> tuple[Counter[Frames], Counter[Frames]]:
    """(the program's own stacks at its calls, the Python frames uprobes read
    there) of a py_edges.py case."""
    out = io.StringIO()
    status = main(["stacks", "-e", "ptrace", "--python", "--json", "libc:getpid", "--",
                   python, EDGES, case], out=out)
    assert status == 0
    expected = _calls(capfd.readouterr().out)
    (probe,) = json.loads(out.getvalue()).values()
    got: Counter[Frames] = Counter()
    for stack in probe["stacks"]:
        frames = tuple((str(f["symbol"]), str(f["file"]), f["line"])
                       for f in reversed(stack["frames"]) if f.get("python"))
        if frames or case != "reexec":
            got[frames] += stack["count"]  # type: ignore[index]
    return expected, got


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
@pytest.mark.parametrize("case", ["reexec", "big", "name"])
def test_edge_cases_give_the_programs_own_frames(python: str, case: str,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """After an exec of the same interpreter (the main thread keeps its id),
    in a module whose location table is megabytes long, and in a function
    named with control characters: the program's own frames."""
    expected, got = _edge_stacks(python, case, capfd)
    assert sum(expected.values()) == (2 if case == "reexec" else 1)
    assert got == expected


def _skip_without_subinterpreters(python: str) -> None:
    if all(subprocess.run([python, "-c", f"import {m}"], capture_output=True,
                          timeout=60).returncode for m in ("_xxsubinterpreters", "_interpreters")):
        pytest.skip(f"{python} has no subinterpreter module")


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_a_subinterpreter_on_the_same_thread(python: str,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    """The thread's state in the interpreter it runs, not the first with its
    thread id: a subinterpreter's, idle once it returned, or the main one's
    while the subinterpreter runs."""
    _skip_without_subinterpreters(python)
    expected, got = _edge_stacks(python, "subinterp", capfd)
    assert sum(expected.values()) == 3
    assert got == expected


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_frames_beyond_the_limit_are_marked(python: str,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    """A stack deeper than MAX_PY_FRAMES: its innermost frames (entry frames
    not counted), then `...` where it was cut."""
    expected, got = _edge_stacks(python, "deep", capfd)
    ((own, n),) = expected.items()
    ((frames, m),) = got.items()
    assert n == m == 1 and len(own) > MAX_PY_FRAMES
    assert frames[0] == ("...", "None", None)
    assert frames[1:] == own[-MAX_PY_FRAMES:]


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_control_characters_in_names_stay_on_one_line(
        python: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Text and folded output escape a newline or tab in a qualified name or
    a file name (JSON keeps them as they are)."""
    for form in ("--folded", "--text"):
        out = io.StringIO()
        args = ["stacks", "-e", "ptrace", "--python", "libc:getpid", "--",
                python, EDGES, "name"]
        if form == "--folded":
            args.insert(3, form)
        assert main(args, out=out) == 0
        capfd.readouterr()
        text = out.getvalue()
        if form == "--folded":
            (line,) = text.splitlines()
            assert ";odd\\n\\tname (a\\nfile.py:" in line
        else:
            lines = text.splitlines()
            assert any(x.strip().startswith("odd\\n\\tname (a\\nfile.py:") for x in lines)
            assert not any(x.strip().startswith(("name", "file.py")) for x in lines)


@pytest.mark.root
def test_the_init_shim_is_no_frame(capfd: pytest.CaptureFixture[str]) -> None:
    """3.13's frame that runs after a class's `__init__` (its code has no
    traceable instruction) is never shown, innermost or not."""
    pythons = [p for p in LATER_CPYTHONS if "3.13" in p]
    if not pythons:
        pytest.skip("no CPython 3.13 here")
    program = ("import os\nclass C:\n    def __init__(self):\n        big = [0] * 1000\n"
               "def main():\n    for i in range(50):\n        C()\nmain()\n")
    out = io.StringIO()
    assert main(["stacks", "-e", "ptrace", "--python", "--folded", "libc:free", "--",
                 pythons[0], "-c", program], out=out) == 0
    capfd.readouterr()
    text = out.getvalue()
    assert "main (<string>:" in text
    assert "(__init__:" not in text


def test_line_table_decodes_each_entry_once() -> None:
    """Lookups over a big table decode each entry at most once, whatever
    their order, and give what code.co_lines() gives."""
    code = compile("x = 1\n" * 20000, "big.py", "exec")
    table = LineTable(code.co_linetable, code.co_firstlineno)
    units = [(at // 2, line) for start, end, line in code.co_lines()
             for at in range(start, end, 2)]
    decoded = 0
    for index, line in units[::-1] + units[::7]:
        got, used = table.line(index)
        decoded += used
        assert got == line
    assert len(table.ends) <= decoded <= 5 * len(table.ends) and len(table.ends) <= len(units)


def _traced_run(python: str, tmp_path: Path, *flags: str,
                during: Callable[[int], object] | None = None,
                ) -> tuple[Counter[Frames], Frames, list[Any], str]:
    """The fixture (`wait`) traced by `trace --python -p` at getpid and its
    sleep: (its own stacks at the calls, the Python frames of its sleep,
    the getpid hits' whole stacks, uprobes' stderr). `during(pid)` runs
    while it sleeps, traced."""
    prog = subprocess.Popen([python, FIXTURE, "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    out = tmp_path / f"hits{len(flags)}.jsonl"
    tracer = None
    try:
        with killed_after(prog):
            assert prog.stdin is not None and prog.stdout is not None
            assert prog.stdout.readline() == "ready\n"
            tracer = subprocess.Popen(
                [*UPROBES, "trace", "-e", "ptrace", "--python", "--json", *flags,
                 "-o", str(out), "-p", str(prog.pid), "libc:getpid", "libc:clock_nanosleep"],
                stderr=subprocess.PIPE)
            assert tracer.stderr is not None
            said = read_fd_until(tracer.stderr.fileno(), "Ctrl-C to stop")
            assert "Ctrl-C to stop" in said, said
            prog.stdin.write("go\n")
            prog.stdin.flush()
            lines = []
            while (line := prog.stdout.readline()) not in ("napping\n", ""):
                lines.append(line)
            assert "calls 5\n" in lines
            # In the sleep (after the hit): clock_nanosleep is x86-64 syscall 230.
            wait_until(lambda: Path(f"/proc/{prog.pid}/syscall").read_text().split()[0] == "230",
                       "the program's sleep")
            if during is not None:
                during(prog.pid)
            # Stopped before the program ends: a code object first seen in a
            # recorded hit is named from the live process.
            tracer.send_signal(signal.SIGINT)
            assert tracer.wait(timeout=120) == 0
            prog.kill()
            hits = [json.loads(x) for x in out.read_text().splitlines() if '"probe"' in x]
            (nap,) = [_python_frames(h["stack"]) for h in hits
                      if h["probe"].endswith("clock_nanosleep")]
            stacks = [h["stack"] for h in hits if h["probe"].endswith("getpid")]
            return _calls("".join(lines)), nap, stacks, said
    finally:
        prog.kill()
        prog.wait()
        if tracer is not None:
            tracer.wait(timeout=120)


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_trapfree_python_frames_are_the_int3_paths(python: str, tmp_path: Path) -> None:
    """With -p, each hit's Python frames are copied by the probe's code (no
    stop: both probes placed trap-free), also in a sleep that released the
    GIL; the same frames as the program's own extract_stack() and as the
    int3 path's, native frames and all."""
    expected, nap, stacks, said = _traced_run(python, tmp_path)
    assert "2 of 2 probes trap-free" in said, said
    got = Counter(_python_frames(s) for s in stacks)
    assert got == expected and sum(got.values()) == 5
    assert nap[-1][0] == "Sleeper.nap" and nap[0][0] == "<module>"
    expected3, nap3, stacks3, said3 = _traced_run(python, tmp_path, "--no-trapfree")
    assert "trap-free" not in said3
    assert expected3 == expected and nap3 == nap

    def whole(s: list[dict[str, object]]) -> tuple[tuple[object, ...], ...]:
        return tuple((f.get("symbol"), f.get("offset"), f.get("file"), f.get("line")) for f in s)
    assert Counter(map(whole, stacks)) == Counter(map(whole, stacks3))


def _go_done_end(argv: list[str], tmp_path: Path, spec: str
                 ) -> tuple[list[dict[str, Any]], str, str, int]:
    """`trace --python -p` of a program that prints "ready", runs at "go",
    prints "done" and waits for "end": (its hits, what uprobes said by
    placement, what it said after, its pid)."""
    prog = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out = tmp_path / "hits.jsonl"
    tracer = None
    try:
        with killed_after(prog):
            assert prog.stdin is not None and prog.stdout is not None
            assert prog.stdout.readline() == "ready\n"
            tracer = subprocess.Popen(
                [*UPROBES, "trace", "-e", "ptrace", "--python", "--json", "-o", str(out),
                 "-p", str(prog.pid), spec], stderr=subprocess.PIPE)
            assert tracer.stderr is not None
            said = read_fd_until(tracer.stderr.fileno(), "Ctrl-C to stop")
            prog.stdin.write("go\n")
            prog.stdin.flush()
            assert prog.stdout.readline() == "done\n"
            tracer.send_signal(signal.SIGINT)
            _, err = tracer.communicate(timeout=120)
            assert tracer.returncode == 0
            prog.stdin.write("end\n")
            prog.stdin.flush()
            assert prog.wait(timeout=60) == 0
        hits = [json.loads(x) for x in out.read_text().splitlines() if '"probe"' in x]
        return hits, said, err.decode(), prog.pid
    finally:
        prog.kill()
        prog.wait()
        if tracer is not None:
            tracer.wait(timeout=120)


CALLS_ITS_OWN = """
import ctypes, sys
print("ready", flush=True)
sys.stdin.readline()
for _ in range(3):
    ctypes.pythonapi.PyGILState_GetThisThreadState()
print("done", flush=True)
sys.stdin.readline()
"""


def _walk_callees() -> list[tuple[str, str]]:
    """(python, probe) in the code the walk's call runs: the function itself,
    and, in a shared libpython, what its PLT jump leads to (PyThread_tss_get,
    then libc's pthread_getspecific), and the PLT stub."""
    cases = [(PYTHON311, f"{PYTHON311}:PyGILState_GetThisThreadState")]
    for python in [p for p in CPYTHONS + LATER_CPYTHONS if "/.pyenv/" in p][:1]:
        minor = re.search(r"python(3\.\d+)$", python)
        assert minor is not None
        lib = Path(os.path.realpath(python)).parent.parent / "lib" / \
            f"libpython{minor.group(1)}.so.1.0"
        cases += [(python, f"{lib}:PyThread_tss_get"), (python, "libc:pthread_getspecific")]
    return cases


@pytest.mark.root
@pytest.mark.parametrize(("python", "spec"), _walk_callees())
def test_a_probe_in_what_the_walk_calls_keeps_the_int3(python: str, spec: str,
                                                       tmp_path: Path) -> None:
    """The trap-free walk calls PyGILState_GetThisThreadState: a probe in the
    code that runs (followed through its jumps and PLT stubs) takes the int3
    path (its code would call itself without end), says why, and the
    program's calls are seen with their Python frames."""
    hits, said, _, _ = _go_done_end([python, "-c", CALLS_ITS_OWN], tmp_path, spec)
    assert "in the code its call to PyGILState_GetThisThreadState runs" in said \
        and "0 of 1 probes trap-free" in said, said
    ours = [h for h in hits if any(f.get("python") and f["symbol"] == "<module>"
                                   for f in h["stack"])]
    assert len(ours) >= 3, hits


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS)
def test_trapfree_frames_of_a_subinterpreter(python: str, tmp_path: Path) -> None:
    """With -p, a call in a subinterpreter the thread runs has the
    subinterpreter's frames (on 3.11 the GILState state is the thread's
    first, the main interpreter's: the one holding the GIL is taken when
    it is this thread's), as the program sees them."""
    _skip_without_subinterpreters(python)
    prog = subprocess.Popen([python, EDGES, "subwait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    out = tmp_path / "hits.jsonl"
    tracer = None
    try:
        with killed_after(prog):
            assert prog.stdin is not None and prog.stdout is not None
            assert prog.stdout.readline() == b"ready\n"
            tracer = subprocess.Popen(
                [*UPROBES, "trace", "-e", "ptrace", "--python", "--json", "-o", str(out),
                 "-p", str(prog.pid), "libc:getpid"], stderr=subprocess.PIPE)
            assert tracer.stderr is not None
            said = read_fd_until(tracer.stderr.fileno(), "Ctrl-C to stop")
            assert "1 of 1 probes trap-free" in said, said
            prog.stdin.write(b"g")
            prog.stdin.flush()
            lines = [prog.stdout.readline().decode(), prog.stdout.readline().decode()]
            # The subinterpreter waits in its frames: stopped meanwhile.
            tracer.send_signal(signal.SIGINT)
            assert tracer.wait(timeout=120) == 0
            prog.stdin.write(b"e")
            prog.stdin.flush()
            assert prog.wait(timeout=60) == 0
        expected = _calls("".join(lines))
        assert sum(expected.values()) == 2
        hits = [json.loads(x) for x in out.read_text().splitlines() if '"probe"' in x]
        got = Counter(_python_frames(h["stack"]) for h in hits)
        got.pop((), None)  # (getpid calls of the interpreter's own, with no frames)
        assert got == expected
    finally:
        prog.kill()
        prog.wait()
        if tracer is not None:
            tracer.wait(timeout=120)


MAKES_AND_FREES = """
import os, sys
{make}
def main():
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range({calls}):
        f = make(i)
        f()
        del f
    print("done", flush=True)
    sys.stdin.readline()
main()
"""
"""A program that makes a function by `exec`, calls it and frees it, `calls` times."""
FREES_ITS_CODE = MAKES_AND_FREES.format(calls=300, make="""
def make(i):
    ns = {}
    exec(compile("import os\\ndef f_%d():\\n    os.getpid()\\n" % i, "gen.py", "exec"), ns)
    return ns.pop("f_%d" % i)""")


def _made_and_freed(python: str, program: str, tmp_path: Path,
                    calls: int) -> list[list[tuple[str, Any, Any]]]:
    """The Python frames (outermost first) of each of `calls` hits of a
    MAKES_AND_FREES `program`, traced trap-free with -p."""
    script = tmp_path / "frees.py"
    script.write_text(program)
    hits, said, _, _ = _go_done_end([python, str(script)], tmp_path, "libc:getpid")
    assert "1 of 1 probes trap-free" in said, said
    stacks = [[(str(f["symbol"]), f["file"], f["line"]) for f in reversed(h["stack"])
               if f.get("python")] for h in hits]
    ours = [s for s in stacks if s and s[0][0] == "<module>"]
    assert len(ours) == calls, Counter(s[-1] if s else "none" for s in stacks)
    return ours


@pytest.mark.root
def test_trapfree_callers_of_a_freed_code_object_are_named(tmp_path: Path) -> None:
    """With -p, a frame whose code object is freed before uprobes names it
    (each call's function made and freed) is named from the names copied at
    the hit, and its callers, alive, are named: every call has `main` and
    `<module>` (before, the stack ended there: 225 of 300 calls had no
    Python frame). A code object made where a freed one was, its strings
    where the freed one's were, has the freed one's fingerprint (addresses):
    it is told apart by the names copied, never named for the freed one
    (before: 74 of 300 calls named after a later function, one `os`)."""
    ours = _made_and_freed(PYTHON311, FREES_ITS_CODE, tmp_path, 300)
    assert all([f[0] for f in s[:2]] == ["<module>", "main"] and len(s) == 3 for s in ours), ours
    # Call i's own function, f_i, line 3 (read from the live code object),
    # or unknown (named from the copy: its code object was gone).
    wrong = [(i, s[2]) for i, s in enumerate(ours)
             if s[2][:2] != (f"f_{i}", "gen.py") or s[2][2] not in (3, None)]
    assert not wrong, f"{len(wrong)} of 300 misnamed: {wrong[:5]}"


REPLACES_ITS_CODE = MAKES_AND_FREES.format(calls=400, make="""
KINDS = ["f_" + "x" * 60 + "_", "f\\u00e9_", "f\\u4e2d_", "f\\U00020000_"]
def make(i):
    name = KINDS[i // 100] + "%04d" % i
    ns = {}
    exec(compile("import os, json, traceback\\ndef %s():\\n    json.dumps([[f.name, f.lineno] for f"
                 " in traceback.extract_stack()]); os.getpid()\\n" % name, "gen.py", "exec"), ns)
    return ns.pop(name)""")
KINDS = ["f_" + "x" * 60 + "_", "f\u00e9_", "f\u4e2d_", "f\U00020000_"]


@pytest.mark.root
@pytest.mark.parametrize("python", INTERPRETERS[:1] + LATER_CPYTHONS)
def test_trapfree_a_freed_code_objects_replacement_is_told_by_its_text(
        python: str, tmp_path: Path) -> None:
    """A code object made where a freed one was, its names of the freed
    one's length, is told apart by their text as copied at the hit: names
    of 67 characters that differ in their last 4 (before, 3.11's copy held
    32 characters: 48 of 300 named after another function), and names of
    1, 2 and 4 bytes a character (before, a non-ASCII name was told by its
    length alone: 149-240 of 300 misnamed on 3.11). Each call's frame is
    its own function, line 3, or, its code object gone, named from the
    copy (line unknown); never another's."""
    ours = _made_and_freed(python, REPLACES_ITS_CODE, tmp_path, 400)
    assert all(len(s) == 3 for s in ours), ours
    wrong = [(i, s[2]) for i, s in enumerate(ours)
             if s[2][:2] != (f"{KINDS[i // 100]}{i:04d}", "gen.py") or s[2][2] not in (3, None)]
    others = Counter(KINDS[i // 100] for i, f in wrong if f[0] != "<freed code>")
    assert not wrong, f"named for another function: {others}; " \
        f"{len(wrong) - others.total()} <freed code>: {wrong[:3]}"


FORKS = """
import os, sys
def child_leaf():
    os.getpid()
def main():
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            child_leaf()
            os._exit(0)
        os.waitpid(pid, 0)
    print("done", flush=True)
    sys.stdin.readline()
main()
"""


@pytest.mark.root
def test_trapfree_frames_of_a_fork_child_that_ended(tmp_path: Path) -> None:
    """With -p, a fork child's hits (trap-free: it has the jumps too) are
    named after it has ended, from its parent's code objects, with no note
    that it runs no interpreter (before: no Python frame, and that note)."""
    script = tmp_path / "forks.py"
    script.write_text(FORKS)
    hits, said, err, pid = _go_done_end([PYTHON311, str(script)], tmp_path, "libc:getpid")
    assert "1 of 1 probes trap-free" in said, said
    assert "runs no CPython" not in err, err
    stacks = Counter(tuple(str(f["symbol"]) for f in reversed(h["stack"]) if f.get("python"))
                     for h in hits if h["pid"] != pid)
    assert stacks[("<module>", "main", "child_leaf")] == 5, stacks


def test_a_records_python_area_is_parsed_whatever_it_holds() -> None:
    """The Python area of a trap-free record is written by the program's
    code into memory it shares with us: whatever its words say (counts,
    pointers, name lengths), `copied` and `copied_key` stay in its bounds
    and never raise."""
    import random

    from uprobes.engines.trapfree.pywalk import HEADER, NAME, PyWalk, copied, copied_key
    from uprobes.unwind.cpython.reader import StrHead
    walk = PyWalk(func=0, hops=(8,), header=72, previous=8, code=32, fp_at=72, fp_len=72,
                  frames=25, at=4096, qualname=56, filename=40, str_length=16,
                  strs=StrHead(16, 32, 56, 28, 32, 64))
    rng = random.Random(18)
    words = [0, 1, 25, 26, 1 << 40, -1, -(1 << 63), (1 << 63) - 1, NAME * 7, NAME * 50]
    for _ in range(300):
        area = bytearray(rng.randbytes(walk.end))
        for at in range(walk.at, walk.at + HEADER, 8):
            area[at:at + 8] = rng.choice(words).to_bytes(8, "little", signed=True)
        for k in range(rng.randrange(2 * walk.frames)):  # lengths of names: any
            lo = walk.names + NAME * k
            area[lo:lo + 8] = rng.choice([0, 3, NAME, 1 << 62]).to_bytes(8, "little")
        got = copied(walk, bytes(area))
        copied_key(walk, bytes(area))
        if got is not None:
            assert len(got.blobs) == len(got.heads) == len(got.names) <= walk.frames
            assert all(n is None or (len(n[0]), len(n[1])) == (NAME, NAME) for n in got.names)
