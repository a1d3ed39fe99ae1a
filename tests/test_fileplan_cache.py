"""The engines' caches of what a probed file holds (fileplan.py's decoded
files and plans, breakpoints.py's original bytes) live as long as the
process that places probes (the agent's, with runs and traced processes
coming and going; a test session's): kept per version of the file, and read
by the path the latest caller gave."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import Compiler

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.ptrace.breakpoints import INSN_MAX, original_bytes
from uprobes.engines.trapfree.fileplan import FilePlan, plan_for, plan_whole


@contextmanager
def _running(exe: Path) -> Iterator[int]:
    """timed.c waiting for its first round: its pid."""
    proc = subprocess.Popen([str(exe), "rounds", "1", "1", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == f"ready {proc.pid}\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _offset(exe: Path, name: str) -> int:
    image = ElfImage.open(exe)
    (sym,) = SymbolTable.load(image).lookup(name)[:1]
    return image.link_to_file_offset(sym.link_addr)


def test_plans_are_made_after_the_files_first_reader_exited(compile_c: Compiler,
                                                            tmp_path: Path) -> None:
    """A file first decoded through /proc/PID/root/... of a process that has
    exited since is read by the next caller's path. Before, that path was
    kept: every plan not made while the process lived was "cannot read the
    function", and kept so (the agent's timers, and a later test's on the
    same fixture, took no jump)."""
    exe = tmp_path / "timed"  # a file of its own: no other test's plans
    shutil.copy(compile_c("timed.c", "-pthread"), exe)
    st = os.stat(exe)
    tiny, spin = _offset(exe, "tiny"), _offset(exe, "spin")
    with _running(exe) as first:
        assert isinstance(plan_for(f"/proc/{first}/root{exe}", st.st_dev, st.st_ino, spin),
                          FilePlan)
    with _running(exe) as second:
        path = f"/proc/{second}/root{exe}"
        assert isinstance(plan_whole(path, st.st_dev, st.st_ino, tiny), FilePlan)
        assert isinstance(plan_for(path, st.st_dev, st.st_ino, tiny), FilePlan)


def test_a_file_changed_in_place_is_planned_anew(compile_c: Compiler, tmp_path: Path) -> None:
    """Plans are kept per version of the file (its size and times with its
    inode): the same inode rewritten, or reused by another file, is decoded
    again, not planned by what an earlier file held there."""
    exe = tmp_path / "timed"
    shutil.copy(compile_c("timed.c", "-pthread"), exe)
    st = os.stat(exe)
    tiny = _offset(exe, "tiny")
    assert isinstance(plan_whole(str(exe), st.st_dev, st.st_ino, tiny), FilePlan)
    # Another program in the same inode, with something else at tiny's offset.
    shutil.copyfile(compile_c("target.c"), exe)
    now = os.stat(exe)  # (times may not move within a clock tick; the size does here)
    assert (now.st_ino, now.st_size != st.st_size) == (st.st_ino, True)
    assert not isinstance(plan_whole(str(exe), st.st_dev, st.st_ino, tiny), FilePlan)


def test_an_inode_rewritten_gives_its_new_bytes(compile_c: Compiler, tmp_path: Path) -> None:
    """The bytes an int3 replaces, read for one version of a file, are not
    those of the next one in the same inode (they were: the cache key was
    the inode, and placement then refused a probe whose memory did not hold
    the bytes of a file that no longer was)."""
    exe = tmp_path / "timed"
    shutil.copy(compile_c("timed.c", "-pthread"), exe)
    st = os.stat(exe)
    tiny = _offset(exe, "tiny")

    def held() -> bytes:
        return exe.read_bytes()[tiny:tiny + INSN_MAX]
    assert original_bytes(str(exe), st.st_dev, st.st_ino, tiny) == held()
    shutil.copyfile(compile_c("target.c"), exe)
    assert os.stat(exe).st_ino == st.st_ino
    assert original_bytes(str(exe), st.st_dev, st.st_ino, tiny) == held()
