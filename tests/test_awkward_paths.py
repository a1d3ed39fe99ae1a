"""Programs whose path the kernel's grammar handles badly: a ':' or a
non-ASCII letter in the file name (the kernel's generated event name is no
C identifier, so it refuses it), whitespace (uprobe_events splits lines at
spaces: only the ptrace engine can name it, written in double quotes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable

UPROBES = [sys.executable, "-m", "uprobes"]
LOOPS = 5


def _copy(compile_c: Compiler, tmp_path: Path, name: str) -> Path:
    exe = tmp_path / name
    exe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(compile_c("target.c"), exe)
    return exe


def _add_offset(exe: Path) -> int:
    image = ElfImage.open(str(exe))
    return image.link_to_file_offset(SymbolTable.load(image).lookup("add")[0].link_addr)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UPROBES, *args], capture_output=True, text=True, timeout=120)


def _counts(stdout: str) -> dict[str, int]:
    return {parts[0]: int(parts[1]) for parts in map(str.split, stdout.splitlines()[1:])
            if len(parts) == 2 and parts[1].isdigit()}


@pytest.mark.parametrize("name,event", [("pr:og", "p_pr_og"), ("prög", "p_pr_g")])
def test_generated_names_are_identifiers(compile_c: Compiler, tmp_path: Path, tracefs: Path,
                                         name: str, event: str) -> None:
    exe = _copy(compile_c, tmp_path, name)
    off = _add_offset(exe)
    spec = f"{exe}:0x{off:x}"
    event = f"{event}_0x{off:x}"
    done = _run("resolve", spec)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"p:uprobes/{event} "), done.stdout
    for engine in ("kernel", "ptrace"):
        done = _run("count", "-e", engine, spec, "--", str(exe), str(LOOPS))
        assert done.returncode == 0, done.stderr
        assert _counts(done.stdout) == {f"uprobes/{event}": LOOPS}, done.stdout + done.stderr
        done = _run("trace", "-e", engine, spec, "--", str(exe), str(LOOPS))
        assert done.returncode == 0, done.stderr
        assert sum(f" {event}: " in line for line in done.stdout.splitlines()) == LOOPS, \
            done.stdout + done.stderr


@pytest.fixture
def spaced(compile_c: Compiler, tmp_path: Path) -> Path:
    return _copy(compile_c, tmp_path, "my dir/my prog")


def test_a_path_with_spaces_unquoted_gets_a_hint(spaced: Path) -> None:
    done = _run("count", "-e", "ptrace", f"{spaced}:add", "--", str(spaced), str(LOOPS))
    assert done.returncode == 2
    assert done.stderr.startswith("uprobes: error: ")
    assert "double quotes" in done.stderr.splitlines()[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("engine", ["ptrace", "auto"])
@pytest.mark.parametrize("where", ["add", "0x{off:x}"])
def test_a_quoted_path_with_spaces_is_counted(spaced: Path, tracefs: Path, engine: str,
                                              where: str) -> None:
    spec = f'"{spaced}":' + where.format(off=_add_offset(spaced))
    done = _run("count", "-e", engine, spec, "--", str(spaced), str(LOOPS))
    assert done.returncode == 0, done.stderr
    assert f"calls add={LOOPS}" in done.stdout
    assert list(_counts(done.stdout).values()) == [LOOPS], done.stdout + done.stderr


def test_the_kernel_engine_says_it_cannot_name_spaces(spaced: Path, tracefs: Path) -> None:
    done = _run("count", "-e", "kernel", f'"{spaced}":add', "--", str(spaced), str(LOOPS))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("uprobes: error: "), done.stderr
    assert "whitespace" in lines[0] and "-e ptrace" in lines[0]
    assert "calls add" not in done.stdout  # refused before the command ran


def test_resolve_shows_a_quoted_path(spaced: Path) -> None:
    done = _run("resolve", f'"{spaced}":add')
    assert done.returncode == 0, done.stderr
    assert done.stdout == f'p:uprobes/add "{spaced}":0x{_add_offset(spaced):x}\n'
    assert "-e ptrace can" in done.stderr
