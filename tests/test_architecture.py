"""The layering rules of docs/architecture.md, as import-linter contracts
(pyproject.toml, [tool.importlinter]): layers import only downward, the
kernel and ptrace engines import nothing of each other, no import cycles."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_imports_keep_the_layering_contracts() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), \
        "import-linter is missing: it is a test dependency, `./bootstrap test` installs it"
    proc = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"an import breaks a layering contract:\n{output}"
    # A configuration that names no package or no contract would pass too.
    analyzed = re.search(r"Analyzed (\d+) files", output)
    assert analyzed is not None, output
    assert int(analyzed.group(1)) >= len(list((ROOT / "src" / "uprobes").rglob("*.py"))), output
    assert re.search(r"Contracts: [3-9]\d* kept, 0 broken", output), output


# A raw waitpid status decoded by hand: its low byte against 0x7f, its signal or
# event shifted out, or the os module's W* macros.
_RAW_STATUS = re.compile(r"\bos\.W[A-Z]+\(|waitstatus_to_exitcode|status\s*&\s*0x[7fF][fF]\b"
                         r"|status\s*>>\s*(8|16)\b")


def test_wait_statuses_are_decoded_in_sys_only() -> None:
    """sys/ptrace.py decodes a waitpid status once (`decode`, `WaitStatus`);
    the layers above read its fields, never the status bits."""
    src = ROOT / "src" / "uprobes"
    found = [f"{path.relative_to(src)}:{n}: {line.strip()}"
             for path in sorted(src.rglob("*.py")) if path.parent.name != "sys"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if _RAW_STATUS.search(line) and not line.lstrip().startswith("#")]
    assert not found, "\n".join(found)
    # The pattern finds what it is for (sys/ptrace.py decodes by these bits).
    assert _RAW_STATUS.search((src / "sys" / "ptrace.py").read_text())
