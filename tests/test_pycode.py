"""The code objects of a running CPython (resolve/pycode.py, `uprobes list
py:PID`), against the program's own `id(f.__code__)` and its own
introspection, on every 3.11 interpreter here and on 3.12 and 3.13 where
they are installed; and a walk over a dict
overwritten with garbage ends, with the rest found."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import CPYTHONS, LATER_CPYTHONS, killed_after, need

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.resolve.pycode import code_objects_in, find_code_objects
from uprobes.resolve.pylayout import FIELDS, layout_for
from uprobes.resolve.pyprocess import find_interpreter
from uprobes.sys.procmem import ProcessMemory

FIXTURE = str(Path(__file__).parent / "fixtures" / "py_code.py")
UPROBES = [sys.executable, "-m", "uprobes"]
# Debian's python3.11, the venv's own (pyenv's, which an unprivileged user
# running the suite cannot reach in root's home) and Debian's debug build;
# then pyenv's 3.12 and 3.13
INTERPRETERS = CPYTHONS + LATER_CPYTHONS
PATTERNS = {"__main__": "__main__.*", "mixed_keys": "mixed_keys.*", "json": "json.*",
            "victim": "victim.*"}


@contextmanager
def fixture(python: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """The fixture running under `python`, and what it printed about itself."""
    need(os.access(python, os.X_OK), f"{python} is not installed")
    proc = subprocess.Popen([python, FIXTURE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        with killed_after(proc):
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, "the fixture said nothing"
            yield proc, json.loads(line)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("python", INTERPRETERS)
def test_each_kind_of_function_is_found_at_its_id(python: str) -> None:
    with fixture(python) as (proc, said):
        for name, addr in said["named"].items():
            found = find_code_objects(proc.pid, name)
            assert [c.runtime_addr for c in found.codes] == [addr], name
            (code,) = found.codes
            assert code.name == name
            assert [code.filename, code.firstlineno] == said["lines"][name]
        assert not found.truncated and found.skipped == 0


@pytest.mark.parametrize("python", INTERPRETERS)
def test_a_walk_equals_pythons_own_view(python: str) -> None:
    """Every code object the program's introspection reaches under a module
    prefix, and nothing else: unicode-keyed and general (int key) dicts, a
    property's getter and setter (one name, two code objects), a deleted
    entry, classes referring to themselves, a 1000-deep class chain."""
    with fixture(python) as (proc, said):
        for prefix, pattern in PATTERNS.items():
            found = find_code_objects(proc.pid, pattern)
            got = {str(c.runtime_addr): [c.name, c.filename, c.firstlineno]
                   for c in found.codes}
            assert got == said["reference"][prefix], pattern
            assert not found.truncated
        everything = find_code_objects(proc.pid)
        assert not everything.truncated and everything.skipped == 0
        names = {c.name for c in everything.codes}
        assert {"__main__.plain", "json.decoder.JSONDecoder.decode",
                "mixed_keys.mixed_function"} <= names


def test_list_command() -> None:
    with fixture("/usr/bin/python3.11") as (proc, said):
        out = subprocess.run([*UPROBES, "list", f"py:{proc.pid}", "__main__.Shape.*"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == f"process {proc.pid}, Python 3.11.2 (/usr/bin/python3.11): 6 functions"
        assert lines[1].split() == ["FUNCTION", "SOURCE"]
        rows = [line.split() for line in lines[2:]]
        assert [r[0] for r in rows] == [
            "__main__.Shape.Inner.method", "__main__.Shape.Inner.method.<locals>.<lambda>",
            "__main__.Shape.area", "__main__.Shape.make", "__main__.Shape.size",
            "__main__.Shape.unit"]
        area = said["lines"]["__main__.Shape.area"]
        assert ["__main__.Shape.area", f"{area[0]}:{area[1]}"] in rows
        inline = subprocess.run([*UPROBES, "list", "--json", f"py:{proc.pid}:json.dumps"],
                                capture_output=True, text=True, timeout=120)
        (dumps,) = json.loads(inline.stdout)["functions"]
        assert dumps["code_addr"] == said["named"]["json.dumps"]
        none = subprocess.run([*UPROBES, "list", f"py:{proc.pid}", "nothing.here"],
                              capture_output=True, text=True, timeout=120)
        assert none.returncode == 0 and "no function matches 'nothing.here'" in none.stdout


@pytest.mark.parametrize("argv, says", [
    (["py:notapid"], "py:notapid: py: lists a running Python's functions: give its "
                     "process id (py:PID)"),
    (["py:1", "-p", "1"], "py:1: the process is the one after py:, without -p"),
    (["py:2147483647"], "no process with pid 2147483647"),
])
def test_bad_input_is_one_line(argv: list[str], says: str) -> None:
    out = subprocess.run([*UPROBES, "list", *argv], capture_output=True, text=True,
                         timeout=120)
    assert (out.returncode, out.stderr) == (2, f"uprobes: error: {says}\n")


def test_a_process_without_python_is_one_line() -> None:
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        out = subprocess.run([*UPROBES, "list", f"py:{sleeper.pid}"], capture_output=True,
                             text=True, timeout=120)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (out.returncode, out.stderr) == (
        2, f"uprobes: error: process {sleeper.pid} runs no CPython interpreter that uprobes "
           "can read (Python functions need CPython 3.11, 3.12 or 3.13)\n")


@pytest.mark.parametrize("python", INTERPRETERS[:2] + LATER_CPYTHONS)
def test_garbage_in_a_dict_ends_the_walk_of_it_only(python: str) -> None:
    """The `victim` module's dict, its keys object and its entries overwritten
    with garbage (random, and the shapes that would loop or read without end):
    every walk ends, within its read budget, and finds the rest."""
    with fixture(python) as (proc, said):
        interp = find_interpreter(proc.pid)
        assert interp is not None
        lay = interp.layout
        rng = random.Random(18)
        main_codes = said["reference"]["__main__"]
        with ProcessMemory(proc.pid) as mem:
            d = said["victim_dict"]
            keys = int.from_bytes(mem.read(d + lay.dict_keys, 8), "little")
            head = mem.read(keys, lay.dictkeys_indices)
            entries = int.from_bytes(head[lay.dictkeys_nentries:][:8], "little")
            span = (lay.dictkeys_indices + (1 << head[lay.dictkeys_log2_index_bytes])
                    + entries * lay.dict_unicode_entry_size)  # the keys object, in use
            assert entries >= 8
            original = mem.read(keys, span)
            crafted = [
                (keys + lay.dictkeys_nentries, (1 << 62).to_bytes(8, "little")),
                (keys + lay.dictkeys_log2_size, b"\xff\xff\xff"),
                # every entry's key and value: the dict itself
                (keys + span - 8 * entries, d.to_bytes(8, "little") * entries),
                (d + lay.dict_keys, d.to_bytes(8, "little")),
            ]
            rounds = crafted
            for _ in range(16):
                at = rng.randrange(0, span - 1)
                rounds.append((keys + at, rng.randbytes(rng.randrange(1, span - at))))
            for at, garbage in rounds:
                mem.write(at, garbage)
                code_objects_in(proc.pid, interp, mem.read, "victim.*")
                whole = code_objects_in(proc.pid, interp, mem.read, "*")
                assert not whole.truncated
                got = {str(c.runtime_addr) for c in whole.codes if c.module == "__main__"}
                assert got == set(main_codes)
                mem.write(keys, original)
                mem.write(d + lay.dict_keys, keys.to_bytes(8, "little"))
        small = code_objects_in(proc.pid, interp, ProcessMemory(proc.pid).read, "*",
                                max_reads=50)
        assert small.truncated and small.reads == 50


def test_a_cached_layout_without_the_new_fields_is_derived_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout cached by an older uprobes (fewer fields) is not served."""
    if not os.path.exists("/usr/include/python3.11/internal/pycore_frame.h"):
        pytest.skip("python3.11-dev is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    image = ElfImage.open("/usr/bin/python3.11")
    symbols = SymbolTable.load(image)
    hexversion = int.from_bytes(image.read_link(symbols.lookup("Py_Version")[0].link_addr, 4),
                                "little")
    fresh = layout_for(image, "/usr/bin/python3.11", hexversion)
    assert set(fresh.fields) == FIELDS
    cached = tmp_path / "uprobes" / "cpython" / f"{image.build_id}.json"
    old = {k: v for k, v in fresh.fields.items() if not k.startswith(("dict", "func_"))}
    cached.write_text(json.dumps({"hexversion": hexversion, "fields": old,
                                  "source": "headers"}))
    again = layout_for(image, "/usr/bin/python3.11", hexversion)
    assert again.fields == fresh.fields
    assert set(json.loads(cached.read_text())["fields"]) == FIELDS
