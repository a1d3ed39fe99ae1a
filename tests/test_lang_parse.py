"""Probe lines -> exact dataclasses; bad lines -> the kernel's message and caret."""

from __future__ import annotations

import dataclasses

import pytest

from uprobes.engines.kernel.probe_line import kernel_line
from uprobes.errors import SpecError
from uprobes.lang import auto_event_name, parse, parse_args, render, symbol_event_name
from uprobes.lang.ast import (
    Arg,
    Bitfield,
    ClearSpec,
    Comm,
    Deref,
    FetchArg,
    FetchType,
    FileOffset,
    FileTarget,
    Immediate,
    ImmString,
    Memory,
    ProbeKind,
    ProbeSpec,
    Register,
    RetVal,
    Spec,
    StackEntry,
    StackPointer,
    Step,
    UsdtTarget,
    Variable,
    VdsoTarget,
)
from uprobes.lang.render import render_fetcharg
from uprobes.model.probe import InodeKey, ResolvedProbe, UsdtArg, VdsoKey

P, R = ProbeKind.ENTRY, ProbeKind.RETURN
X64 = FetchType("x64", explicit=False)
STR = FetchType("string", explicit=False)


def bare(spec: Spec) -> Spec:
    if isinstance(spec, ProbeSpec):
        return dataclasses.replace(
            spec, text="", args=tuple(dataclasses.replace(a, text="") for a in spec.args))
    return dataclasses.replace(spec, text="")


def a(name: str, expr: object, ftype: FetchType = X64) -> FetchArg:
    return FetchArg(name, expr, ftype)  # type: ignore[arg-type]


GOOD: list[tuple[str, Spec]] = [
    ("p:grp/ev /bin/true:0x10", ProbeSpec(P, FileTarget("/bin/true", offset=16), (), "grp", "ev")),
    ("r:ev /bin/true:16", ProbeSpec(R, FileTarget("/bin/true", offset=16), (), None, "ev")),
    ("p /bin/true:0x10%return", ProbeSpec(R, FileTarget("/bin/true", offset=16))),
    ("p:g.e /bin/true:0x10(0x20)",
     ProbeSpec(P, FileTarget("/bin/true", offset=16, ref_ctr_offset=32), (), "g", "e")),
    ("p:g/ /a:b/c:0x10", ProbeSpec(P, FileTarget("/a:b/c", offset=16), (), "g", None)),
    ("libc:malloc size=%di:u64",
     ProbeSpec(P, FileTarget("libc", symbol="malloc"),
               (a("size", Register("di"), FetchType("u64")),))),
    ("r python3:main $retval",
     ProbeSpec(R, FileTarget("python3", symbol="main"), (a("arg1", RetVal()),))),
    ("p libfoo.so:ns::func+0x10%return(0x8)",
     ProbeSpec(R, FileTarget("libfoo.so", symbol="ns::func", symbol_offset=16, ref_ctr_offset=8))),
    ("libc.so.6:memcpy@GLIBC_2.14",
     ProbeSpec(P, FileTarget("libc.so.6", symbol="memcpy@GLIBC_2.14"))),
    ("c:memcpy@@GLIBC_2.2.5", ProbeSpec(P, FileTarget("c", symbol="memcpy@@GLIBC_2.2.5"))),
    ("c:str*", ProbeSpec(P, FileTarget("c", symbol="str*"))),
    ("./a.out:_ZN3foo3barEv", ProbeSpec(P, FileTarget("./a.out", symbol="_ZN3foo3barEv"))),
    ("x:ns::f(int)", ProbeSpec(P, FileTarget("x", symbol="ns::f(int)"))),
    ("x:operator+", ProbeSpec(P, FileTarget("x", symbol="operator+"))),
    ("usdt:/usr/bin/python3:python:function__entry $arg1 +0($arg2):string",
     ProbeSpec(P, UsdtTarget("/usr/bin/python3", "python", "function__entry"),
               (a("arg1", Arg(1)), a("arg2", Deref(0, Arg(2)), FetchType("string"))))),
    ("u:/x:prov:name", ProbeSpec(P, UsdtTarget("/x", "prov", "name"))),
    ("u:main", ProbeSpec(P, FileTarget("u", symbol="main"))),
    ("u:0x10", ProbeSpec(P, FileTarget("u", offset=16))),
    (":vdso:__vdso_clock_gettime+4",
     ProbeSpec(P, VdsoTarget(symbol="__vdso_clock_gettime", symbol_offset=4))),
    ("r :vdso:0x900", ProbeSpec(R, VdsoTarget(offset=0x900))),
    (":vdso:/64:0x8d0", ProbeSpec(P, VdsoTarget(offset=0x8d0, image="64"))),
    ("r :vdso:/32:clock_gettime+4",
     ProbeSpec(R, VdsoTarget(symbol="clock_gettime", symbol_offset=4, image="32"))),
    (":vdso:/x32:time%return", ProbeSpec(R, VdsoTarget(symbol="time", image="x32"))),
    # a C++ parameter list may hold whitespace, in the PLACE only
    ("x:ns::f(int, char const*) %di",
     ProbeSpec(P, FileTarget("x", symbol="ns::f(int, char const*)"), (a("arg1", Register("di")),))),
    ("p x:(anonymous namespace)::g(std::pair<int, long>)",
     ProbeSpec(P, FileTarget("x", symbol="(anonymous namespace)::g(std::pair<int, long>)"))),
    ("pfoo /bin/true:0x10", ProbeSpec(P, FileTarget("/bin/true", offset=16))),
    ("-:grp/ev", ClearSpec("ev", "grp")),
    ("-:ev", ClearSpec("ev")),
    ("-:grp/", ClearSpec("", "grp")),
    ("p /bin/true:0x10 %ax $stack $stack3 $comm @0x1000 @+16 +8(-4(%sp)):s32 +u0(%di):ustring "
     "\\-5 \\\"hi\" v=%ax:b3@2/32 w=+0(%di):u8[4] c=$comm:string x=$arg7 y=@+-16:char",
     ProbeSpec(P, FileTarget("/bin/true", offset=16), (
         a("arg1", Register("ax")), a("arg2", StackPointer()), a("arg3", StackEntry(3)),
         a("arg4", Comm(), STR), a("arg5", Memory(0x1000)), a("arg6", FileOffset(16)),
         a("arg7", Deref(8, Deref(-4, Register("sp"))), FetchType("s32")),
         a("arg8", Deref(0, Register("di"), user=True), FetchType("ustring")),
         a("arg9", Immediate(-5)), a("arg10", ImmString("hi"), STR),
         a("v", Register("ax"), FetchType("bitfield", Bitfield(3, 2, 32))),
         a("w", Deref(0, Register("di")), FetchType("u8", array=4)),
         a("c", Comm(), FetchType("string")), a("x", Arg(7)),
         a("y", FileOffset(-16), FetchType("char"))))),
    # kernel quirks we follow: text after the last ')' ignored, $retval by prefix
    ("r /bin/true:0x10 +0(%ax)junk $retvalue",
     ProbeSpec(R, FileTarget("/bin/true", offset=16),
               (a("arg1", Deref(0, Register("ax"))), a("arg2", RetVal())))),
    ("p /bin/true:0x10 a=%ax # comment %zz", ProbeSpec(P, FileTarget("/bin/true", offset=16),
                                                      (a("a", Register("ax")),))),
]


@pytest.mark.parametrize(("line", "expected"), GOOD, ids=[g[0] for g in GOOD])
def test_good_lines(line: str, expected: Spec) -> None:
    spec = parse(line)
    assert bare(spec) == bare(expected)
    assert bare(parse(render(spec))) == bare(spec)


BAD: list[tuple[str, str, int]] = [
    # (line, message, caret column): columns checked against the live kernel
    ("p /bin/true:0x10 %xx", "Invalid register name", 17),
    ("p /bin/true:0x10 %ds", "Invalid register name", 17),
    ("p:1a /bin/true:0x10", "Event name must follow the same rules as C identifiers", 2),
    ("p:g/1a /bin/true:0x10", "Event name must follow the same rules as C identifiers", 4),
    ("p:1g/a /bin/true:0x10", "Group name must follow the same rules as C identifiers", 2),
    ("p:/a /bin/true:0x10", "Group name is not specified", 2),
    ("p: /bin/true:0x10", "Event name is not specified", 2),
    ("p:" + "e" * 64 + " /bin/true:0x10", "Event name is too long", 2),
    ("p:" + "g" * 64 + "/e /bin/true:0x10", "Group name is too long", 2),
    ("p /bin/true:0x10 $retval", "$retval is not available on probe", 17),
    ("p /bin/true:1zz", "Invalid uprobe offset", 12),
    ("p /bin/true:0x10(16", "Reference counter brace is not closed", 19),
    ("p /bin/true:0x10(16)x", "Reference counter has wrong suffix", 20),
    ("p /bin/true:0x10(zz)", "Invalid reference counter offset", 17),
    ("p /bin/true:0x10%ret", "Invalid probed address suffix", 16),
    ("p /bin/true:0x10 a=%ax:u99", "Unknown type is specified", 23),
    ("p /bin/true:0x10 a=%ax:symbol", "Unknown type is specified", 23),
    ("p /bin/true:0x10 a=%ax:symstr", "Unknown type is specified", 23),
    ("p /bin/true:0x10 a=%ax:string", "String accepts only memory argument", 23),
    ("p /bin/true:0x10 $comm:u8", "$comm and immediate-string only accepts string type", 23),
    ("p /bin/true:0x10 +0($comm)", "$comm can not be dereferenced", 20),
    ("p /bin/true:0x10 a=+0(%ax", "Dereference brace is not closed", 25),
    ("p /bin/true:0x10 a=-u8(%xx)", "Invalid register name", 22),  # kernel: one column early
    ("p /bin/true:0x10 a=+0%ax", "Dereference needs a brace", 19),
    ("p /bin/true:0x10 a=+zz(%ax)", "Invalid dereference offset", 19),
    ("p /bin/true:0x10 @sym", "Symbol is not available with uprobe", 17),
    ("p /bin/true:0x10 @0xzz", "Invalid memory address", 17),
    ("p /bin/true:0x10 @+zz", "Invalid file offset value", 17),
    ("p /bin/true:0x10 \\zz", "Invalid immediate value", 18),
    ("p /bin/true:0x10 \\\"ab", "String is not closed with '\"'", 21),
    ("p /bin/true:0x10 $foo", "Invalid $-variable specified", 17),
    ("p /bin/true:0x10 $arg0", "Invalid argument number", 17),
    ("p /bin/true:0x10 s-", "BTF is not available or not supported", 17),
    ("p /bin/true:0x10 5", "Invalid fetch argument", 17),
    ("p /bin/true:0x10 a=%ax a=%bx", "This argument name is already used", 23),
    ("p /bin/true:0x10 arg2=%ax %bx", "This argument name is already used", 26),
    ("p /bin/true:0x10 common_pid=%ax", "This argument name is already used", 17),
    ("p /bin/true:0x10 =%ax", "Argument name is not specified", 17),
    ("p /bin/true:0x10 a-b=%ax", "Argument name must follow the same rules as C identifiers", 17),
    ("p /bin/true:0x10 " + "n" * 33 + "=%ax", "Argument name is too long", 17),
    ("p /bin/true:0x10 a=", "No argument expression", 19),
    ("p /bin/true:0x10 a=+" + "0" * 58 + "(%ax)", "Argument expression is too long", 19),
    ("p /bin/true:0x10 a=+0(%ax):u8[2", "Array is not closed", 31),
    ("p /bin/true:0x10 a=+0(%ax):u8[2]x", "Array has wrong suffix", 32),
    ("p /bin/true:0x10 a=+0(%ax):u8[0]", "Invalid array size", 30),
    ("p /bin/true:0x10 a=+0(%ax):u8[65]", "Array number is too big", 30),
    ("p /bin/true:0x10 a=%ax:b3@30/32", "Invalid bitfield", 23),
    ("p /bin/true:0x10 a=+u0(%ax):u8[4]", "String accepts only memory argument", 31),
    ("p /bin/true:0x10 a=" + "+0(" * 15 + "%ax" + ")" * 15, "Dereference is too much nested", 22),
    ("p /bin/true:0x10 " + " ".join(["%ax"] * 129), "Too many arguments are specified", 17),
    # our own words
    ("", "Empty probe line", 0),
    ("p", "Probe point is not specified (PATH:OFFSET, PATH:SYMBOL, usdt:PATH:PROVIDER:NAME "
          "or :vdso:SYMBOL)", 2),
    ("libc", "Probe point must be PATH:OFFSET or PATH:SYMBOL[+OFFSET]", 0),
    (":malloc", "Path is missing before ':'", 0),
    ("usdt:/x:prov", "USDT probe must be usdt:PATH:PROVIDER:NAME", 0),
    (":vdso:/63:0x10", "vDSO image must be /64, /32 or /x32, followed by ':'", 6),
    ("r :vdso:/64", "vDSO image must be /64, /32 or /x32, followed by ':'", 8),
    (":vdso:/64:", "vDSO probe must be :vdso:[/IMAGE:]SYMBOL[+OFFSET] or :vdso:[/IMAGE:]OFFSET",
     10),
    # the kernel's PATH:OFF(REF) is split at whitespace as the kernel does
    ("p /bin/true:0x10(abc %ax)", "Reference counter brace is not closed", 20),
    ("r usdt:/x:prov:name", "USDT probes cannot be return probes", 0),
    ("-:a b", "Clear command takes no arguments", 4),
    ("-x", "Clear command must be -:[GROUP/]EVENT", 0),
]


@pytest.mark.parametrize(("line", "message", "pos"), BAD, ids=[b[0][:60] for b in BAD])
def test_bad_lines(line: str, message: str, pos: int) -> None:
    with pytest.raises(SpecError) as info:
        parse(line)
    assert (info.value.message, info.value.pos) == (message, pos)


def test_error_text_is_the_kernels_command() -> None:
    with pytest.raises(SpecError) as info:
        parse("p   /bin/true:0x10\t\t%xx  ")
    assert info.value.text == "p /bin/true:0x10 %xx"
    assert info.value.lines()[-1] == "  " + " " * 17 + "^"


def test_parse_args() -> None:
    assert [x.name for x in parse_args(["%di", "n=+8(%si):u32"])] == ["arg1", "n"]
    with pytest.raises(SpecError, match=r"\$retval"):
        parse_args(["$retval"])
    assert parse_args(["$retval"], is_return=True)[0].expr == RetVal()


def test_names() -> None:
    assert auto_event_name("/usr/lib/libc.so.6", 0x1234) == "p_libc_0x1234"
    assert auto_event_name("/bin/true", 0x10) == "p_true_0x10"
    assert auto_event_name("/x/my-prog", 0) == "p_my_0x0"
    assert len(auto_event_name("/x/" + "a" * 80, 0x10)) == 63
    assert symbol_event_name("malloc", False) == "malloc"
    assert symbol_event_name("malloc", True) == "malloc__return"
    assert symbol_event_name("memcpy@GLIBC_2.14", False) == "memcpy_GLIBC_2_14"
    assert symbol_event_name("_ZN2ns1fEv", False) == "_ZN2ns1fEv"
    assert symbol_event_name("ns::f", True) == "ns_f__return"
    assert len(symbol_event_name("x" * 100, True)) == 63


def _probe(spec_line: str, *, usdt: tuple[UsdtArg, ...] = (),
           ref: int | None = None) -> ResolvedProbe:
    spec = parse(spec_line)
    assert isinstance(spec, ProbeSpec)
    return ResolvedProbe(spec, InodeKey(1, 2, 0x1130), "/usr/bin/app", 0x1130, spec.kind, "g",
                         "e", spec.args, ref_ctr_offset=ref, usdt_args=usdt)


def test_kernel_line_sysv() -> None:
    p = _probe("app:main a=$arg1 b=$arg6:u32 c=$arg7 d=+8($arg2):string $comm")
    assert kernel_line(p) == ("p:g/e /usr/bin/app:0x1130 a=%di b=%r9:u32 c=$stack1 "
                              "d=+8(%si):string arg5=$comm")
    r = _probe("r app:main $retval:s32", ref=0x40)
    assert kernel_line(r) == "r:g/e /usr/bin/app:0x1130(0x40) arg1=$retval:s32"
    with pytest.raises(SpecError, match="return probes"):
        kernel_line(_probe("r app:main $arg1"))


def test_kernel_line_usdt() -> None:
    args = (UsdtArg(-4, True, "-4@%eax"), UsdtArg(8, False, "8@-16(%rbp)"),
            UsdtArg(-4, True, "-4@$5"), UsdtArg(1, False, "1@%r8b"),
            UsdtArg(8, False, "8@8(%rax,%rbx,8)"), UsdtArg(8, False, "8@foo(%rip)"))
    p = _probe("usdt:/usr/bin/app:prov:name $arg1 $arg2 $arg3 x=$arg4:x8 $arg4", usdt=args)
    assert kernel_line(p) == ("p:g/e /usr/bin/app:0x1130 arg1=%ax:s32 arg2=-16(%bp):u64 "
                              "arg3=\\5:s32 x=%r8:x8 arg5=%r8:u8")
    for n in (5, 6, 7):
        with pytest.raises(SpecError):
            kernel_line(_probe(f"usdt:/usr/bin/app:prov:name $arg{n}", usdt=args))


def test_kernel_line_refuses_vdso() -> None:
    spec = parse(":vdso:__vdso_time")
    assert isinstance(spec, ProbeSpec)
    p = ResolvedProbe(spec, VdsoKey(1, 0x900), "[vdso]", 0x900, P, "g", "e", ())
    with pytest.raises(SpecError):
        kernel_line(p)


# ---- paths the kernel's grammar cannot write: quoted, and generated names

@pytest.mark.parametrize("line,target", [
    ('"/opt/my app/bin":main', FileTarget("/opt/my app/bin", symbol="main")),
    ('p "/opt/my app/bin":0x10', FileTarget("/opt/my app/bin", offset=0x10)),
    ('p:g/e "/opt/tab\there":ns::f+0x4', FileTarget("/opt/tab\there", symbol="ns::f",
                                                    symbol_offset=4)),
    ('"/a::b/lib.so":f', FileTarget("/a::b/lib.so", symbol="f")),
    ('"/opt/my app/lib.so":f(0x20)', FileTarget("/opt/my app/lib.so", symbol="f",
                                                ref_ctr_offset=0x20)),
    ('usdt:"/opt/my app/bin":prov:name', UsdtTarget("/opt/my app/bin", "prov", "name")),
])
def test_quoted_path(line: str, target: object) -> None:
    spec = parse(line + " x=%di")
    assert isinstance(spec, ProbeSpec)
    assert spec.target == target
    assert [arg.name for arg in spec.args] == ["x"]  # the space inside quotes split nothing
    assert bare(parse(render(spec))) == bare(spec)


@pytest.mark.parametrize("line,message,pos,hint", [
    ("/opt/my app/bin:main", "Probe point must be PATH:OFFSET or PATH:SYMBOL[+OFFSET]", 0, True),
    ('"/opt/my app/bin:main', "Quoted path is not closed with '\"'", 0, False),
    ('"/opt/my app/bin"main', "A quoted path must be followed by ':'", 17, False),
    ('"":main', "Path is missing before ':'", 0, False),
    ('"/opt/my app/bin":main%bad', "Invalid probed address suffix", 22, False),
])
def test_quoted_path_errors(line: str, message: str, pos: int, hint: bool) -> None:
    with pytest.raises(SpecError) as info:
        parse(line)
    assert (info.value.message, info.value.pos) == (message, pos), info.value.lines()
    assert ('"/opt/my app/bin":main' in info.value.detail) == hint


def test_generated_event_names_are_c_identifiers() -> None:
    from uprobes.lang.names import offset_event_name
    assert offset_event_name("/x/pr:og", 0x1139) == "p_pr_og_0x1139"
    assert offset_event_name("/x/prög", 0x10) == "p_pr_g_0x10"
    assert offset_event_name("/x/my prog", 0x10) == "p_my_prog_0x10"
    assert offset_event_name("/usr/lib/libc.so.6", 0x1234) == auto_event_name(
        "/usr/lib/libc.so.6", 0x1234)  # the kernel's own name where it is one
    parse(f"p:uprobes/{offset_event_name('/x/pr:og', 0x10)} /bin/true:0x10")  # a good name


@pytest.mark.parametrize("text,name,var", [
    ("n", "n", Variable("n")),
    ("s->name", "s_name", Variable("s", (Step("->", "name"),))),
    ("s.in.x", "s_in_x", Variable("s", (Step(".", "in"), Step(".", "x")))),
    ("arr[3]", "arr_3", Variable("arr", (Step("[]", index=3),))),
    ("*s->next", "s_next_deref", Variable("s", (Step("->", "next"), Step("*")))),
    ("$params", "params", Variable("$params")),
    ("$vars", "vars", Variable("$vars")),
    ("v=p->x", "v", Variable("p", (Step("->", "x"),))),
])
def test_variables_by_name(text: str, name: str, var: Variable) -> None:
    """A source variable parses to a Variable named as a C identifier, and
    renders back as written."""
    (arg,) = parse(f"/bin/true:main {text}").args  # type: ignore[union-attr]
    assert (arg.name, arg.expr) == (name, var)
    assert render_fetcharg(arg) == (text if "=" in text else f"{name}={text}")


def test_variable_names_never_collide() -> None:
    """`n=%di n`: the variable's own name is taken, so it gets the next free one."""
    spec = parse("/bin/true:main n=%di n s->n s_n")
    assert [a.name for a in spec.args] == ["n", "n_1", "s_n", "s_n_1"]  # type: ignore[union-attr]


@pytest.mark.parametrize("text,message", [
    ("s-", "BTF is not available or not supported"),
    ("s->", "BTF is not available or not supported"),
    ("a[x]", "BTF is not available or not supported"),
    ("*5", "Invalid fetch argument"),
    ("s->name:u99", "Unknown type is specified"),
])
def test_bad_variables_keep_the_kernels_words(text: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(f"/bin/true:main {text}")
    assert err.value.message == message


@pytest.mark.parametrize("line,target", [
    ("/tmp/app:app.c:42", FileTarget("/tmp/app", source_file="app.c", line=42)),
    ("/tmp/app:visit:+3", FileTarget("/tmp/app", symbol="visit", line=3)),
    ("/tmp/app:ns::f:+2", FileTarget("/tmp/app", symbol="ns::f", line=2)),
    ('"/my app/bin":lib/x.cc:7', FileTarget("/my app/bin", source_file="lib/x.cc", line=7)),
    ("/tmp/pr:og:0x1139", FileTarget("/tmp/pr:og", offset=0x1139)),
])
def test_source_lines(line: str, target: FileTarget) -> None:
    spec = parse(line)
    assert spec.target == target  # type: ignore[union-attr]
    assert parse(render(spec)).target == target  # type: ignore[union-attr]
