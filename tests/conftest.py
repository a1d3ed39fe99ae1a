"""Shared test plumbing: real fixtures compiled with gcc, real kernel checks.

Under UPROBES_REQUIRE_KERNEL=1 (set by .ci/run) every skip is a failure: one
that `need()` raises for want of root, tracefs or ptrace, a direct
`pytest.skip`, a skip mark, a skip at collection. CI never passes by skipping.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from uprobes.sys.tracefs import Tracefs

FIXTURES = Path(__file__).parent / "fixtures"
REQUIRE_KERNEL = os.environ.get("UPROBES_REQUIRE_KERNEL") == "1"
TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _cpythons() -> list[str]:
    """Debian's python3.11, this venv's own (pyenv's shared-library build
    here) and Debian's debug build, each once, those that are installed."""
    found: dict[str, str] = {}
    for path in ("/usr/bin/python3.11", os.path.realpath(sys.executable),
                 "/usr/bin/python3.11d"):
        if os.path.exists(path):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


CPYTHONS = _cpythons()
"""The CPython 3.11 interpreters the Python tests run on."""


def _later_cpythons() -> list[str]:
    """pyenv's builds of the later versions uprobes reads (3.12, 3.13), the
    newest of each that is installed: a machine without pyenv, or without
    them, runs their tests on none (not collected, so not skipped)."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = []
    for minor in ("3.12", "3.13"):
        builds = sorted(root.glob(f"{minor}.*/bin/python{minor}"),
                        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)])
        if builds:
            found.append(str(builds[-1]))
    return found


LATER_CPYTHONS = _later_cpythons()
"""CPython 3.12 and 3.13 where installed (pyenv's here, shared libpython with DWARF)."""


def over_installed(argname: str, values: list[str]
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any] | None]:
    """Parametrize a test by `argname` over `values`, things installed here
    (pyenv's later CPythons, ...); where there are none (no pyenv, or another
    user, whose home has none) the test is not defined at all: a parametrize
    over nothing fails collection (the suite's rule), and this is a test of
    what is installed."""
    def decorate(test: Callable[..., Any]) -> Callable[..., Any] | None:
        if not values:
            return None
        return pytest.mark.parametrize(argname, values,
                                       ids=[Path(v).name for v in values])(test)
    return decorate


over_later_cpythons = over_installed("python", LATER_CPYTHONS)


def need(condition: bool, why: str) -> None:
    """Skip unless `condition`; under UPROBES_REQUIRE_KERNEL=1, fail instead."""
    if condition:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"UPROBES_REQUIRE_KERNEL=1 but {why}")
    pytest.skip(why)


ROOT_FIXTURES = frozenset({"tracefs", "pmu"})
"""Fixtures that need root (tracefs; test_sys_pmu.py's uprobe PMU): a test
that uses one, directly or through another fixture, is marked `root`
without saying so."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `root` every test that needs it by its fixtures or its `kernel`
    mark, so `-m "not root"` leaves exactly what runs as any user. A mark
    only selects: a root test that runs still calls `need()`, and still
    fails for want of root under UPROBES_REQUIRE_KERNEL=1."""
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if uses & ROOT_FIXTURES or item.get_closest_marker("kernel"):
            item.add_marker(pytest.mark.root)


def without_clocks(doc: Any) -> Any:
    """A `--json` summary line (or a Chrome JSON `uprobes` object) without
    its clock snapshots, which differ every run: what a test can compare."""
    if isinstance(doc, dict) and "summary" in doc:
        return {"summary": without_clocks(doc["summary"])}
    if isinstance(doc, dict):
        return {k: v for k, v in doc.items() if k != "clocks"}
    return doc


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` s
    (generous: other work may load the machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


@contextmanager
def killed_after(proc: subprocess.Popen[Any], seconds: float = 120) -> Iterator[None]:
    """Kill `proc` if it still runs after `seconds`: a blocking read of its
    pipes then ends (EOF) and the test fails instead of hanging."""
    timer = threading.Timer(seconds, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _skip_fails(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under UPROBES_REQUIRE_KERNEL=1, turn a skipped report into a failed one
    (an xfail, which pytest also reports as skipped, stays what it is)."""
    if not REQUIRE_KERNEL or not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    why = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    why = why.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"UPROBES_REQUIRE_KERNEL=1 but it skipped: {why}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    outcome = yield
    _skip_fails(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _skip_fails(outcome.get_result())


def read_fd_until(fd: int, text: str, timeout: float = 60) -> str:
    """What `fd` (a pipe from a run) says until it says `text`, ends, or
    `timeout` passes: a handshake on a line such as `Ctrl-C to stop`."""
    got = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in got:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        part = os.read(fd, 4096)
        if not part:
            break
        got += part
    return got.decode(errors="replace")


def _tracefs_root() -> Path | None:
    for cand in TRACEFS_CANDIDATES:
        if Path(cand, "uprobe_events").exists():
            return Path(cand)
    if os.geteuid() == 0 and Path("/sys/kernel/tracing").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
                       capture_output=True)
        if Path("/sys/kernel/tracing/uprobe_events").exists():
            return Path("/sys/kernel/tracing")
    return None


@pytest.fixture(scope="session")
def tracefs() -> Path:
    """The tracefs root, mounted if need be; needs root."""
    need(os.geteuid() == 0, "tracefs tests need root")
    root = _tracefs_root()
    need(root is not None, "tracefs with uprobe_events is not available")
    assert root is not None
    return root


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build")


def without_section_headers(src: Path, dst: Path, *, zero: bool = True, cut: bool = True) -> Path:
    """A copy of `src` with no section headers: zeroed in the header, cut off the end, or both."""
    data = bytearray(src.read_bytes())
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    end = max(off + filesz for off, filesz in (
        struct.unpack_from("<8xQ16xQ", data, phoff + 56 * i) for i in range(phnum)))
    if zero:
        struct.pack_into("<Q", data, 40, 0)  # e_shoff
        struct.pack_into("<HH", data, 60, 0, 0)  # e_shnum, e_shstrndx
    if cut:
        del data[end:]
    dst.write_bytes(bytes(data))
    dst.chmod(0o755)
    return dst


class Compiler:
    """Compiles a fixture from tests/fixtures once per flag set, with gcc."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, source: str, *flags: str, name: str | None = None) -> Path:
        src = FIXTURES / source
        tag = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]
        exe = self.out / (name or f"{src.stem}-{tag}")
        if not exe.exists():
            cc = "g++" if src.suffix == ".cc" else "gcc"
            cmd = [cc, "-O1", "-g", "-fno-omit-frame-pointer", *flags, "-o", str(exe), str(src)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        return exe


@pytest.fixture(scope="session")
def compile_c(build_dir: Path) -> Compiler:
    assert shutil.which("gcc"), "gcc is required to build the test fixtures"
    return Compiler(build_dir)


class RustCompiler(Compiler):
    """Compiles a Rust fixture from tests/fixtures once per flag set, with rustc."""

    def __call__(self, source: str, *flags: str, name: str | None = None) -> Path:
        src = FIXTURES / source
        tag = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]
        exe = self.out / (name or f"{src.stem}-{tag}")
        if not exe.exists():
            cmd = ["rustc", "-O", "-g", "-C", "force-frame-pointers=yes", *flags,
                   "-o", str(exe), str(src)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        return exe


@pytest.fixture(scope="session")
def compile_rust(build_dir: Path) -> RustCompiler:
    assert shutil.which("rustc"), "rustc is required to build the Rust fixtures " \
        "(./bootstrap test installs it)"
    return RustCompiler(build_dir)


# Pids of the processes this session started (every subprocess.Popen, and
# whatever ran below us when a leak check looked): a run's group carries its
# pid, and a run of ours that has exited is still ours. Another test session
# on this machine leaves groups of dead runs too (its reaper or its own test
# removes them a moment later); those are not our leak.
_SESSION_PIDS: set[int] = set()
_popen_init = subprocess.Popen.__init__


def _recording_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    _popen_init(self, *args, **kwargs)
    _SESSION_PIDS.add(self.pid)


subprocess.Popen.__init__ = _recording_init  # type: ignore[method-assign]


def _our_uprobe_events(basetemp: Path) -> list[str]:
    if os.geteuid() != 0:
        return []  # tracefs is root's: a user cannot even stat its files
    root = None
    for cand in TRACEFS_CANDIDATES:
        if Path(cand, "uprobe_events").exists():
            root = Path(cand)
            break
    if root is None:
        return []
    _SESSION_PIDS.update(_descendants(os.getpid()))
    lines = Path(root, "uprobe_events").read_text(errors="surrogateescape").splitlines()
    return [ln for ln in lines if ln[2:].startswith("uprobes_") and _ours(ln, basetemp)]


def _ours(line: str, basetemp: Path) -> bool:
    """Groups carry the pid of the run that made them (`uprobes_<pid>`,
    `uprobes_test_<pid>`). Ours: this process's, or a dead run's that this
    session started or that probed a file of this session's. A live run
    removes its events itself when it ends; a dead run whose reaper still
    waits for the kernel to let go is being cleaned up, not leaked."""
    group = line[2:].split("/", 1)[0]
    # the pid may be followed by more (the kernel-parity tests pad names to the limit)
    m = re.match(r"uprobes_(?:test_)?(\d+)", group)
    if not m:
        return True
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    if Path(f"/proc/{pid}").exists() or reapers_of(pid):
        return False
    return pid in _SESSION_PIDS or f" {basetemp}/" in line or f"/root{basetemp}/" in line


def reapers_of(pid: int) -> list[int]:
    """Pids of the reaper processes watching run `pid`'s group."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"uprobes.engines.kernel.reaper" in cmd and f"uprobes_{pid}".encode() in cmd:
                found.append(int(proc.name))
    return found


# Generous: the slowest test (a million hits, tests/reliability/test_load.py)
# takes a few minutes on a loaded 2-core machine.
TEST_BOUND_S = float(os.environ.get("UPROBES_TEST_BOUND_S", "900"))


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, theirs, ...), as /proc shows them now."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def run_in_session(argv: list[str], timeout: float, *, cwd: Path | None = None,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` in a session of its own, its output captured. On timeout the
    whole session is killed (the command and every process it started, which
    a plain subprocess.run would leave running on the machine), then the test
    fails saying so."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv[:4])} ... still running after {timeout:g} s: {err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(autouse=True)
def bounded_test() -> Iterator[None]:
    """No test waits forever: after TEST_BOUND_S seconds every process below
    this one is killed, so a pipe read or a wait without a bound of its own
    returns, and the test fails saying why instead of hanging the suite."""
    fired = threading.Event()

    def kill_below() -> None:
        fired.set()
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    timer = threading.Timer(TEST_BOUND_S, kill_below)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
    assert not fired.is_set(), f"the test ran over {TEST_BOUND_S:g} s: its processes were killed"


@pytest.fixture(autouse=True)
def no_leftover_probes(tmp_path_factory: pytest.TempPathFactory) -> object:
    """After every test: no uprobe_events of ours (groups `uprobes_*`) remain."""
    basetemp = tmp_path_factory.getbasetemp().resolve()
    before = set(_our_uprobe_events(basetemp))
    yield
    leaked = set(_our_uprobe_events(basetemp)) - before
    assert not leaked, f"test left uprobe events behind: {sorted(leaked)}"


@pytest.fixture
def running_process() -> object:
    """A live process with its libraries mapped (it said `ready`), killed afterwards."""
    proc = subprocess.Popen(
        ["/usr/bin/python3.11", "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def running_forever(compile_c: Compiler) -> Iterator[int]:
    """tests/fixtures/forever.c running (it said `ready`): its pid; killed afterwards."""
    proc = subprocess.Popen([str(compile_c("forever.c"))], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready ")
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def tfs(tracefs: Path) -> Tracefs:
    """Our tracefs layer on the test machine's tracefs."""
    from uprobes.sys.tracefs import Tracefs
    return Tracefs(tracefs)


@pytest.fixture
def group() -> str:
    """A tracefs group for raw-layer tests, named after this test run."""
    return f"uprobes_test_{os.getpid()}"


class FiltersTarget:
    """tests/fixtures/filters.c in TARGET_WAIT mode: `n` calls of step() per
    thread and round, one round per `go()` (`done()` waits for its end);
    closing its stdin ends it. `pid` and the three threads' `tids` are known
    once it said `ready`."""

    def __init__(self, exe: Path, n: int) -> None:
        self.proc = subprocess.Popen([str(exe), str(n)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "TARGET_WAIT": "1"})
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().split()
        assert ready[0] == "ready", ready
        self.pid, *self.tids = (int(x) for x in ready[1:])

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def done(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "done\n"


@pytest.fixture(scope="module")
def target(compile_c: Compiler) -> Path:
    """The basic fixture program, tests/fixtures/target.c."""
    return compile_c("target.c")
