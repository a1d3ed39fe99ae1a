"""/proc/PID/mem on live processes: known data, faults, partial reads, private writes."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_sys_support import no_fd_leak  # noqa: F401

from uprobes.errors import ProcessError
from uprobes.sys import procfs
from uprobes.sys.procmem import MemoryFault, ProcessMemory


@dataclass
class MemoryTarget:
    proc: subprocess.Popen[str]
    exe: Path
    addrs: dict[str, int]

    def finish(self) -> str:
        out, _ = self.proc.communicate("go\n", timeout=120)
        assert self.proc.returncode == 0
        return out


@pytest.fixture
def memory_target(compile_c: object) -> Iterator[MemoryTarget]:
    exe: Path = compile_c("memory.c")  # type: ignore[operator]
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert proc.stdout.readline().strip() == "ready"
    addrs = {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", first)}
    yield MemoryTarget(proc, exe, addrs)
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_reads_known_global_and_string(memory_target: MemoryTarget) -> None:
    a = memory_target.addrs
    with ProcessMemory(memory_target.proc.pid) as mem:
        assert int.from_bytes(mem.read(a["value"], 8), "little") == 0x1122334455667788
        assert mem.read(a["text"], 14) == b"hello, memory\0"
        assert mem.read_cstring(a["text"], 4096) == b"hello, memory"
        # The limit counts the NUL, as strnlen_user's does: 14 bytes hold it, 13 do not.
        assert mem.read_cstring(a["text"], 14) == b"hello, memory"
        assert mem.read_cstring(a["text"], 13) is None
        assert mem.read_cstring(a["text"] + 13, 1) == b""


def test_fault_on_unmapped_and_partial_reads(memory_target: MemoryTarget) -> None:
    a = memory_target.addrs
    with ProcessMemory(memory_target.proc.pid) as mem:
        with pytest.raises(MemoryFault) as info:
            mem.read(a["hole"], 1)
        assert info.value.runtime_addr == a["hole"]
        assert mem.read_upto(a["hole"], 16) == b""
        # Up to the hole and no further: the kernel copies page by page.
        assert mem.read_upto(a["edge"], 64) == b"abcde"
        with pytest.raises(MemoryFault) as info:
            mem.read(a["edge"], 6)
        assert info.value.runtime_addr == a["hole"]
        # No NUL before the hole: a string fetch there faults.
        assert mem.read_cstring(a["edge"], 4096) is None
        for nowhere in (0, 0x1000, 1 << 63, (1 << 64) - 8, -1):
            assert mem.read_upto(nowhere, 8) == b""
            with pytest.raises(MemoryFault):
                mem.read(nowhere, 8)
        with pytest.raises(MemoryFault):
            mem.write(a["hole"], b"x")


def test_write_to_text_is_private(memory_target: MemoryTarget) -> None:
    """int3 placement: read-only text takes the write, the file on disk does not."""
    exe, a = memory_target.exe, memory_target.addrs
    before = hashlib.sha256(exe.read_bytes()).hexdigest()
    text = procfs.mapping_for_runtime_addr(memory_target.proc.pid, a["code"])
    assert text is not None and "w" not in text.perms and text.path == str(exe)
    with ProcessMemory(memory_target.proc.pid) as mem:
        original = mem.read(a["code"], 1)
        mem.write(a["code"], b"\xcc")
        assert mem.read(a["code"], 1) == b"\xcc"
        mem.write(a["value"], (0xDEADBEEF).to_bytes(8, "little"))
        # A second process mapping the same file sees the original byte.
        with open(exe, "rb") as f:
            f.seek(text.runtime_to_file_offset(a["code"]))
            assert f.read(1) == original != b"\xcc"
        assert hashlib.sha256(exe.read_bytes()).hexdigest() == before
        mem.write(a["code"], original)
    assert memory_target.finish().split() == ["value=deadbeef", f"code={original.hex()}"]


def test_running_python_elf_header(running_process: subprocess.Popen[str]) -> None:
    pid = running_process.pid
    first = min((m for m in procfs.maps(pid) if m.path == procfs.exe(pid)),
                key=lambda m: m.start)
    assert first.file_offset == 0
    with open(procfs.exe(pid), "rb") as f:
        header = f.read(64)
    with ProcessMemory(pid) as mem:
        assert mem.read(first.start, 64) == header
    for pipe in (running_process.stdin, running_process.stdout):
        assert pipe is not None
        pipe.close()  # the fixture leaves them to the garbage collector


def test_bad_pid_and_closed() -> None:
    with pytest.raises(ProcessError, match="no process"):
        ProcessMemory(2**22 + 12345)
    mem = ProcessMemory(os.getpid())
    mem.close()
    mem.close()
    with pytest.raises(ProcessError, match="closed"):
        mem.read(0x1000, 1)
