"""The command line as users run it: examples, errors, exit statuses."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import uprobes.commands
from uprobes.commands import COMMANDS, _modules, main

BIN = str(Path(sys.executable).parent)


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uprobes", *argv], capture_output=True,
                          text=True, timeout=120)


EXAMPLES = [
    # system-wide probes are the kernel engine's, `cleanup` clears tracefs, and `--kernel`
    # and `--breakdown` read the kernel's tracepoints: all root's
    pytest.param(m.NAME, e, id=e,
                 marks=[pytest.mark.root] if (m.NAME == "cleanup" or "system-wide" in e
                                              or " --kernel " in e or " --breakdown " in e)
                 else [])
    for m in _modules() for e in m.EXAMPLES]


@pytest.mark.parametrize("command,example", EXAMPLES)
def test_every_help_example_runs(command: str, example: str, tmp_path: Path) -> None:
    """The worked examples at the end of each --help are real commands that work.

    Every command of an example counts (`-e -o pipefail`, and a background
    job's own status), and a file it writes is made by this run: its /tmp is
    this test's own directory (another user's /tmp/ls.json is not ours to
    replace)."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    script = example.split("  #")[0].rstrip().replace("/tmp/", f"{tmp_path}/")
    if " & " in script:
        assert script.endswith("; wait"), "an example with a background job waits for it"
        script += " $!"  # a bare `wait` is 0 whatever the job's status
    made = [Path(m) for m in re.findall(r"(?:-o |--dump )(\S+)", script)
            if m.startswith(f"{tmp_path}/")]
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for path in made:
        assert path.stat().st_size > 0, f"{path} was not written"
    assert proc.stdout.strip(), "an example should show something"
    assert "Traceback" not in proc.stderr


def test_help_ends_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for mod in _modules():
        assert main([mod.NAME, "--help"]) == 0
        assert capsys.readouterr().out.rstrip().endswith(mod.EXAMPLES[-1])


def test_command_table_matches_the_modules() -> None:
    """The top-level parser lists commands from COMMANDS without importing them."""
    assert [(c.name, c.help) for c in COMMANDS] == [(m.NAME, m.HELP) for m in _modules()]
    package = Path(uprobes.commands.__file__).parent
    with_name = {p.stem for p in package.glob("*.py") if "\nNAME = " in p.read_text()}
    assert with_name == {c.module for c in COMMANDS}, "a command module missing from COMMANDS"


@pytest.mark.parametrize("argv,absent", [
    (["--help"], "uprobes.commands."),
    (["list", "libc", "getppid"], "uprobes.commands.count"),
    (["resolve", "libc:getppid"], "uprobes.engines.ptrace"),
    (["resolve", "libc:getppid"], "elftools"),
])
def test_a_run_imports_only_its_command(argv: list[str], absent: str) -> None:
    """Start-up time: a run imports its own command module and what that needs, no other."""
    code = ("import sys; from uprobes.commands import main; main(sys.argv[1:]); "
            "sys.stderr.write('\\nMODULES ' + ' '.join(sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120)
    loaded = proc.stderr.rpartition("\nMODULES ")[2].split()
    assert "uprobes.commands" in loaded
    assert not [m for m in loaded if m.startswith(absent)], proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["list", "/nonexistent"], "uprobes: error: /nonexistent: no such file"),
    (["list", "/etc/passwd"], "uprobes: error: /etc/passwd: is not an ELF file"),
    (["list", "/tmp"], "is a directory"),
    (["resolve", "libc:no_such_function_xyz"], "symbol 'no_such_function_xyz' not found"),
    (["resolve", "libc:malloc x=%zz"], "Invalid register name"),
    (["resolve", "libc:malloc x=%di:u7"], "Unknown type is specified"),
    (["resolve", "libc:malloc x=$retval"], "$retval is not available on probe"),
    (["resolve", "libc:malloc " + " ".join(f"a{i}=%di" for i in range(129))], "Too many arguments"),
    (["resolve", "libc:malloc+1"], "inside an instruction"),
    (["resolve", "libc:0x10"], "not in an executable segment"),
    (["list", "-p", "999999999"], "999999999"),
    (["list"], "give a TARGET"),
    (["trace", "-e", "kernel", ":vdso:clock_gettime", "--", "/bin/true"],
     "uprobes/clock_gettime: the kernel's uprobes cannot probe the vDSO (it has no file, so no "
     "inode to name); -e ptrace can"),
    (["count", "-e", "kernel", ":vdso:time", "--", "/bin/true"], "-e ptrace can"),
    (["vdso", "-p", "999999999"], "no process with pid 999999999"),
    (["vdso", "--dump", "/nonexistent/vdso.so"], "cannot write /nonexistent/vdso.so"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_is_one_clear_line_exit_2(argv: list[str], message: str) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("uprobes: error: ")
    assert message in proc.stderr


def test_spec_error_has_caret_under_the_fault() -> None:
    proc = run_cli("resolve", "libc:malloc size=%di:u99")
    lines = proc.stderr.splitlines()
    assert lines[0] == "uprobes: error: Unknown type is specified"
    assert lines[1] == "  libc:malloc size=%di:u99"
    assert lines[2].index("^") == lines[1].index("u99")


def test_list_json_matches_readelf(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    out = io.StringIO()
    assert main(["list", str(exe), "--json"], out=out) == 0
    doc = json.loads(out.getvalue())
    names = {f["name"]: f for f in doc["functions"]}
    readelf = subprocess.run(["readelf", "-Ws", "--wide", str(exe)], capture_output=True,
                             text=True, check=True).stdout
    for line in readelf.splitlines():
        f = line.split()
        if len(f) >= 8 and f[3] == "FUNC" and f[6] != "UND":
            assert names[f[7]]["link_addr"] == int(f[1], 16)
            assert names[f[7]]["size"] == int(f[2], 0)


def test_list_process(running_process: subprocess.Popen[str]) -> None:
    pid = str(running_process.pid)
    out = io.StringIO()
    assert main(["list", "-p", pid, "--json"], out=out) == 0
    paths = {o["path"] for o in json.loads(out.getvalue())["objects"]}
    assert "/usr/bin/python3.11" in paths and any("libc.so" in p for p in paths)
    out = io.StringIO()
    assert main(["list", "-p", pid, "libc", "malloc", "--json"], out=out) == 0
    assert [f["name"] for f in json.loads(out.getvalue())["functions"]] == ["malloc"]


def test_list_usdt_of_python() -> None:
    out = io.StringIO()
    assert main(["list", "/usr/bin/python3.11", "python:function__*", "--json"], out=out) == 0
    usdt = json.loads(out.getvalue())["usdt"]
    assert [u["name"] for u in usdt] == ["function__entry", "function__return"]
    assert all(u["semaphore"] and len(u["args"]) == 3 for u in usdt)
