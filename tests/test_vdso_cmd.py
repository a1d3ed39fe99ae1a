"""`uprobes vdso`: the vDSO's functions as readelf sees them in the image it
writes, and the vDSO's address in the process it was read from."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

from uprobes.commands import main


def vdso(*argv: str) -> dict:  # type: ignore[type-arg]
    out = io.StringIO()
    assert main(["vdso", "--json", *argv], out=out) == 0
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def readelf_functions(path: Path) -> dict[str, tuple[int, int]]:
    """`name@@VER` -> (value, size) for every FUNC in readelf's .dynsym."""
    text = subprocess.run(["readelf", "-W", "--dyn-syms", str(path)], capture_output=True,
                          text=True, check=True).stdout
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[3] == "FUNC":
            out[f[7]] = (int(f[1], 16), int(f[2]))
    return out


def test_dump_is_an_elf_file_and_the_listing_is_readelfs(tmp_path: Path) -> None:
    dump = tmp_path / "vdso.so"
    doc = vdso("--dump", str(dump))
    assert dump.read_bytes()[:4] == b"\x7fELF" and dump.stat().st_size == doc["size"]
    listed = {}
    for f in doc["functions"]:
        for name in [f"{f['name']}@@{f['version']}", *f["aliases"]]:
            listed[name] = (f["file_offset"], f["size"])  # the vDSO links at 0: offset == value
    assert listed == readelf_functions(dump)
    names = {f["name"] for f in doc["functions"]}
    assert {"clock_gettime", "gettimeofday", "time", "getcpu"} <= names
    assert all(a.startswith("__vdso_") for f in doc["functions"] for a in f["aliases"])
    build_id = subprocess.run(["readelf", "-n", str(dump)], capture_output=True, text=True,
                              check=True).stdout
    assert f"Build ID: {doc['build_id']}" in build_id


def test_another_process_same_image_its_own_address(running_process: subprocess.Popen[str],
                                                    tmp_path: Path) -> None:
    pid = running_process.pid
    theirs = vdso("-p", str(pid), "--dump", str(tmp_path / "theirs.so"))
    ours = vdso("--dump", str(tmp_path / "ours.so"))
    assert (tmp_path / "theirs.so").read_bytes() == (tmp_path / "ours.so").read_bytes()
    line = next(ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines()
                if ln.endswith("[vdso]"))
    assert theirs["runtime_addr"] == int(line.split("-")[0], 16) and theirs["pid"] == pid
    clock = next(f for f in theirs["functions"] if f["name"] == "clock_gettime")
    assert clock["runtime_addr"] == theirs["runtime_addr"] + clock["file_offset"]
    assert [f["file_offset"] for f in theirs["functions"]] == \
        [f["file_offset"] for f in ours["functions"]]
