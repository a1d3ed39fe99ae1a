"""Every Python example in docs/ runs, as a user would run it (root, real kernel)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples(docs: Path) -> list[tuple[str, str]]:
    found = []
    for doc in sorted(docs.rglob("*.md")):
        for i, m in enumerate(_BLOCK.finditer(doc.read_text()), 1):
            found.append((f"{doc.relative_to(docs)}#{i}", m.group(1)))
    return found


EXAMPLES = _examples(DOCS)
# Fail at collection, not by running nothing: a docs/ moved or a fence
# spelled differently would otherwise leave every example untested.
if not EXAMPLES:
    raise AssertionError(f"no ```python example found under {DOCS}")


@pytest.mark.parametrize("name,code", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_doc_example_runs(name: str, code: str, tracefs: Path, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{name} printed nothing"
    assert "Traceback" not in done.stderr



_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#+ (.+)$", re.M)
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = _FENCE.sub("", doc.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in _HEADING.findall(text)}


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "CHANGELOG.md",
                                 *sorted(DOCS.rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_pages_resolve(doc: Path) -> None:
    """Every relative link in the README, the changelog and docs/ names a file
    that exists and, after a #, a heading in it: pages moved or renamed break
    no reader's path."""
    broken = []
    for target in _LINK.findall(_FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def test_readme_example_is_the_one_the_tests_run() -> None:
    """The README shows examples/malloc_sizes.py (tests/test_session.py runs
    that file), so the README's example is run too, and cannot drift."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "malloc_sizes.py").read_text()
    assert f"```python\n{example}```" in readme
