"""The engines behind one protocol (uprobes.engines.base): callers open them
by request, and the engine not picked is not even imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.kernel
def test_a_kernel_run_never_imports_the_ptrace_engine(tracefs: Path) -> None:
    """Start-up time: `trace -e kernel` opens its tracer through the factory,
    which imports the ptrace engine only when it picks it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "uprobes", "trace", "-e",
                           "kernel", "--duration", "0", "libc:getppid"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "uprobes.engines.kernel.tracer" in imported  # the run did open the kernel engine
    assert "uprobes.engines.base" in imported
    assert not {m for m in imported if m.startswith("uprobes.engines.ptrace")}
