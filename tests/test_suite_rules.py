"""The suite's own rules, run on small test files in a pytest of their own
with tests/conftest.py: under UPROBES_REQUIRE_KERNEL=1 (CI) every skip is a
failure, wherever it comes from; a parametrize over an empty list fails at
collection; and no test outlives its bound."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SKIPS = '''
import pytest

def test_direct():
    pytest.skip("direct")

@pytest.mark.skip(reason="mark")
def test_mark():
    pass

@pytest.mark.skipif(True, reason="skipif")
def test_skipif():
    pass

@pytest.fixture
def skipping_fixture():
    pytest.skip("in a fixture")

def test_fixture(skipping_fixture):
    pass

@pytest.mark.xfail(reason="a known failure stays one", strict=True)
def test_xfail():
    assert False

def test_passes():
    pass
'''

MODULE_SKIP = '''
import pytest
pytest.skip("the whole module", allow_module_level=True)
'''

EMPTY = '''
import pytest

@pytest.mark.parametrize("example", [])
def test_each(example):
    pass
'''

HANGS = '''
import subprocess

def test_blocked_on_a_pipe():
    reader = subprocess.Popen(["sh", "-c", "exec sleep 1000 | cat"], stdout=subprocess.PIPE)
    reader.communicate()
'''

LEAKS = '''
import os
import shutil
import subprocess
from pathlib import Path

EVENTS = Path("/sys/kernel/tracing/uprobe_events")
ELSEWHERE = os.environ["ELSEWHERE"]  # a file of no test session's own


def dead_pid_of_a_grandchild():
    """A process that ran below us, unseen, and ended: what a run of another
    test session on this machine looks like to this one."""
    out = subprocess.run(["sh", "-c", "true & echo $!; wait"], capture_output=True, text=True)
    return int(out.stdout)


def leave(group, path):
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"p:{group}/leaked {path}:0x10\\n".encode())
    finally:
        os.close(fd)


def test_a_run_we_started_left_its_event():
    run = subprocess.Popen(["true"])
    run.wait()
    leave(f"uprobes_{run.pid}", ELSEWHERE)


def test_a_run_below_us_left_an_event_on_our_file(tmp_path):
    mine = tmp_path / "true"
    shutil.copy(ELSEWHERE, mine)
    leave(f"uprobes_{dead_pid_of_a_grandchild()}", mine)


def test_another_sessions_dead_run_is_not_ours():
    leave(f"uprobes_{dead_pid_of_a_grandchild()}", ELSEWHERE)
'''


ROOT_MARKS = '''
import pytest

@pytest.mark.root
def test_marked():
    pass

def test_by_its_fixture(tracefs):
    pass

@pytest.mark.kernel
def test_kernel():
    pass

def test_plain():
    pass
'''

MISSPELT = '''
import pytest

@pytest.mark.roots
def test_misspelt():
    pass
'''


def inner_pytest(tmp_path: Path, files: dict[str, str], require: bool, *args: str,
                 **env: str) -> tuple[dict[str, int], str]:
    """Run pytest on `files` beside a copy of tests/conftest.py, with the
    project's pytest settings; the counts of its closing line, and its output."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    environ = {k: v for k, v in os.environ.items() if k != "UPROBES_REQUIRE_KERNEL"}
    if require:
        environ["UPROBES_REQUIRE_KERNEL"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                           *args, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**environ, **env})
    closing = proc.stdout.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", closing)}
    return counts, proc.stdout + proc.stderr


def test_every_skip_fails_in_ci(tmp_path: Path) -> None:
    counts, out = inner_pytest(tmp_path, {"test_skips.py": SKIPS}, require=True)
    # a skip in the body fails the test; one at set-up (marks, a fixture) is an error
    assert counts == {"failed": 1, "passed": 1, "xfailed": 1, "errors": 3}, out
    assert out.count("UPROBES_REQUIRE_KERNEL=1 but it skipped") >= 4, out


def test_a_module_skip_fails_in_ci(tmp_path: Path) -> None:
    counts, out = inner_pytest(tmp_path, {"test_module_skip.py": MODULE_SKIP}, require=True)
    assert counts == {"error": 1}, out
    assert "UPROBES_REQUIRE_KERNEL=1 but it skipped: the whole module" in out


def test_skips_are_skips_elsewhere(tmp_path: Path) -> None:
    files = {"test_skips.py": SKIPS, "test_module_skip.py": MODULE_SKIP}
    counts, out = inner_pytest(tmp_path, files, require=False)
    assert counts == {"passed": 1, "skipped": 5, "xfailed": 1}, out


def test_an_empty_parameter_list_fails_at_collection(tmp_path: Path) -> None:
    counts, out = inner_pytest(tmp_path, {"test_empty.py": EMPTY}, require=False)
    assert counts == {"error": 1}, out
    assert "Empty parameter set" in out


def test_a_test_blocked_without_a_bound_fails_at_the_suites_bound(tmp_path: Path) -> None:
    start = time.monotonic()
    counts, out = inner_pytest(tmp_path, {"test_hangs.py": HANGS}, require=False,
                               UPROBES_TEST_BOUND_S="2")
    assert counts == {"passed": 1, "error": 1}, out  # its processes killed, the read ends
    assert "the test ran over 2 s: its processes were killed" in out
    assert time.monotonic() - start < 120


@pytest.mark.root  # writes uprobe_events
def test_the_leak_check_fails_our_leaks_only(tmp_path: Path) -> None:
    """The autouse leak check fails a test whose run (or a file of its
    session) left an event, and never one for another session's dead run."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy("/bin/true", elsewhere / "true")
    inner = tmp_path / "inner"
    inner.mkdir()
    events = Path("/sys/kernel/tracing/uprobe_events")
    before = set(events.read_text().splitlines())
    try:
        counts, out = inner_pytest(inner, {"test_leaks.py": LEAKS}, require=False,
                                   ELSEWHERE=str(elsewhere / "true"))
    finally:
        for line in set(events.read_text().splitlines()) - before:
            if re.match(r"p:uprobes_\d+/leaked ", line):
                fd = os.open(events, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, f"-:{line[2:].split(' ', 1)[0]}\n".encode())
                finally:
                    os.close(fd)
    assert counts == {"passed": 3, "errors": 2}, out
    assert "ERROR test_leaks.py::test_a_run_we_started_left_its_event" in out, out
    assert "ERROR test_leaks.py::test_a_run_below_us_left_an_event_on_our_file" in out, out


def test_not_root_leaves_what_needs_no_root(tmp_path: Path) -> None:
    """A `root` mark, the tracefs fixture and a `kernel` mark each put a test
    out of the contributor's `-m "not root"`."""
    counts, out = inner_pytest(tmp_path, {"test_marks.py": ROOT_MARKS}, False, "-m", "not root")
    assert counts == {"passed": 1, "deselected": 3}, out


@pytest.mark.root
def test_root_marks_select_they_do_not_skip(tmp_path: Path) -> None:
    """As root in CI, the tests marked `root` run like the rest."""
    counts, out = inner_pytest(tmp_path, {"test_marks.py": ROOT_MARKS}, require=True)
    assert counts == {"passed": 4}, out


def test_a_misspelt_mark_is_an_error(tmp_path: Path) -> None:
    counts, out = inner_pytest(tmp_path, {"test_misspelt.py": MISSPELT}, require=False)
    assert counts == {"error": 1}, out
    assert "'roots' not found in `markers`" in out, out


def test_a_command_over_its_time_is_ended_with_all_it_started(tmp_path: Path) -> None:
    """run_in_session, which runs the benches: at its timeout it kills the
    command's whole session, not only the command (subprocess.run's timeout
    left a bench's agent and load processes running on the machine)."""
    from conftest import run_in_session

    pidfile = tmp_path / "child"
    script = f"sleep 600 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}; wait"
    with pytest.raises(pytest.fail.Exception, match="still running after 1 s"):
        run_in_session(["sh", "-c", script], 1)
    child = int(pidfile.read_text())

    def running() -> bool:
        try:
            stat = Path(f"/proc/{child}/stat").read_text(errors="replace")
        except OSError:
            return False  # gone
        return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie was killed

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = running()
    if alive:
        os.kill(child, 9)
    assert not alive, f"the command's child {child} outlived the timeout"
