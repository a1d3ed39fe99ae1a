"""The split of the suite holds: `pytest -m "not root"`, the contributor's
command, passes as an unprivileged user with no skip and no failure.

It runs as the `nobody` user (setpriv: no capabilities, no supplementary
groups) on a copy of this checkout and of the venv's packages that user
owns, with UPROBES_REQUIRE_KERNEL=1 so that a `need()` for root fails
instead of skipping. A test that needs root and is not marked `root`
(by a mark, or by the fixtures conftest.py counts as root) fails it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_BOUND_S, need

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[1]
USER = "nobody"
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".*_cache", "*.egg-info", "pip")
"""Not copied: version control, the venv (made anew), caches, pip."""


def _python_for_others() -> Path:
    """An interpreter of this version that other users may run: the venv's
    often lives in root's home (pyenv), and the system's stands in for it."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (Path(sys.executable).resolve(), Path(f"/usr/bin/python{version}")):
        if cand.exists() and all(p.stat().st_mode & 0o001 for p in cand.parents) \
                and cand.stat().st_mode & 0o001:
            return cand
    need(False, f"no python{version} that {USER} may run")
    raise AssertionError("unreachable")


def copy_for_nobody(home: Path) -> tuple[Path, Path]:
    """Into `home`: a copy of the checkout (src, tests, docs, ...) and a venv
    holding copies of our packages and tools, all owned by `nobody`."""
    tree = home / "uprobes"
    shutil.copytree(ROOT, tree, ignore=SKIP)
    venv = home / "venv"
    subprocess.run([str(_python_for_others()), "-m", "venv", "--without-pip", str(venv)],
                   check=True, capture_output=True, timeout=120)
    site = Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"])
    # The editable install points at this checkout: the copy points at the copy.
    shutil.copytree(sysconfig.get_paths()["purelib"], site, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__editable__*", "__pycache__", "pip"))
    (site / "uprobes-copy.pth").write_text(f"{tree / 'src'}\n")
    for script in Path(sys.executable).parent.iterdir():
        target = venv / "bin" / script.name
        if target.exists() or script.is_dir() or script.is_symlink():
            continue
        data = script.read_bytes()
        first, _, rest = data.partition(b"\n")
        if first.startswith(b"#!") and b"python" in first:
            # console scripts (lint-imports) name our interpreter on their first line
            data = b"#!" + str(venv / "bin" / "python").encode() + b"\n" + rest
        target.write_bytes(data)
        target.chmod(script.stat().st_mode)
    subprocess.run(["chown", "-R", f"{USER}:", str(home)], check=True)
    return tree, venv


@pytest.fixture
def checkout() -> Iterator[tuple[Path, Path]]:
    need(os.geteuid() == 0, "running the suite as another user needs root")
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
    home = Path(tempfile.mkdtemp(prefix="uprobes-not-root-"))
    home.chmod(0o755)
    try:
        yield copy_for_nobody(home)
    finally:
        shutil.rmtree(home)


def test_not_root_passes_as_nobody_with_no_skip(checkout: tuple[Path, Path]) -> None:
    tree, venv = checkout
    pw = pwd.getpwnam(USER)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tree.parent),
           "LANG": "C.UTF-8", "UPROBES_REQUIRE_KERNEL": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
         "env", "-i", *(f"{k}={v}" for k, v in env.items()),
         str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(tree.parent / "tmp"), "-m", "not root"],
        cwd=tree, capture_output=True, text=True, timeout=TEST_BOUND_S)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    closing = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else out
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", closing)}
    print(f"`-m 'not root'` as {USER}: {closing} ({took:.0f} s)")
    assert proc.returncode == 0, out
    assert set(counts) <= {"passed", "deselected", "xfailed", "warning", "warnings"}, out
    assert counts.get("passed", 0) > 100 and counts.get("deselected", 0) > 0, out
