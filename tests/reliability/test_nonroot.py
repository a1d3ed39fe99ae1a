"""uprobes run by an ordinary user: the ptrace engine traces the user's own
processes (commands and -p), and what needs root (tracefs: the kernel
engine, `cleanup`) says so in one line; `-e auto` falls back to ptrace.

Each run is a real unprivileged process: `setpriv` drops to the `nobody`
user (no capabilities, no supplementary groups), on a copy of the fixture
in a directory that user can read.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Compiler, need, read_fd_until

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.sys import procfs
from uprobes.sys.procmem import ProcessMemory

pytestmark = pytest.mark.root  # each test drops from root to another user

USER = "nobody"
PACKAGES = ("uprobes", "elftools", "iced_x86", "rich", "markdown_it", "mdurl", "pygments",
            "pyderust")
"""uprobes and what it imports (pyproject's dependencies and theirs)."""
LOOPS = 7


def _ptrace_scope() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return None


def _reachable_by_others(path: Path) -> bool:
    """Every directory up to `path` lets others in (o+x), and the file others read."""
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if d.is_dir() and not mode & 0o001:
            return False
    return bool(path.stat().st_mode & 0o004) or path.is_dir()


@dataclass(frozen=True)
class User:
    """An unprivileged user, a directory they can read holding copies of
    the fixtures, and the interpreter and PYTHONPATH that let them run this
    checkout's uprobes with our dependencies."""

    pw: pwd.struct_passwd
    home: Path
    python: str
    pythonpath: str

    def argv(self, *argv: str) -> list[str]:
        return ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}",
                "--clear-groups", "env", f"PYTHONPATH={self.pythonpath}", f"HOME={self.home}",
                *argv]

    def uprobes_argv(self, *args: str) -> list[str]:
        return self.argv(self.python, "-m", "uprobes", *args)

    def uprobes(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.uprobes_argv(*args), capture_output=True, text=True,
                              timeout=120, cwd=self.home)


@pytest.fixture(scope="module")
def user(compile_c: Compiler) -> Iterator[User]:
    need(os.geteuid() == 0, "dropping to another user needs root")
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
        pw = pwd.getpwnam(USER)
    # The venv's interpreter often lives in root's home (pyenv): the system's
    # of the same version stands in for it.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    interpreters = [Path(sys.executable).resolve(), Path(f"/usr/bin/python{version}")]
    usable = [i for i in interpreters if i.exists() and _reachable_by_others(i)]
    need(bool(usable), f"no python{version} that {USER} may run: {interpreters}")
    home = Path(tempfile.mkdtemp(prefix="uprobes-nonroot-"))
    home.chmod(0o755)
    for source, name in [("target.c", "target"), ("libc_calls.c", "libc_calls")]:
        shutil.copy(compile_c(source), home / name)
        (home / name).chmod(0o755)
    # This checkout and our dependencies, copied where the user may read
    # them, wherever the checkout and the venv are.
    pylib = home / "pylib"
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None, package
        shutil.copytree(Path(spec.origin).parent, pylib / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(pylib)], check=True)
    yield User(pw, home, str(usable[0]), str(pylib))
    shutil.rmtree(home)


def _count_of(stdout: str, event: str) -> int:
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == event:
            return int(parts[1])
    raise AssertionError(f"no count for {event} in:\n{stdout}")


def _one_error_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uprobes: error: "), done.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("engine", ["ptrace", "auto"])
@pytest.mark.parametrize("trapfree", [True, False])
def test_ptrace_counts_the_users_own_command(user: User, engine: str, trapfree: bool) -> None:
    need(_ptrace_scope() in (None, 0, 1), "kernel.yama.ptrace_scope forbids ptrace to users")
    exe = user.home / "target"
    done = user.uprobes("count", "-e", engine,
                    *([] if trapfree else ["--no-trapfree"]),
                    f"{exe}:add", f"{exe}:greet", "--", str(exe), str(LOOPS))
    assert done.returncode == 0, done.stderr
    assert f"calls add={LOOPS} greet={LOOPS}" in done.stdout  # the program ran as untraced
    assert _count_of(done.stdout, "uprobes/add") == LOOPS, done.stdout + done.stderr
    assert _count_of(done.stdout, "uprobes/greet") == LOOPS, done.stdout + done.stderr


def test_trace_prints_the_users_own_calls(user: User) -> None:
    need(_ptrace_scope() in (None, 0, 1), "kernel.yama.ptrace_scope forbids ptrace to users")
    exe = user.home / "target"
    done = user.uprobes("trace", "-e", "ptrace", f"{exe}:add a=%di:s64",
                    "--", str(exe), str(LOOPS))
    assert done.returncode == 0, done.stderr
    values = [line.rsplit("a=", 1)[1] for line in done.stdout.splitlines() if " add: " in line]
    assert values == [str(i) for i in range(LOOPS)], done.stdout + done.stderr


def _runtime_addr(pid: int, exe: Path, symbol: str) -> int:
    image = ElfImage.open(str(exe))
    file_offset = image.link_to_file_offset(SymbolTable.load(image).lookup(symbol)[0].link_addr)
    st = exe.stat()
    for m in procfs.maps(pid):
        if (m.inode, os.makedev(m.dev_major, m.dev_minor)) == (st.st_ino, st.st_dev) \
                and m.executable and m.contains_file_offset(file_offset):
            return m.file_to_runtime_addr(file_offset)
    raise AssertionError(f"{symbol} is not mapped in {pid}")


def test_ptrace_counts_the_users_own_pid(user: User) -> None:
    need(_ptrace_scope() in (None, 0), "kernel.yama.ptrace_scope lets users trace only "
         "their descendants (set it to 0 to test -p as a user)")
    exe = user.home / "target"
    target = subprocess.Popen(user.argv(str(exe), str(LOOPS)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=user.home,
                              env={**os.environ, "TARGET_WAIT": "1"})
    assert target.stdin is not None and target.stdout is not None
    try:
        pid = int(target.stdout.readline().split()[1])
        addr = _runtime_addr(pid, exe, "add")
        with ProcessMemory(pid) as mem:
            original = mem.read(addr, 1)
            run = subprocess.Popen(
                user.uprobes_argv("count", "-e", "ptrace", "-p", str(pid), f"{exe}:add"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=user.home)
            # Placed once the first byte of add() is ours (an int3 or a jump).
            deadline = time.monotonic() + 60
            while mem.read(addr, 1) == original and run.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            placed = mem.read(addr, 1) != original
        target.stdin.write("go\n")
        target.stdin.flush()
        out = target.stdout.read()
        assert target.wait(timeout=60) == 0
        stdout, stderr = run.communicate(timeout=60)
    finally:
        target.kill()
        target.wait()
    assert placed, f"nothing was written into process {pid}: {stderr}"
    assert f"calls add={LOOPS}" in out
    assert run.returncode == 0, stderr
    assert _count_of(stdout, "uprobes/add") == LOOPS, stdout + stderr


def test_another_users_process_is_refused_in_one_line(user: User) -> None:
    need(_ptrace_scope() in (None, 0), "kernel.yama.ptrace_scope lets users trace only "
         "their descendants")
    done = user.uprobes("count", "-e", "ptrace", "-p", "1", "libc:getpid", "--duration", "1")
    assert done.returncode in (1, 2)
    _one_error_line(done, "permission denied")


@pytest.mark.parametrize("command", [
    ["count", "-e", "kernel", "{exe}:add", "--", "{exe}"],
    ["trace", "-e", "kernel", "{exe}:add", "--", "{exe}"],
    ["cleanup"],
])
def test_what_needs_tracefs_says_root_in_one_line(user: User, command: list[str]) -> None:
    need(os.stat("/sys/kernel/tracing").st_mode & 0o005 == 0,
         "tracefs is open to other users on this machine")
    exe = str(user.home / "target")
    done = user.uprobes(*(a.format(exe=exe) for a in command))
    assert done.returncode == 1, done.stderr
    _one_error_line(done, "root")
    assert "calls add" not in done.stdout  # refused before the command ran


def test_kernel_events_say_root_without_offering_ptrace(user: User) -> None:
    need(os.stat("/sys/kernel/tracing").st_mode & 0o005 == 0,
         "tracefs is open to other users on this machine")
    exe = str(user.home / "target")
    done = user.uprobes("trace", "-e", "ptrace", "--kernel", "sched", f"{exe}:add", "--", exe)
    assert done.returncode == 1, done.stderr
    _one_error_line(done, "(--kernel) need tracefs and perf tracepoint events, which are for "
                          "root only here")
    assert "-e ptrace" not in done.stderr and "calls add" not in done.stdout


def test_doctor_reports_tracefs_for_root_only(user: User) -> None:
    done = user.uprobes("doctor")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = dict(line.split(None, 1) for line in done.stdout.splitlines() if " " in line)
    assert rows["root"].strip() == "no"
    assert "root only" in rows["tracefs"]


def test_a_mapping_it_cannot_identify_is_said(user: User) -> None:
    """A process of the user's in a mount namespace, its libc a copy that
    was bind-mounted there and then detached: maps names it `/`, only
    /proc/PID/map_files (CAP_SYS_ADMIN) leads to it. The run says what it
    cannot place instead of counting 0 in silence."""
    need(_ptrace_scope() in (None, 0), "kernel.yama.ptrace_scope lets users trace only "
         "their descendants")
    need(shutil.which("unshare") is not None and shutil.which("nsenter") is not None,
         "unshare and nsenter (util-linux) are not installed")
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    copy = user.home / "libc-copy.so.6"
    shutil.copy(os.path.realpath(libc), copy)
    copy.chmod(0o644)
    script = f'mount --bind "$1" {libc} && shift && exec "$@"'
    target = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(copy),
         *user.argv(str(user.home / "libc_calls"), "100")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert target.stdin is not None and target.stdout is not None
    try:
        pid = int(target.stdout.readline().split()[1])
        subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "umount", "--lazy", libc],
                       check=True, timeout=60)
        run = subprocess.Popen(user.uprobes_argv("count", "-e", "ptrace", "-p", str(pid),
                                                 "libc:getppid"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=user.home)
        assert run.stderr is not None
        said = read_fd_until(run.stderr.fileno(), "Ctrl-C to stop")
        target.stdin.write("go\n")
        target.stdin.close()
        assert target.stdout.read() == "calls getppid=100\n"
        assert target.wait(timeout=60) == 0
        _, stderr = run.communicate(timeout=60)
    finally:
        target.kill()
        target.wait()
    assert run.returncode == 0, said + stderr
    assert f"process {pid}: cannot tell which file 1 of its mappings hold (/)" in said, said
