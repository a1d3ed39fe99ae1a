"""`uprobes trace --stack`: each hit's user stack, walked and named, on both
engines: a known chain through our frames, through libc's frames built
without frame pointers (qsort calling our comparator), the same frames from
both engines for the same hits, and each output format carrying them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import Compiler, without_clocks, without_section_headers

from uprobes.commands import main

ENGINES = ("kernel", "ptrace")


@pytest.fixture(scope="module")
def stacks_exe(compile_c: Compiler) -> Path:
    return compile_c("stacks.c", "-O2", "-fomit-frame-pointer")


def _trace(engine: str, exe: Path, *extra: str) -> list[dict[str, object]]:
    out = io.StringIO()
    status = main(["trace", "--json", "--stack", "-e", engine, *extra, f"{exe}:leaf",
                   f"{exe}:by_value", "--", str(exe), "now"], out=out)
    assert status == 0
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert without_clocks(docs[-1]) == {"summary": {"events": len(docs) - 1, "lost": 0}}
    return docs[:-1]


def _names(doc: dict[str, object]) -> list[str]:
    stack = doc["stack"]
    assert isinstance(stack, list)
    return [f["symbol"] or hex(f["addr"]) for f in stack]


def _libc_start(name: str) -> bool:
    return name.startswith("__libc_start")


@pytest.fixture(scope="module")
def traced(tracefs: Path, stacks_exe: Path) -> dict[str, list[dict[str, object]]]:
    return {engine: _trace(engine, stacks_exe) for engine in ENGINES}


@pytest.mark.parametrize("engine", ENGINES)
def test_known_chain_through_our_frames(traced: dict[str, list[dict[str, object]]],
                                        stacks_exe: Path, engine: str) -> None:
    leaf = [d for d in traced[engine] if d["probe"] == "uprobes/leaf"]
    assert len(leaf) == 1
    names = _names(leaf[0])
    assert names[:4] == ["leaf", "mid", "outer", "main"]
    assert _libc_start(names[4]) and names[-1] == "_start", names
    top = leaf[0]["stack"][0]  # type: ignore[index]
    assert top["addr"] == leaf[0]["ip"] and top["offset"] == 0  # type: ignore[index]
    assert top["file"] == str(stacks_exe)  # type: ignore[index]
    libc = leaf[0]["stack"][4]["file"]  # type: ignore[index]
    assert "libc.so" in libc


@pytest.mark.parametrize("engine", ENGINES)
def test_through_libc_frames_without_frame_pointers(
        traced: dict[str, list[dict[str, object]]], engine: str) -> None:
    calls = [d for d in traced[engine] if d["probe"] == "uprobes/by_value"]
    assert calls, "qsort never called the comparator"
    for doc in calls:
        names = _names(doc)
        assert names[0] == "by_value"
        between = names[1:names.index("main")]
        assert between and all(n.startswith(("msort", "qsort")) for n in between), names
        assert any(n.startswith("qsort") for n in between), names
        assert _libc_start(names[names.index("main") + 1]), names


def test_both_engines_give_the_same_frames(traced: dict[str, list[dict[str, object]]]) -> None:
    kernel, ptrace = traced["kernel"], traced["ptrace"]
    assert [d["probe"] for d in kernel] == [d["probe"] for d in ptrace]
    for k, p in zip(kernel, ptrace):
        # Same code, same calls: the same symbols at the same offsets (addresses
        # differ: each run has its own layout).
        assert [(f["symbol"], f["offset"]) for f in k["stack"]] == \
            [(f["symbol"], f["offset"]) for f in p["stack"]]  # type: ignore[union-attr]


def test_a_file_without_section_headers_unwinds_by_its_cfi(tracefs: Path, compile_c: Compiler,
                                                          tmp_path: Path) -> None:
    """sstrip leaves no section headers: `.eh_frame_hdr` is found by its
    program header (PT_GNU_EH_FRAME), so the walk through frames without
    frame pointers is the intact file's (names from the dynamic symbols)."""
    exe = compile_c("stacks.c", "-O2", "-fomit-frame-pointer", "-rdynamic")
    copy = without_section_headers(exe, tmp_path / "stacks")
    intact, stripped = _trace("kernel", exe), _trace("kernel", copy)
    assert [d["probe"] for d in stripped] == [d["probe"] for d in intact]
    for i, s in zip(intact, stripped):
        assert [(f["symbol"], f["offset"]) for f in s["stack"]] == \
            [(f["symbol"], f["offset"]) for f in i["stack"]]  # type: ignore[union-attr]
    names = _names(stripped[0])
    assert names[:4] == ["leaf", "mid", "outer", "main"] and names[-1] == "_start", names
    assert stripped[0]["stack"][0]["file"] == str(copy)  # type: ignore[index]


@pytest.mark.parametrize("engine", ENGINES)
def test_return_probe_stack_starts_in_the_caller(tracefs: Path, stacks_exe: Path,
                                                  engine: str) -> None:
    out = io.StringIO()
    assert main(["trace", "--json", "--stack", "-e", engine, f"r {stacks_exe}:mid",
                 "--", str(stacks_exe), "now"], out=out) == 0
    doc = json.loads(out.getvalue().splitlines()[0])
    assert doc["kind"] == "r"
    names = _names(doc)
    assert names[:2] == ["outer", "main"], names
    assert doc["stack"][0]["addr"] == doc["ip"]  # type: ignore[index]


def test_text_prints_one_tab_indented_line_per_frame(tracefs: Path, stacks_exe: Path) -> None:
    out = io.StringIO()
    assert main(["trace", "--stack", f"{stacks_exe}:leaf", "--", str(stacks_exe), "now"],
                out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split(": ")[1] == "leaf"
    frames = lines[1:]
    assert all(f.startswith("\t") for f in frames)
    assert frames[0] == f"\tleaf+0x0 ({stacks_exe})"
    assert frames[1].startswith("\tmid+0x") and frames[1].endswith(f" ({stacks_exe})")


def test_perfetto_carries_the_stack_as_an_arg(tracefs: Path, stacks_exe: Path,
                                              tmp_path: Path) -> None:
    out_file = tmp_path / "t.json"
    assert main(["trace", "--stack", "--format", "perfetto", "-o", str(out_file),
                 f"{stacks_exe}:leaf", "--", str(stacks_exe), "now"], out=io.StringIO()) == 0
    doc = json.loads(out_file.read_text())
    (leaf,) = [e for e in doc["traceEvents"] if e["ph"] == "i"]
    assert [s.split("+")[0] for s in leaf["args"]["stack"][:4]] == ["leaf", "mid", "outer", "main"]


@pytest.mark.parametrize("size", ["7", "0", "100000"])
def test_bad_stack_bytes_is_one_line(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--stack", "--stack-bytes", size, "libc:malloc", "--",
                 "/bin/true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uprobes: error: --stack-bytes must be") and err.count("\n") == 1
