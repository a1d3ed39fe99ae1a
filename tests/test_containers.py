"""Probes into a process with a root or mounts of its own: a chroot whose
libc path is an absolute symlink, a mount namespace (`unshare --mount`)
where another libc is bind-mounted over the host's path, and the same after
that mount is gone (the process still maps the copy; its name now leads to
the host's libc). Both engines must probe the libc the process maps, and
count exactly the calls it makes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Compiler, need, read_fd_until

from uprobes.elf.image import ElfImage
from uprobes.sys import procfs

UPROBES = [sys.executable, "-m", "uprobes"]
CALLS = 1000
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LIBC_LINK = "/lib/x86_64-linux-gnu/libc.so.6"


@pytest.fixture(scope="module")
def prog(compile_c: Compiler) -> Path:
    return compile_c("libc_calls.c")


def _host_libc() -> Path:
    return Path(os.path.realpath(LIBC_LINK))


@pytest.fixture(scope="module")
def chroot(prog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding the program, its dynamic linker, a copy of libc at
    LIBC, and LIBC_LINK an absolute symlink to it: from the host's root that
    link leads to the host's libc, never to this copy."""
    need(os.geteuid() == 0, "chroot needs root")
    root = tmp_path_factory.mktemp("chroot")
    interp = ElfImage.open(str(prog)).interp
    assert interp is not None
    for inner, source in [("/bin/prog", prog), (interp, Path(os.path.realpath(interp))),
                          (LIBC, _host_libc())]:
        dst = root / inner.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, dst)
    link = root / LIBC_LINK.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(LIBC)
    return root


class Target:
    """The program, started by `argv` (chroot, unshare), waiting for a line
    on stdin before its calls."""

    def __init__(self, kind: str, argv: list[str]) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), (line, self.proc.stderr and self.proc.stderr.read())
        self.pid = int(line.split()[1])
        self.libc = (0, 0)

    def maps_file(self, path: Path) -> tuple[int, int]:
        """(dev, inode) of `path`, which the process must map."""
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino)
        assert any((os.makedev(m.dev_major, m.dev_minor), m.inode) == ident
                   for m in procfs.maps(self.pid)), f"process {self.pid} does not map {path}"
        return ident

    def run_calls(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        assert self.proc.wait(timeout=60) == 0
        return out

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _in_chroot(root: Path) -> list[str]:
    return ["chroot", str(root), "/bin/prog", str(CALLS)]


def _in_namespace(prog: Path, libc_copy: Path) -> list[str]:
    need(shutil.which("unshare") is not None and shutil.which("nsenter") is not None,
         "unshare and nsenter (util-linux) are not installed")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "$1" {LIBC} && exec "$2" {CALLS}', "sh", str(libc_copy), str(prog)]


@pytest.fixture
def target(request: pytest.FixtureRequest, chroot: Path, prog: Path,
           tmp_path: Path) -> Iterator[Target]:
    """The program in a container (`request.param`), mapping a libc that is
    not the host's: `libc` is its (dev, inode)."""
    if request.param == "chroot":
        t = Target(request.param, _in_chroot(chroot))
        copy = chroot / LIBC.lstrip("/")
    else:
        copy = tmp_path / "libc-copy.so.6"
        shutil.copy(_host_libc(), copy)
        t = Target(request.param, _in_namespace(prog, copy))
        if request.param == "unmounted":
            # Busy (mapped), so detached: the process keeps its copy, and
            # its name in the process's root leads to the host's libc again.
            subprocess.run(["nsenter", f"--mount=/proc/{t.pid}/ns/mnt", "umount", "--lazy",
                            LIBC], check=True, timeout=60)
    try:
        t.libc = t.maps_file(copy)
        yield t
    finally:
        t.end()


CONTAINERS = pytest.mark.parametrize("target", ["chroot", "namespace", "unmounted"],
                                     indirect=True)
SPECS = pytest.mark.parametrize("spec", ["libc:getppid", f"{LIBC_LINK}:getppid"])


def _refused(target: Target, spec: str) -> bool:
    """The path in the spec leads to another libc than the one mapped: with
    the mount gone, the process's own name for it is the host's libc."""
    return target.kind == "unmounted" and spec.startswith("/")


@pytest.mark.root  # chroot and mount namespaces
@CONTAINERS
@SPECS
def test_resolve_names_the_libc_the_process_maps(target: Target, spec: str) -> None:
    done = subprocess.run([*UPROBES, "resolve", "-p", str(target.pid), spec],
                          capture_output=True, text=True, timeout=60)
    if _refused(target, spec):
        assert done.returncode == 2
        assert done.stderr.startswith("uprobes: error: ") and len(done.stderr.splitlines()) == 1
        assert "is not the libc.so.6 it maps" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    path = done.stdout.split()[1].rsplit(":", 1)[0]
    st = os.stat(path)
    assert (st.st_dev, st.st_ino) == target.libc, done.stdout


@CONTAINERS
@SPECS
@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_both_engines_count_every_call(target: Target, spec: str, engine: str,
                                       tracefs: Path) -> None:
    if _refused(target, spec):
        spec = "libc.so.6:getppid"  # as the refusal says
    run = subprocess.Popen([*UPROBES, "count", "-e", engine, "-p", str(target.pid), spec],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None
    said = read_fd_until(run.stderr.fileno(), "Ctrl-C to stop")  # counting from then on
    assert "Ctrl-C to stop" in said, said
    assert target.run_calls() == f"calls getppid={CALLS}\n"
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, said + stderr
    counts = dict(line.split() for line in stdout.splitlines()[1:] if len(line.split()) == 2)
    assert counts.get("uprobes/getppid") == str(CALLS), stdout + said + stderr



# ------------------------------------------------------------ PID namespaces

NS_CALLS = 300  # per thread, 4 threads (threads.c)


@pytest.fixture(scope="module")
def threads_exe(compile_c: Compiler) -> Path:
    return compile_c("threads.c", "-pthread")


def _in_pid_namespace(exe: Path, *args: str) -> list[str]:
    """`exe ARGS` (default: NS_CALLS) in a PID namespace of its own."""
    need(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
    return ["unshare", "--pid", "--fork", str(exe), *(args or [str(NS_CALLS)])]


def _uprobes(*argv: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([*UPROBES, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "overwrote the memory" not in run.stderr, run.stderr
    return run


def _hits_by_task(engine: str, exe: Path, out: Path) -> dict[tuple[int, int], int]:
    """(pid, tid) -> hits of work() in `exe` run in a PID namespace of its own."""
    _uprobes("trace", "-e", engine, "--json", "-o", str(out), f"{exe}:work", "--",
             *_in_pid_namespace(exe))
    hits: dict[tuple[int, int], int] = {}
    for line in out.read_text().splitlines():
        hit = json.loads(line) if line.startswith("{") else {}
        if "tid" in hit:
            key = (hit["pid"], hit["tid"])
            hits[key] = hits.get(key, 0) + 1
    return hits


@pytest.mark.root  # PID namespaces
def test_a_pid_namespace_s_hits_are_its_threads_by_the_hosts_numbers(
        threads_exe: Path, tracefs: Path, tmp_path: Path) -> None:
    """threads.c in `unshare --pid --fork`: its 4 threads call themselves 2
    to 5 there, and the trap-free code records those tids. Each hit is its
    thread's, by the host's tid and pid, as the kernel engine (the oracle)
    shows them (before: every record was taken for the program's writing
    and left out)."""
    for engine in ("kernel", "ptrace"):
        hits = _hits_by_task(engine, threads_exe, tmp_path / f"{engine}.json")
        assert sorted(hits.values()) == [NS_CALLS] * 4, (engine, hits)
        pids = {pid for pid, _ in hits}
        assert len(pids) == 1 and pids.isdisjoint(range(1, 6)), (engine, hits)
        assert {tid for _, tid in hits}.isdisjoint(range(1, 6)), (engine, hits)


@pytest.mark.root  # PID namespaces
def test_a_pid_namespace_s_stacks_and_counts_by_task(threads_exe: Path, tracefs: Path) -> None:
    """The same program: `stacks` gives the kernel engine's stacks, each
    hit's, and
    `count --by` counts each thread by its host tid, all of one host pid."""
    folded = {}
    for engine in ("kernel", "ptrace"):
        run = _uprobes("stacks", "--folded", "-e", engine, f"{threads_exe}:work", "--",
                       *_in_pid_namespace(threads_exe))
        folded[engine] = {line.rpartition(" ")[0]: int(line.rpartition(" ")[2])
                          for line in run.stdout.splitlines() if ";" in line}
    # (The kernel's perf ring may lose stacks of a busy machine: it says how many.)
    assert folded["ptrace"].keys() == folded["kernel"].keys(), folded
    assert sum(folded["ptrace"].values()) == 4 * NS_CALLS, folded
    for by, keys in (("tid", 4), ("pid", 1)):
        run = _uprobes("count", "-e", "ptrace", "--json", "--by", by, f"{threads_exe}:work",
                       "--", *_in_pid_namespace(threads_exe))
        rows = json.loads(run.stdout.splitlines()[-1])["uprobes/work"]["keys"]
        assert len(rows) == keys, (by, rows)
        assert all(row["key"] > 5 for row in rows), (by, rows)
        assert sum(row["count"] for row in rows) == 4 * NS_CALLS, (by, rows)


@pytest.mark.root  # PID namespaces
def test_a_pid_namespace_s_hits_read_the_tid_without_a_system_call(
        compile_c: Compiler, tracefs: Path, tmp_path: Path) -> None:
    """recording.c in `unshare --pid --fork`: glibc keeps the namespace's
    tid at the thread pointer, and the tracer compares it with that tid, so
    a recorded hit reads it there, with no gettid (before: it compared the
    host's tid, never found it, and every hit made a system call). The
    kernel's syscall events of the traced program are the oracle."""
    exe = compile_c("recording.c", "-pthread")
    out = tmp_path / "t.jsonl"
    _uprobes("trace", "-e", "ptrace", "--json", "--kernel", "syscalls", "-o", str(out),
             f"{exe}:work a=%di", "--", *_in_pid_namespace(exe, "loop", "2000"))
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    calls = Counter(d["name"] for d in docs if str(d.get("kernel")).startswith("syscall"))
    assert sum(1 for d in docs if "probe" in d) == 2000
    assert calls["gettid"] == 0 and sum(calls.values()) < 1000, calls
