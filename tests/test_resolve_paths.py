"""PATH as written in a probe -> a file: paths, links, short names, processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_elf_support import ldconfig

from uprobes.errors import ResolveError
from uprobes.resolve.paths import find_file, in_root
from uprobes.sys import procfs


def ldconfig_path(soname: str) -> str:
    tool = ldconfig()
    assert tool is not None, "ldconfig is not installed"
    out = subprocess.run([tool, "-p"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.strip().startswith(soname + " ") and "x86-64" in line:
            return line.split("=>")[1].strip()
    raise AssertionError(f"{soname} not in ldconfig -p")


@pytest.mark.parametrize("name", ["c", "libc", "libc.so.6"])
def test_libc_short_names_agree_with_ldconfig(name: str) -> None:
    ref = find_file(name)
    want = os.stat(ldconfig_path("libc.so.6"))
    assert (ref.dev, ref.ino) == (want.st_dev, want.st_ino)


def test_libm_and_pthread() -> None:
    for name, soname in [("m", "libm.so.6"), ("pthread", "libpthread.so.0")]:
        ref = find_file(name)
        want = os.stat(ldconfig_path(soname))
        assert (ref.dev, ref.ino) == (want.st_dev, want.st_ino)


def test_program_on_path_must_be_elf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "true"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    ref = find_file("true")
    assert ref.ino == os.stat("/usr/bin/true").st_ino  # the shell script was skipped


def test_links_give_one_identity(compile_c, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    hard = tmp_path / "hard"
    soft = tmp_path / "soft"
    os.link(exe, hard)
    soft.symlink_to(exe)
    ids = {(r.dev, r.ino)
           for r in (find_file(str(exe)), find_file(str(hard)), find_file(str(soft)))}
    assert len(ids) == 1


def test_process_view_goes_through_proc_root(
        running_process: subprocess.Popen[str]) -> None:
    pid = running_process.pid
    maps = procfs.maps(pid)
    mapped = sorted({m.path for m in maps if "libc.so" in m.path})
    ref = find_file("libc", pid=pid, maps=maps)
    assert ref.path.startswith(f"/proc/{pid}/root/")
    assert ref.display == mapped[0]
    host = os.stat(mapped[0])
    assert (ref.dev, ref.ino) == (host.st_dev, host.st_ino)
    abs_ref = find_file("/usr/bin/true", pid=pid)
    assert abs_ref.path == f"/proc/{pid}/root/usr/bin/true"


@pytest.mark.parametrize("path,message", [
    ("/nonexistent/x", "no such file"),
    ("/tmp", "is a directory"),
    ("/dev/null", "not a regular file"),
    ("no-such-lib-or-program-xyz", "no such library or program"),
])
def test_bad_paths(path: str, message: str) -> None:
    with pytest.raises(ResolveError, match=message):
        find_file(path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ResolveError, match="not a regular file"):
        find_file(str(fifo))


def test_in_root_follows_links_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/libx.so").write_bytes(b"")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "usr/lib/abs.so").symlink_to("/usr/lib/libx.so")
    (tmp_path / "usr/lib/up.so").symlink_to("../../../../../usr/lib/libx.so")
    (tmp_path / "a").symlink_to("/b")
    (tmp_path / "b").symlink_to("a")
    root = str(tmp_path)
    assert in_root(root, "/lib/abs.so") == "/usr/lib/libx.so"  # never the host's /usr/lib
    assert in_root(root, "/lib/up.so") == "/usr/lib/libx.so"  # `..` stops at the root
    assert in_root(root, "/lib/../lib/./libx.so") == "/usr/lib/libx.so"
    assert in_root(root, "/lib/missing.so") == "/usr/lib/missing.so"
    with pytest.raises(ResolveError, match="too many levels"):
        in_root(root, "/a")
