"""Helpers shared by the tests of src/uprobes/sys (and checks of the helpers).

File offsets come from `readelf` here, never from uprobes.elf: the tests of
the kernel layers must not depend on the resolver they will serve.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_elf_support import readelf_func

THREADS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
__attribute__((noinline)) long add(long a, long b) { return a + b; }
static void *run(void *p) {
    long t = 0; for (int i = 0; i < 1000; i++) t += add(i, 1); return (void *)t;
}
int main(void) {
    printf("ready %d\n", getpid()); fflush(stdout);
    char buf[8]; if (!fgets(buf, sizeof buf, stdin)) return 1;
    pthread_t th[4]; int failed = 0;
    for (int i = 0; i < 4; i++) {
        int r = pthread_create(&th[i], NULL, run, NULL);
        if (r) { printf("pthread_create: %s\n", strerror(r)); failed++; th[i] = 0; }
    }
    for (int i = 0; i < 4; i++) if (th[i]) pthread_join(th[i], NULL);
    pid_t c = fork();
    if (c == 0) _exit(run(NULL) == (void *)0);
    if (c < 0) perror("fork");
    int st = 0; if (c > 0) waitpid(c, &st, 0);
    printf("threads=%d failed=%d forked=%d\n", 4 - failed, failed, c > 0);
    return failed;
}
"""


def file_offset(exe: Path, symbol: str) -> int:
    """File offset of `symbol` in `exe`: st_value mapped through its PT_LOAD."""
    return readelf_func(exe, symbol)[0]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Import into a test module to check every test closes what it opens."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"leaked fds: {sorted(leaked)}"


class Waiting:
    """A fixture process started with TARGET_WAIT, paused until `release()`."""

    def __init__(self, exe: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([str(exe), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "TARGET_WAIT": "1", **(env or {})})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), line
        self.pid = self.proc.pid

    def release(self) -> str:
        """Let it run to the end; its stdout after `ready`."""
        out, _ = self.proc.communicate("go\n", timeout=60)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def reported_calls(out: str) -> dict[str, int]:
    """The `calls add=N greet=N ...` line of target.c, as numbers."""
    m = re.search(r"calls (.*) total=", out)
    assert m, out
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


@pytest.fixture(scope="session")
def threads_exe(build_dir: Path) -> Path:
    src = build_dir / "sys_threads.c"
    exe = build_dir / "sys_threads"
    if not exe.exists():
        src.write_text(THREADS_C)
        subprocess.run(["gcc", "-O1", "-g", "-pthread", "-o", str(exe), str(src)],
                       check=True, capture_output=True, text=True)
    return exe


def test_file_offset_matches_objdump(compile_c: object) -> None:
    exe = compile_c("target.c")  # type: ignore[operator]
    off = file_offset(exe, "add")
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)], check=True,
                          capture_output=True, text=True).stdout
    m = re.search(r"^([0-9a-f]+) <add>:", dump, re.M)
    assert m
    # A PIE's text segment has p_vaddr == p_offset, so both views agree.
    assert int(m.group(1), 16) == off
