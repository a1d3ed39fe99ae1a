"""Every Python example in docs/*.md runs, as a user would run it (root, real kernel)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    found = []
    for doc in sorted(DOCS.glob("*.md")):
        for i, m in enumerate(_BLOCK.finditer(doc.read_text()), 1):
            found.append((f"{doc.name}#{i}", m.group(1)))
    return found


@pytest.mark.parametrize("name,code", _examples(), ids=[n for n, _ in _examples()])
def test_doc_example_runs(name: str, code: str, tracefs: Path, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{name} printed nothing"
    assert "Traceback" not in done.stderr
