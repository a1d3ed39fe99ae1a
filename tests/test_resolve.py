"""Resolution of whole specs: symbols, offsets, validation, USDT, vDSO, processes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from test_elf_support import readelf_func

from uprobes.engines.kernel.probe_line import kernel_line
from uprobes.errors import ResolveError, SpecError
from uprobes.lang import parse
from uprobes.lang.ast import ProbeSpec
from uprobes.model.probe import InodeKey, VdsoKey
from uprobes.resolve.resolver import Resolver

PY = "/usr/bin/python3.11"


def spec(text: str) -> ProbeSpec:
    s = parse(text)
    assert isinstance(s, ProbeSpec)
    return s


@pytest.mark.parametrize("flags", [("-pie", "-fPIE"), ("-no-pie", "-fno-PIE")],
                         ids=["pie", "nopie"])
def test_symbol_offsets_match_readelf(compile_c, flags) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c", *flags)
    st = os.stat(exe)
    for name in ("add", "greet", "fib"):
        off, _ = readelf_func(exe, name)
        [p] = Resolver().resolve(spec(f"{exe}:{name} a=%di"))
        assert p.key == InodeKey(st.st_dev, st.st_ino, off)
        assert p.event == name and p.group == "uprobes"
        assert kernel_line(p) == f"p:uprobes/{name} {exe}:0x{off:x} a=%di"


def test_numeric_offset_and_symbol_plus_offset(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    off, _ = readelf_func(exe, "greet")
    by_sym = Resolver().resolve(spec(f"{exe}:greet"))[0]
    by_off = Resolver().resolve(spec(f"{exe}:0x{off:x}"))[0]
    assert by_sym.key == by_off.key
    assert by_off.event == f"p_{exe.name.split('-')[0]}_0x{off:x}"
    assert by_off.symbol is None
    # The second instruction of greet: take it from objdump.
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)], capture_output=True,
                         text=True, check=True).stdout
    body = dis.split("<greet>:")[1].split("\n\n")[0]
    addrs = [int(m.group(1), 16) for m in re.finditer(r"^\s+([0-9a-f]+):", body, re.M)]
    second = addrs[1] - addrs[0]
    p = Resolver().resolve(spec(f"{exe}:greet+{second}"))[0]
    assert p.file_offset == off + second


def test_offset_inside_instruction_refused_unless_forced(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    off, _ = readelf_func(exe, "greet")
    # greet's first instruction is longer than one byte (endbr64 or push with REX).
    with pytest.raises(ResolveError, match="inside an instruction"):
        Resolver().resolve(spec(f"{exe}:greet+1"))
    [p] = Resolver(force=True).resolve(spec(f"{exe}:greet+1"))
    assert p.file_offset == off + 1


def test_offset_outside_code_refused(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    with pytest.raises(ResolveError, match="not in an executable segment"):
        Resolver().resolve(spec(f"{exe}:0x10"))


def test_unknown_symbol_suggests_names(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    with pytest.raises(ResolveError, match=r"symbol 'gret' not found .*did you mean: greet"):
        Resolver().resolve(spec(f"{exe}:gret"))


def test_return_probe_with_offset_is_refused(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    with pytest.raises(SpecError, match="Retprobe address must be an function entry"):
        Resolver().resolve(spec(f"r {exe}:greet+4"))


def test_past_end_of_function(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    _, size = readelf_func(exe, "add")
    with pytest.raises(ResolveError, match="past the end of add"):
        Resolver().resolve(spec(f"{exe}:add+{size}"))


def test_glob_expands_one_probe_per_function(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    probes = Resolver().resolve(spec(f"{exe}:*_sum"))
    assert [p.symbol for p in probes] == ["point_sum"]
    libc = Resolver().resolve(spec("libc:str*cmp"))
    names = {p.symbol for p in libc}
    assert {"strcmp", "strncmp"} <= names
    assert len({p.key for p in libc}) == len(libc)


def test_libc_malloc_agrees_with_readelf() -> None:
    [p] = Resolver().resolve(spec("libc:malloc"))
    off, _ = readelf_func(Path(p.path), "malloc@@GLIBC_2.2.5")
    assert p.file_offset == off


def test_versioned_symbol() -> None:
    probes = Resolver().resolve(spec("libc:memcpy@GLIBC_2.2.5"))
    default = Resolver().resolve(spec("libc:memcpy"))
    assert len(probes) == 1 and len(default) == 1
    assert probes[0].file_offset != default[0].file_offset
    assert probes[0].event == "memcpy_GLIBC_2_2_5"


def test_ifunc_is_flagged() -> None:
    [p] = Resolver().resolve(spec("libc:strcmp"))
    assert any("IFUNC" in n for n in p.notes)


def test_usdt_probe_with_semaphore() -> None:
    [p] = Resolver().resolve(spec(f"usdt:{PY}:python:function__entry f=+0($arg1):string"))
    readelf = subprocess.run(["readelf", "-n", PY], capture_output=True, text=True).stdout
    assert "function__entry" in readelf
    assert p.group == "python" and p.event == "function__entry"
    assert p.ref_ctr_offset is not None and len(p.usdt_args) == 3
    line = kernel_line(p)
    assert f"({p.ref_ctr_offset:#x})" in line and "f=+0(%bp):string" in line


def test_usdt_missing_argument() -> None:
    with pytest.raises(ResolveError, match=r"has 3 arguments; \$arg4 does not exist"):
        Resolver().resolve(spec(f"usdt:{PY}:python:function__entry x=$arg4"))


def test_usdt_glob_and_missing() -> None:
    probes = Resolver().resolve(spec(f"usdt:{PY}:python:function__*"))
    assert sorted(p.event for p in probes) == ["function__entry", "function__return"]
    with pytest.raises(ResolveError, match="no USDT probe python:nope"):
        Resolver().resolve(spec(f"usdt:{PY}:python:nope"))


def test_vdso_symbol_keyed_by_process() -> None:
    [p] = Resolver().resolve(spec(":vdso:clock_gettime"))
    assert isinstance(p.key, VdsoKey) and p.path == "[vdso]"
    assert p.symbol in ("clock_gettime", "__vdso_clock_gettime")


def test_process_view_resolves_the_libc_it_maps(
        running_process: subprocess.Popen[str]) -> None:
    pid = running_process.pid
    [p] = Resolver(pid=pid).resolve(spec("libc:malloc"))
    assert p.path.startswith(f"/proc/{pid}/root/")
    [host] = Resolver().resolve(spec("libc:malloc"))
    assert p.key == host.key  # one inode, one probe, whichever path named it


def test_event_names_unique_within_a_run(compile_c) -> None:  # type: ignore[no-untyped-def]
    exe = compile_c("target.c")
    probes = Resolver().resolve_all([spec(f"{exe}:add a=%di"), spec(f"{exe}:add b=%si")])
    assert [p.event for p in probes] == ["add", "add_1"]
