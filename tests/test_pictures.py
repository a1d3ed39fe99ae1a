"""Pictures: `stacks --svg` (a flame graph) and `latency --svg` (the
histograms), read back as XML: every box and bar matches the counts the
same run printed."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import Compiler

from uprobes.commands import main
from uprobes.render import flamegraph, histogram_svg

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def callers(compile_c: Compiler) -> Path:
    return compile_c("callers.c", "-O2", "-fomit-frame-pointer")


@pytest.fixture
def latency_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("latency.c")


def groups(svg: Path, cls: str) -> list[ET.Element]:
    root = ET.parse(svg).getroot()
    assert root.tag == f"{SVG}svg"
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == cls]


def box(g: ET.Element) -> tuple[float, float]:
    """(x, width) of a group's rect."""
    rect = g.find(f"{SVG}rect")
    assert rect is not None
    return float(rect.get("x", "0")), float(rect.get("width", "0"))


@pytest.mark.parametrize("engine", ("kernel", "ptrace"))
def test_flame_graph_boxes_are_as_wide_as_their_hits(tracefs: Path, callers: Path,
                                                     tmp_path: Path, engine: str) -> None:
    folded_file, svg = tmp_path / "out.folded", tmp_path / "out.svg"
    assert main(["stacks", "-e", engine, "--folded", "-o", str(folded_file), "--svg", str(svg),
                 f"{callers}:hot", "--", str(callers)], out=io.StringIO()) == 7
    folded = {}
    for line in folded_file.read_text().splitlines():
        path, count = line.rsplit(" ", 1)
        folded[path] = int(count)
    assert sum(folded.values()) == 8
    # What each box must hold: the hits of every path through its prefix.
    want: dict[tuple[str, ...], int] = {(): 8}
    for path, count in folded.items():
        names = tuple(path.split(";"))
        for i in range(1, len(names) + 1):
            want[names[:i]] = want.get(names[:i], 0) + count
    frames = groups(svg, "frame")
    assert len(frames) == len(want)
    scale = (flamegraph.WIDTH - 2 * flamegraph.PAD) / 8
    for g in frames:
        assert box(g)[1] == pytest.approx(int(g.get("data-hits", "0")) * scale, abs=0.01)
    # Each box's path, rebuilt from the boxes under it (their x ranges
    # hold it), has the hits of the folded paths through it.
    by_depth: dict[int, list[ET.Element]] = {}
    for g in frames:
        by_depth.setdefault(int(g.get("data-depth", "0")), []).append(g)

    def path_of(g: ET.Element) -> tuple[str, ...]:
        depth = int(g.get("data-depth", "0"))
        if depth == 0:
            return ()
        x = box(g)[0]
        parent = next(p for p in by_depth[depth - 1]
                      if box(p)[0] - 1e-6 <= x < box(p)[0] + box(p)[1] - 1e-6)
        return (*path_of(parent), g.get("data-name", ""))

    assert {path_of(g): int(g.get("data-hits", "0")) for g in frames} == want
    # The two paths into hot: 3 through from_a, 5 through via_b.
    hot = sorted(int(g.get("data-hits", "0")) for g in frames if g.get("data-name") == "hot")
    assert hot == [3, 5]


@pytest.mark.parametrize("engine", ("kernel", "ptrace"))  # ptrace: timed in the program
def test_latency_bars_match_the_buckets(latency_exe: Path, tmp_path: Path, engine: str) -> None:
    svg = tmp_path / "lat.svg"
    out = io.StringIO()
    assert main(["latency", "-e", engine, "--json", "--svg", str(svg), f"{latency_exe}:nap",
                 f"{latency_exe}:fib", "--", str(latency_exe)], out=out) == 0
    doc = json.loads(out.getvalue())
    bars = groups(svg, "bucket")
    # (Timed in the program, a function it cannot patch is left out, with a note.)
    assert "uprobes/fib" in doc and {g.get("data-function") for g in bars} == set(doc)
    for name, h in doc.items():
        mine = [g for g in bars if g.get("data-function") == name]
        drawn = {(int(g.get("data-lo", "0")), int(g.get("data-hi", "0"))):
                 int(g.get("data-count", "0")) for g in mine}
        want = {(lo, hi): n for lo, hi, n in h["buckets"]}
        assert drawn == want, name
        assert sum(drawn.values()) == h["count"]
        peak = max(drawn.values())
        for g in mine:
            rect = g.find(f"{SVG}rect")
            assert rect is not None
            assert float(rect.get("height", "0")) == pytest.approx(
                histogram_svg.BAR_AREA * int(g.get("data-count", "0")) / peak, abs=0.01)
    if engine == "kernel":
        assert doc["uprobes/nap"]["count"] == 25 and doc["uprobes/fib"]["count"] == 177


def test_an_svg_that_cannot_be_written_fails_before_the_run(
        latency_exe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["latency", "--svg", "/nonexistent/dir/x.svg", f"{latency_exe}:nap", "--",
                 str(latency_exe)], out=io.StringIO()) == 2
    assert capsys.readouterr().err.startswith("uprobes: error: cannot write /nonexistent/dir/")
