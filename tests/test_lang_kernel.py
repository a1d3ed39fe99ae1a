"""Differential test: our parser against the live kernel's uprobe_events parser.

Each kernel-syntax line is written to <tracefs>/uprobe_events. If the kernel
accepts it, we must too, and the kernel's listing of the probe must parse to
the same spec (and equal our canonical render, modulo the kernel's 16-digit
offset padding, when the line was written canonically). If the kernel
rejects it with an error_log entry, we must raise SpecError with the same
message and caret column.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from uprobes.errors import SpecError
from uprobes.lang import auto_event_name, parse, render
from uprobes.lang.ast import ClearSpec, FileTarget, ProbeSpec, Spec, Variable
from uprobes.lang.fetchargs import REGISTER_ALIASES, SUBREGISTERS
from uprobes.sys.tracefs import ErrorLogEntry, parse_error_log

GROUP = f"uprobes_test_{os.getpid()}"


def _entry_file_offset(path: Path) -> int:
    """File offset of e_entry (a real instruction) via the PT_LOAD that maps it."""
    data = path.read_bytes()
    entry, phoff = struct.unpack_from("<QQ", data, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_vaddr <= entry < p_vaddr + p_filesz:
            return entry - p_vaddr + p_offset
    raise AssertionError("no PT_LOAD maps e_entry")


class Kernel:
    def __init__(self, root: Path, path: Path) -> None:
        self.root = root
        self.path = str(path)

    def listing(self) -> list[str]:
        return (self.root / "uprobe_events").read_text().splitlines()

    def write(self, line: str) -> OSError | None:
        fd = os.open(self.root / "uprobe_events", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (line + "\n").encode())
            return None
        except OSError as exc:
            return exc
        finally:
            os.close(fd)

    def log(self) -> set[ErrorLogEntry]:
        """error_log's entries now. Never cleared: every writer on the machine
        shares it (another test session's entries would go with ours)."""
        return set(parse_error_log((self.root / "error_log").read_text()))

    def error_for(self, command: str, before: set[ErrorLogEntry]) -> tuple[str, int] | None:
        """(message, caret column in the command) of the last error_log entry
        for `command` that was not there `before`."""
        found = None
        for entry in parse_error_log((self.root / "error_log").read_text()):
            if entry not in before and entry.command == command:
                found = (entry.message, entry.pos)
        return found

    def ours(self) -> list[str]:
        return [ln for ln in self.listing() if f" {self.path}:" in ln]


@pytest.fixture(scope="module")
def kernel(tracefs: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    # A private copy: our probes are recognisable (and removable) by path.
    exe = tmp_path_factory.mktemp("kdiff") / "true"
    shutil.copy("/bin/true", exe)
    k = Kernel(tracefs, exe)
    yield k
    for ln in k.ours():
        k.write("-:" + ln.split()[0][2:])


def _bare(spec: Spec) -> Spec:
    if isinstance(spec, ProbeSpec):
        args = tuple(dataclasses.replace(a, text="") for a in spec.args)
        target = spec.target
        if isinstance(target, FileTarget) and target.ref_ctr_offset == 0:
            target = dataclasses.replace(target, ref_ctr_offset=None)  # the kernel drops (0)
        group = spec.group or "uprobes"
        event = spec.event
        if event is None and isinstance(target, FileTarget) and target.offset is not None:
            event = auto_event_name(target.path, target.offset)
        return dataclasses.replace(spec, text="", args=args, target=target, group=group,
                                   event=event)
    return dataclasses.replace(spec, text="")


def _unpad(line: str) -> str:
    return re.sub(r"(\S):0x0*([0-9a-f]+)", lambda m: f"{m.group(1)}:0x{m.group(2) or '0'}", line,
                  count=1)


def check_line(k: Kernel, line: str) -> str:
    """Compare one line; returns 'accepted', 'rejected' or 'silent'."""
    command = " ".join(line.split())
    ours: Spec | SpecError
    try:
        ours = parse(line)
    except SpecError as exc:
        ours = exc
    before = set(k.ours())
    logged_before = k.log()
    err = k.write(line)
    new = [ln for ln in k.ours() if ln not in before]
    try:
        if err is None:
            assert not isinstance(ours, SpecError), \
                f"kernel accepted {line!r}, we said {ours.lines()}"
            assert len(new) == 1, (line, new)
            listed = new[0]
            assert _bare(parse(listed)) == _bare(ours), (line, listed)
            if render(ours) == line and ours.event is not None:
                assert _unpad(listed) == line
            return "accepted"
        logged = k.error_for(command, logged_before)
        if logged is None:
            # No error_log: the kernel did not take it for a uprobe line at
            # all. We may only accept it as one of our extensions.
            assert isinstance(ours, SpecError) or (
                isinstance(ours.target, FileTarget) and ours.target.symbol is not None), \
                f"kernel refused {line!r} (errno {err.errno}, no error_log), we accepted it"
            return "silent"
        if not isinstance(ours, SpecError) and (_register_extension(command, logged)
                                                or _variable_extension(ours, logged)):
            return "extension"
        assert isinstance(ours, SpecError), \
            f"kernel refused {line!r} with {logged}, we accepted it"
        assert (ours.message, ours.pos) == logged, (line, ours.lines(), logged)
        assert ours.text == command
        return "rejected"
    finally:
        for ln in new:
            assert k.write("-:" + ln.split()[0][2:]) is None


def _register_extension(command: str, logged: tuple[str, int]) -> bool:
    """Whether the kernel refused only our extension: an x86 register spelling (`%rdi`)."""
    m = re.match(r"%(\w+)", command[logged[1]:])
    return logged[0] == "Invalid register name" and m is not None and (
        m.group(1) in REGISTER_ALIASES or m.group(1) in SUBREGISTERS)


def _variable_extension(ours: Spec, logged: tuple[str, int]) -> bool:
    """Whether the kernel refused only our extension: a source variable by name
    (`foo`, `s->name`), which it takes for a BTF argument it cannot read."""
    return logged[0] == "BTF is not available or not supported" and isinstance(
        ours, ProbeSpec) and any(isinstance(a.expr, Variable) for a in ours.args)


ARGS = r"""
%ax %bx %cx %dx %si %di %bp %sp %r8 %r9 %r10 %r11 %r12 %r13 %r14 %r15 %ip %flags %cs %ss %orig_ax
%ds %es %fs %gs %eax %rax %rdi %r8d %sil %rip:u32 +0(%rsp):u8 %AX % %ax:u8 %di:s16 %di:x32
%di:u64 %di:s64 %di:x8 %ax:char
%ax:string %ax:ustring %ax:symbol %ax:symstr %ax:u99 %ax: %ax:%pd %ax:U8 %ax:x64
$stack $stack0 $stack12 $stack08 $stack1x $stackx $stack99999999999999999999 $stack+1
$comm $COMM $Comm $comm:string $comm:u8 $comm:string[2] $comm:ustring +0($comm) $foo $
$retval
@0x1000 @4096:u32 @0xzz @+0x10 @+-16 @++16 @+zz @sym @ @-5 @0x10:string @+0:ustring @0:u8[4]
@0:string[2] @0x10:b3@2/32
+0(%ax) -8(%sp):s32 +8(+0(%sp)):u16 +u8(%ax) -u8(%ax):u8 +0(%ax):string +u0(%ax):string
+0(%ax):ustring +0(%ax):u8[4] +u0(%ax):u8[4] +0(%ax):string[3] +0(%ax +0%ax +(%ax) +zz(%ax)
+0() +0(%xx) +u8(%xx) -u8(%xx) +-8(%xx) ++8(%ax) +0(%ax)junk +0(\"s") +0(\5) +0x10(%ax)
+0(+0(+0(%xx))) -0x10(%bp):x16 +u(%ax) -(%ax) +0((%ax))
\5 \-5 \+5 \0x10 \zz \ \5:string \5:u8 \"hello" \"hello \" \"" \"a":string \"a":u8
\"a":string[2] \5:string[2] \5:u8[2] \-0x8000000000000000 \18446744073709551616
%ax:b3@2/32 %ax:b0@2/32 %ax:b3@2/33 %ax:b3@30/32 %ax:b3/32 %ax:b3@/32 %ax:bx@2/32
+0(%ax):b4@4/8 %ax:b3@2/32[2] +0(%ax):b3@2/32[2] %ax:b0x3@0x2/0x20 %ax:b @0:b64@0/64
%ax:b65@0/64 %ax:b1@63/64 %ax:b1@64/64 %ax:b8@0/8x
+0(%ax):u8[0] +0(%ax):u8[64] +0(%ax):u8[65] +0(%ax):u8[2 +0(%ax):u8[2]x +0(%ax):u8[x]
%ax:u8[2] +0(%ax):u8[0x10] +0(%ax):[2] +0(%ax):u8[] +0(%ax):u8[-1]
a=%ax =%ax 1a=%ax a-b=%ax common_pid=%ax __probe_ip=%ax __probe_func=%ax a= foo foo:u8 _x
a=b=%ax 5 ( :u8 ,
nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn=%ax nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn=%ax
""".split()

MULTI_ARGS = [
    "a=%ax a=%bx", "arg2=%ax %bx", "%ax arg1=%bx", "foo=%ax foo", "a=%ax b=$comm c=+0(%di):string",
    "a=+" + "0" * 55 + "(%ax)",  # 62 chars
    "a=+" + "0" * 56 + "(%ax)",  # 63
    "a=+" + "0" * 57 + "(%ax)",  # 64: too long
]


def _nest(depth: int, leaf: str = "%ax", suffix: str = "") -> str:
    return "+0(" * depth + leaf + ")" * depth + suffix


NESTED = [_nest(d) for d in (12, 13, 14, 15)] \
    + [_nest(d, suffix=":b3@2/32") for d in (12, 13, 14)] \
    + [_nest(d, "@0") for d in (12, 13, 14)] + [_nest(d, suffix=":u8[2]") for d in (12, 13, 14)] \
    + [_nest(d, suffix=":string") for d in (12, 13, 14)] \
    + [_nest(d, "\\5", ":string[2]") for d in (12, 13, 14)] \
    + [_nest(d, "%ax", ":b3@2/32[2]") for d in (11, 12, 13)]


def heads(off: int) -> list[str]:
    g = GROUP
    return [
        "p:{G}/e_plain {P}:{O}", "r:{G}/e_ret {P}:{O}", "p:{G}/e_pret {P}:{O}%return",
        "p:{G}.e_dot {P}:{O}", "p:{G}/ {P}:{O}", "r:{G}/ {P}:{O}", "p:{G}/e_ref {P}:{O}(0x10)",
        "p:{G}/e_ref0 {P}:{O}(0)", "p:{G}/e_rr {P}:{O}%return(0x20)",
        "p:{G}/e {P}:{O}(16", "p:{G}/e {P}:{O}(16)x", "p:{G}/e {P}:{O}(zz)", "p:{G}/e {P}:{O}()",
        "p:{G}/e {P}:{O}(16)%return", "p:{G}/e {P}:{O}%ret", "p:{G}/e {P}:{O}%",
        "p:{G}/e {P}:{O}zz",
        "p:{G}/e {P}:0x", "p:{G}/e {P}:08", "p:{G}/e_dec {P}:{D}", "p:{G}/e_oct {P}:0{OCT}",
        "p:{G}/e {P}:{O}+4", "p:{G}/e {P}:-1", "p:{G}/e_big {P}:0xffffffffffffffff",
        "p:{G}/e {P}:0x10000000000000000",
        "p:/e {P}:{O}", "p: {P}:{O}", "p:{G}/1e {P}:{O}", "p:1{G}/e {P}:{O}", "p:{G}/a.b {P}:{O}",
        "p:{G}-x/e_dash {P}:{O}", "p:{G}/e-x {P}:{O}", "p:{G}/e {P}:{O}",
        "p:{G}/" + "e" * 63 + " {P}:{O}", "p:{G}/" + "e" * 64 + " {P}:{O}",
        "p:{G}" + "x" * (63 - len(g)) + "/e63 {P}:{O}",
        "p:{G}" + "x" * (64 - len(g)) + "/e {P}:{O}",
        "p:{G}/ {P}:{O} $retval", "r:{G}/e_rv {P}:{O} $retval $retvalue:u8",
        "p:{G}/e_rv2 {P}:{O}%return a=$retval:s32",
        "r:{G}/e_args {P}:{O} " + " ".join(["%ax"] * 128),
        "r:{G}/e {P}:{O} " + " ".join(["%ax"] * 129), "p:{G}/e {P}:{O} " + " ".join(["%zz"] * 130),
        "p:{G}/e_tab\t{P}:{O}\t\ta=%ax", "p:{G}/e_cmt {P}:{O} a=%ax # b=%zz",
        "pxyz:{G}/e {P}:{O}", "p:{G}/e {P}", "p:{G}/e {P}:",
    ]


def _fill(line: str, k: Kernel, off: int) -> str:
    return (line.replace("{G}", GROUP).replace("{P}", k.path).replace("{O}", hex(off))
            .replace("{D}", str(off)).replace("{OCT}", oct(off)[2:]))


def test_kernel_differential(kernel: Kernel) -> None:
    k = kernel
    off = _entry_file_offset(Path(k.path))
    lines = [_fill(h, k, off) for h in heads(off)]
    for i, a in enumerate(ARGS + MULTI_ARGS + NESTED):
        kind = "r" if "retval" in a else "p"
        lines.append(f"{kind}:{GROUP}/a{i} {k.path}:{hex(off)} {a}")
    seen: dict[str, int] = {"accepted": 0, "rejected": 0, "silent": 0, "extension": 0}
    failures = []
    for line in lines:
        try:
            seen[check_line(k, line)] += 1
        except AssertionError as exc:
            failures.append(f"{line!r}: {exc}")
    assert not failures, "\n".join(failures)
    assert seen["accepted"] > 50 and seen["rejected"] > 80 and seen["extension"] >= 2, seen


def test_kernel_refuses_our_extensions(kernel: Kernel) -> None:
    """$argN, symbols, short names and variables by name are ours: the kernel
    refuses them, we don't."""
    k = kernel
    off = _entry_file_offset(Path(k.path))
    for line in [f"p:{GROUP}/x {k.path}:{hex(off)} a=$arg1", f"p:{GROUP}/x {k.path}:main",
                 f"p:{GROUP}/x true:{hex(off)}", f"{k.path}:{hex(off)} a=%di",
                 f"p:{GROUP}/x {k.path}:{hex(off)} a=%rdi b=%esi c=+0(%rsp):u8",
                 f"p:{GROUP}/x {k.path}:{hex(off)} s->name *p arr[3] $params"]:
        parse(line)
        assert k.write(line) is not None, line
        assert not [ln for ln in k.ours() if f"{GROUP}/x " in ln]


def test_listing_round_trips(kernel: Kernel) -> None:
    """What the kernel lists parses back to the spec we gave it."""
    k = kernel
    off = _entry_file_offset(Path(k.path))
    line = (f"p:{GROUP}/lst {k.path}:{hex(off)}(0x40) a=%di:u32 b=+8(+0(%si)):string "
            f"c=$comm d=\\\"x\" e=@+0x10:b3@2/8 f=-16(%sp):s8[3] g=+u8(%di):u16")
    assert check_line(k, line) == "accepted"


RST_EXAMPLES = [  # Documentation/trace/uprobetracer.rst, /bin/bash and /bin/zsh -> our copy
    "p {P}:{O}", "r {P}:{O}", "p:zfree_entry {P}:{O} %ip %ax", "r:zfree_exit {P}:{O} %ip %ax",
    "p:uprobes/zfree_entry {P}:{O} arg1=%ip arg2=%ax",
]


def test_uprobetracer_rst_examples(kernel: Kernel) -> None:
    """Each example round-trips through us and through the live kernel."""
    k = kernel
    off = _entry_file_offset(Path(k.path))
    for example in RST_EXAMPLES:
        line = _fill(example, k, off)
        spec = parse(line)
        assert _bare(parse(render(spec))) == _bare(spec)
        assert check_line(k, line) == "accepted"
    assert parse("-:p_bash_0x4245c0") == ClearSpec("p_bash_0x4245c0", None, "-:p_bash_0x4245c0")
