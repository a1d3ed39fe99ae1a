"""/proc parsing on a live fixture process, checked against the file and the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_sys_support import Waiting, file_offset, no_fd_leak  # noqa: F401

from uprobes.errors import ProcessError
from uprobes.sys import procfs


@pytest.fixture(scope="module")
def target(compile_c: object) -> Path:
    return compile_c("target.c")  # type: ignore[operator,no-any-return]


@pytest.fixture
def waiting(target: Path) -> object:
    child = Waiting(target)
    yield child
    child.kill()


def test_maps_and_offset_conversion(target: Path, waiting: Waiting) -> None:
    pid = waiting.pid
    ours = [m for m in procfs.maps(pid) if m.path == str(target)]
    text = [m for m in ours if m.perms == "r-xp"]
    assert len(text) == 1
    m = text[0]
    st = os.stat(target)
    assert m.inode == st.st_ino and (m.dev_major, m.dev_minor) == (
        os.major(st.st_dev), os.minor(st.st_dev))
    off = file_offset(target, "add")
    runtime_addr = m.file_to_runtime_addr(off)
    assert m.runtime_to_file_offset(runtime_addr) == off
    assert procfs.mapping_for_runtime_addr(pid, runtime_addr) == m
    # The bytes at the run-time address are the file's bytes at the offset.
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(runtime_addr)
        live = mem.read(16)
    assert live == target.read_bytes()[off:off + 16]
    with pytest.raises(ProcessError, match="not mapped"):
        m.file_to_runtime_addr(m.file_offset + (m.end - m.start))


def test_status_comm_tasks_root_auxv(target: Path, waiting: Waiting) -> None:
    pid = waiting.pid
    st = procfs.status(pid)
    assert (st.tgid, st.pid, st.ppid, st.uid) == (pid, pid, os.getpid(), os.getuid())
    assert st.name == procfs.comm(pid) == target.name[:15]
    assert procfs.tids(pid) == [pid]
    assert procfs.root(pid) == Path(f"/proc/{pid}/root")
    assert procfs.exe(pid) == str(target)
    vdso = [m for m in procfs.maps(pid) if m.path == "[vdso]"]
    assert vdso and procfs.vdso_base(pid) == vdso[0].start


def test_parse_maps_pure() -> None:
    text = ("55d0c0a00000-55d0c0a01000 r-xp 00001000 fd:01 1234   /opt/x y/prog (deleted)\n"
            "7ffd1000-7ffd2000 rw-p 00000000 00:00 0 \n")
    a, b = procfs.parse_maps(text)
    assert (a.start, a.end, a.file_offset, a.dev_major, a.dev_minor, a.inode) == (
        0x55d0c0a00000, 0x55d0c0a01000, 0x1000, 0xFD, 1, 1234)
    assert a.path == "/opt/x y/prog (deleted)" and a.deleted and a.executable
    assert a.file_to_runtime_addr(0x1010) == 0x55d0c0a00010
    assert b.path == "" and not b.executable


def test_missing_process() -> None:
    pid = 2 ** 22 + 12345  # above pid_max's default ceiling
    assert not procfs.exists(pid)
    for fn in (procfs.maps, procfs.status, procfs.comm, procfs.tids, procfs.auxv):
        with pytest.raises(ProcessError, match=f"no process with pid {pid}"):
            fn(pid)


@pytest.mark.root  # drops to nobody
def test_permission_denied_is_a_process_error() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to nobody and reports what procfs raised
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                procfs.maps(1)
                msg = "no error"
            except ProcessError as e:
                msg = str(e)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    assert msg.startswith("cannot read /proc/1/maps: permission denied"), msg
