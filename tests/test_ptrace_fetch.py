"""ArgFetcher against the kernel as oracle, on one hit at a time.

The fixture's probed functions stop themselves (SIGSTOP) in their body, so
their memory at and above the entry stack pointer is as it was at the hit.
The kernel engine traces them with the fetchargs under test plus hidden
arguments that capture every register; for each event the test waits for
the stop, rebuilds the registers from the kernel's own values, evaluates the
same probe with ArgFetcher on the stopped process's memory, and requires the
kernel's values exactly (the captured registers included), then continues it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Compiler
from test_kernel_trace import symbol_link_addr

from uprobes.commands.resolve import parse_specs
from uprobes.elf.image import ElfImage
from uprobes.engines.kernel.tracer import KernelTracer
from uprobes.engines.launch import launch
from uprobes.engines.tracee.fetch import REGISTER_FIELDS, ArgFetcher, FetchContext
from uprobes.model.event import ArgValue, Event
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.resolver import Resolver
from uprobes.sys import procfs
from uprobes.sys.procmem import ProcessMemory
from uprobes.sys.ptrace import UserRegs

REGS = " ".join(f"reg_{k}=%{k}" for k in REGISTER_FIELDS)

ENTRY_ARGS = (
    "u64=+0(%di):u64 s64=+8(%di):s64 u32=+16(%di):u32 s32=+20(%di):s32 "
    "u16=+24(%di):u16 s16=+26(%di):s16 u8=+28(%di):u8 s8=+29(%di):s8 x8=+28(%di):x8 "
    "x16=+24(%di):x16 x32=+16(%di):x32 x64=+0(%di):x64 c=+30(%di):char "
    "bf=+32(%di):b4@8/32 bfw=+32(%di):b12@20/32 bf8=+120(%di):b3@5/8 bfa=+120(%di):b2@1/8[2] "
    "bf64=+0(%di):b7@57/64 bfr=%si:b4@0/16 "
    "arr=+36(%di):s32[3] arr8=+36(%di):u8[4] arrx=+36(%di):x16[3] arr64=+0(%di):u64[2] "
    "rdi=%di rsi8=%si:s8 rsi16=%si:u16 rdx=%dx:s16 rcx=%cx:s32 r8=%r8:s64 r9=%r9:u8 "
    "fl=%flags:x32 ip=%ip "
    "a1=$arg1 a2=$arg2:s8 a3=$arg3:s16 a4=$arg4:s32 a5=$arg5:s64 a6=$arg6:u8 a7=$arg7:s64 "
    "a8=$arg8:s32 a9=$arg9 a1d=+8($arg1):s64 "
    "st=$stack st0=$stack0 st1=$stack1:s64 st2=$stack2:s32 st5=$stack5 "
    "stfar=$stack20000000000000 "
    "imm=\\42:s32 immn=\\-5:s8 immx=\\0x1234:x16 immbig=\\0xffffffffffffffff:s64 "
    "immstr=\\\"text\" cm=$comm cms=$comm:string "
    "n1=+8(+96(%di)):s64 n2=+48(+96(+96(%di))):x64 neg=-36(+104(%di)):u64 ud=+u0(%di):u64 "
    "ud2=+u8(+u96(%di)):s64 "
    "name=+0(+48(%di)):string uname=+0(+48(%di)):ustring bad=+0(+56(%di)):string "
    "edge=+0(+64(%di)):string nm2=+0(+48(+96(%di))):string sa=+80(%di):string[2]")
RETURN_ARGS = "rv=$retval:x64 rs=+0($retval):string rv8=$retval:s8"
# Strings that share out the record's string space the kernel's way: an
# inner fault shows the next string, a too-long one eats the room after it,
# and the record is capped at a page.
SHARING_ARGS = ("ifs=+0(+0(+56(%di))):string after=+0(+48(%di)):string "
                "long=+0(+72(%di)):string after2=+0(+48(%di)):string big=+0(+112(%di)):string")
# %di is 5 bytes before an unmapped page: reads that straddle it keep what
# was readable and zero the rest (copy_from_user), an 8-byte pointer there faults.
EDGE_ARGS = ("e5=+0(%di):u8[5] e8=+2(%di):u64 e16=+4(%di):x16 e0=+5(%di):u8 es=+0(%di):string "
             "ea=+1(%di):u16[3] ep=+0(+0(%di)):u8 ew=+0(%di):b4@36/64")
MIXED_ARGS = "u1=$arg1 u2=$arg2 u3=$arg3 u1x=$arg1:x8 u3s=$arg3:s32 u2d=$arg2:u64"
TEXT_ARGS = "t=+0($arg1):string tp=$arg1 t2=$arg2 t1=+1($arg1):u8[3]"

STALE_WHEN_FAULTY = {"n2", "ep"}
"""An inner dereference faults: the kernel leaves its per-CPU buffer as the
last event left it; ArgFetcher gives 0. (`n2` faults in `f`'s faulty hit,
`ep` in every hit of `h`.)"""


def drop_stale(kernel: dict[str, object], ours: dict[str, object], faulty: bool) -> None:
    """Take out the arguments whose kernel value is whatever came before."""
    for name in STALE_WHEN_FAULTY:
        if name in kernel and (faulty or name == "ep"):
            del kernel[name]
            assert ours.pop(name) == 0


@dataclass
class Hit:
    probe: ResolvedProbe
    event: Event
    ours: dict[str, ArgValue]


def specs_for(exe: Path, pie: bool) -> list[str]:
    image = ElfImage.open(str(exe))
    f_link = symbol_link_addr(exe, "f")
    load_delta = f_link - image.link_to_file_offset(f_link)
    # `@+OFF` is memory at (probe address - probe file offset) + OFF.
    fo = symbol_link_addr(exe, "g_value") - load_delta
    fos = symbol_link_addr(exe, "g_text") - load_delta
    entry = f"{exe}:f {ENTRY_ARGS} fo=@+{fo:#x}:u64 fos=@+{fos:#x}:string"
    if not pie:  # link-time addresses are run-time addresses
        g, text = symbol_link_addr(exe, "g_value"), symbol_link_addr(exe, "g_text")
        entry += (f" g=@{g:#x}:s64 gu8=@{g:#x}:u8[3] gs=@{text:#x}:string "
                  f"imms=\\{text:#x}:string")
    return [f"{entry} {REGS}", f"r {exe}:pick {RETURN_ARGS} {REGS}",
            f"{exe}:g {SHARING_ARGS} {REGS}", f"{exe}:h {EDGE_ARGS} {REGS}",
            f"usdt:{exe}:oracle:mixed {MIXED_ARGS} {REGS}",
            f"usdt:{exe}:oracle:text {TEXT_ARGS} {REGS}"]


def oracle_run(exe: Path, specs: list[str]) -> list[Hit]:
    """Trace `exe` with the kernel engine; evaluate every hit with ArgFetcher
    while the process is stopped right after it."""
    probes = Resolver().resolve_all(parse_specs(specs))
    fetchers = {p.name: (p, ArgFetcher(p)) for p in probes}
    hits: list[Hit] = []
    child = launch([str(exe)])

    def on_event(e: Event) -> None:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"{exe.name} did not stop after {e.probe}"
        probe, fetcher = fetchers[e.probe]
        regs = UserRegs()
        for name, field in REGISTER_FIELDS.items():
            value = e.args[f"reg_{name}"]
            assert isinstance(value, int)
            setattr(regs, field, value)
        where = procfs.mapping_for_runtime_addr(child.pid, e.func if e.func else e.ip)
        assert where is not None
        ctx = FetchContext(comm=e.comm, file_base=where.start - where.file_offset)
        with ProcessMemory(child.pid) as mem:
            hits.append(Hit(probe, e, fetcher.fetch(regs, mem, ctx)))
        os.kill(child.pid, signal.SIGCONT)

    try:
        with KernelTracer(probes, child=child.pid) as tracer:
            child.release()
            tracer.run(on_event, duration=60)  # a stop without its event must not hang
        assert child.wait() == 0
    finally:
        child.abort()
    return hits


@pytest.mark.kernel
@pytest.mark.parametrize("pie", [False, True], ids=["no-pie", "pie"])
def test_every_fetcharg_as_the_kernel_gives_it(tracefs: Path, compile_c: Compiler,
                                               pie: bool) -> None:
    exe = compile_c("fetch_oracle.c", "-pie" if pie else "-no-pie")
    hits = oracle_run(exe, specs_for(exe, pie))
    assert [(h.event.probe, h.event.kind) for h in hits] == [
        ("uprobes/f", "p"), ("uprobes/f", "p"), ("uprobes/pick__return", "r"),
        ("uprobes/pick__return", "r"), ("uprobes/g", "p"), ("uprobes/h", "p"),
        ("oracle/mixed", "p"), ("oracle/text", "p")]
    good, faulty = hits[0], hits[1]
    for i, hit in enumerate(hits):
        kernel, ours = dict(hit.event.args), dict(hit.ours)
        assert list(ours) == list(kernel)
        drop_stale(kernel, ours, hit is faulty)
        assert ours == kernel, f"hit {i} ({hit.event.probe})"

    # The values themselves, so that a shared mistake cannot pass.
    expected = {
        "u64": 18000000000000000000, "s64": -5000000000, "u32": 4000000000, "s32": -70000,
        "u16": 65000, "s16": -300, "u8": 250, "s8": -5, "x8": 0xFA, "c": ord("Z"),
        "bf": 0x2, "bfw": 0xABC, "bf8": 0x5, "bfa": [2, 1], "arr": [-1, 2, -3],
        "arr8": [0xFF] * 4, "a2": -7, "a3": -300, "a4": -70000, "a5": -5000000000, "a6": 200,
        "a7": -77, "a8": 88, "a1d": -5000000000, "stfar": 0, "imm": 42, "immn": -5,
        "immx": 0x1234, "immbig": -1, "immstr": None, "cm": exe.name[:15],
        "cms": exe.name[:15], "n1": -5000000000, "neg": 18000000000000000000,
        "ud": 18000000000000000000,
        "ud2": -5000000000, "name": "world", "uname": "world", "bad": None, "edge": None,
        "nm2": "world", "sa": ["first", "second"], "fo": 0xFEDCBA9876543210,
        "fos": "global text"}
    if not pie:
        expected.update({"g": 0xFEDCBA9876543210 - (1 << 64), "gu8": [0x10, 0x32, 0x54],
                         "gs": "global text", "imms": "global text"})
    assert {k: good.ours[k] for k in expected} == expected
    # Last reads that fault give 0 and None; an inner fault in a string shows
    # the string written next into the record (the second of `sa`).
    assert {k: faulty.ours[k] for k in ("n1", "neg", "ud2", "name", "nm2", "a2")} == {
        "n1": 0, "neg": 0, "ud2": 0, "name": None, "nm2": "second", "a2": 1}
    assert hits[2].ours["rs"] == "world" and hits[3].ours["rs"] is None
    sharing = hits[4].ours
    assert sharing["ifs"] == sharing["after"] == "world"
    assert isinstance(sharing["long"], str) and set(sharing["long"]) == {"L"}
    assert 100 < len(sharing["long"]) < 4000
    assert sharing["after2"] is None and sharing["big"] is None
    assert hits[5].ours == {**hits[5].ours, "e5": list(b"abcde"), "e0": 0, "es": None,
                            "e8": int.from_bytes(b"cde", "little"), "e16": ord("e"), "ep": 0,
                            "ea": [ord("b") | ord("c") << 8, ord("d") | ord("e") << 8, 0]}
    assert {k: hits[6].ours[k] for k in ("u1", "u2", "u3", "u1x", "u3s")} == {
        # u3s: the low 32 bits, signed
        "u1": -9, "u2": -1234, "u3": 77777777777, "u1x": 0xF7, "u3s": 468366449}
    assert hits[7].ours["t"] == "global text" and hits[7].ours["t1"] == list(b"lob")
