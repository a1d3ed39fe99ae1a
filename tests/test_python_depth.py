"""Deep Python stacks trap-free (`trace --python -p`, docs/python.md): the
probe's code copies 185 frames (187 on 3.11) with the default
`--stack-bytes`, then `...`, against the program's own
traceback.extract_stack() at the call. Before, a record held 25 frames
(36 before the names were copied too) and a deeper stack ended in `...`
there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CPYTHONS, LATER_CPYTHONS
from test_python_corrupt import attached

from uprobes.unwind.cpython.reader import MAX_PY_FRAMES

DEEP = """
import json, os, sys, traceback
sys.setrecursionlimit(5000)
def down(n):
    if n:
        return down(n - 1)
    stack = [[f.name, f.lineno] for f in traceback.extract_stack()][::-1]; os.getpid()
    print("CALL " + json.dumps(stack), flush=True)
def main():
    print("ready", flush=True)
    sys.stdin.readline()
    down(int(sys.argv[1]))
    print("done", flush=True)
    sys.stdin.readline()
main()
"""


def _deep(python: str, depth: int, tmp_path: Path) -> tuple[list[list[object]], list[list[object]],
                                                            str]:
    """(the program's own stack at its call, innermost first, the Python
    frames of the hit, what uprobes said) of `trace --python -p` at getpid
    in a recursion `depth` deep."""
    script = tmp_path / "deep.py"
    script.write_text(DEEP)
    stdout, said, hits = attached([python, str(script), str(depth)], [], tmp_path, "libc:getpid")
    (own,) = [line[5:] for line in stdout.splitlines() if line.startswith("CALL ")]
    (hit,) = [json.loads(x) for x in hits.splitlines() if '"probe"' in x]
    frames = [[f["symbol"], f.get("line")] for f in hit["stack"] if f.get("python")]
    return json.loads(own), frames, said


@pytest.mark.root
@pytest.mark.parametrize("python", CPYTHONS[:1] + LATER_CPYTHONS)
def test_trapfree_stack_150_frames_deep_is_whole(python: str, tmp_path: Path) -> None:
    """153 Python frames (`<module>`, `main`, 151 of `down`): all of them,
    the program's own, with no stop."""
    own, frames, said = _deep(python, 150, tmp_path)
    assert "1 of 1 probes trap-free" in said, said
    assert len(own) == 153 and frames == own


@pytest.mark.root
def test_trapfree_stack_deeper_than_a_record_is_marked(tmp_path: Path) -> None:
    """Deeper than a record holds (and than MAX_PY_FRAMES): its innermost
    frames, 187 on 3.11, then `...`."""
    own, frames, said = _deep("/usr/bin/python3.11", MAX_PY_FRAMES + 50, tmp_path)
    assert "1 of 1 probes trap-free" in said, said
    assert len(frames) == 188 and frames == own[:187] + [["...", None]]
