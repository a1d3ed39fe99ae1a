"""One fetcharg, `[NAME=]FETCHARG[:TYPE]`, checked exactly as the kernel does.

This follows traceprobe_parse_probe_arg() and friends in
kernel/trace/trace_probe.c for uprobes (TPARG_FL_USER): the same order of
checks, the same error and the same caret offset, including the kernel's
quirks (text after the last ')' of a dereference is ignored; the caret of a
`+u`/`-u` dereference is one column early). One extension: `$argN` is
accepted (the kernel refuses it for uprobes; `uprobes.resolve.abi` turns it
into a register or stack slot).

The kernel builds at most FETCH_INSN_MAX (16) fetch instructions per
argument; `_Budget` counts them the same way so "Dereference is too much
nested" falls where the kernel's does.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum, auto

from uprobes.lang import messages as msg
from uprobes.lang import types
from uprobes.lang.ast import (
    Arg,
    Comm,
    Deref,
    FetchArg,
    FetchExpr,
    FetchType,
    FileOffset,
    Immediate,
    ImmString,
    Memory,
    Register,
    RetVal,
    StackEntry,
    StackPointer,
    Step,
    Variable,
)
from uprobes.lang.messages import TokenError
from uprobes.lang.numbers import is_alpha, is_digit, is_good_name, kstrtol, kstrtouint, kstrtoul

MAX_ARGSTR_LEN = 63
MAX_ARG_NAME_LEN = 32
MAX_ARRAY_LEN = 64
MAX_ARG_INDEX = 2048
"""$argN bound: the kernel's PARAM_MAX_STACK (THREAD_SIZE / sizeof(long))."""
FETCH_INSN_MAX = 16

REGISTERS = frozenset((
    "r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8",
    "bx", "cx", "dx", "si", "di", "bp", "ax", "orig_ax", "ip", "cs", "flags", "sp", "ss",
))
"""x86-64 regs_query_register_offset() names (arch/x86/kernel/ptrace.c);
ds/es/fs/gs exist only on 32-bit x86."""

REGISTER_ALIASES = {
    **{f"r{n}": n for n in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip", "flags")},
}
"""Whole registers as x86 assembly, perf and gdb spell them (`%rdi`), to the
kernel's pt_regs name (`di`): the same fetch, on either engine."""


def _subregisters() -> dict[str, tuple[str, int]]:
    """The low 32, 16 and 8 bits of a register, as x86 assembly names them -> (register,
    bits). `%ax`, `%si`... stay the kernel's names for the whole register."""
    out: dict[str, tuple[str, int]] = {}
    for reg in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp"):
        out[f"e{reg}"] = (reg, 32)
    out["eflags"] = ("flags", 32)
    for low8, reg in (("al", "ax"), ("bl", "bx"), ("cl", "cx"), ("dl", "dx"), ("sil", "si"),
                      ("dil", "di"), ("bpl", "bp"), ("spl", "sp")):
        out[low8] = (reg, 8)
    for n in range(8, 16):
        out.update({f"r{n}d": (f"r{n}", 32), f"r{n}w": (f"r{n}", 16), f"r{n}b": (f"r{n}", 8)})
    return out


SUBREGISTERS = _subregisters()
_HIGH_BYTES = {"ah": "ax", "bh": "bx", "ch": "cx", "dh": "dx"}
_TYPE_BITS = {**{t: int(t[1:]) for t in types.INT_TYPES}, "char": 8}

RESERVED_NAMES = frozenset((
    "common_type", "common_flags", "common_preempt_count", "common_pid", "common_tgid",
    "__probe_ip", "__probe_ret_ip", "__probe_func",
))


class Op(Enum):
    """The kind of the last fetch instruction: decides what may be stored."""

    REG = auto()
    STACK = auto()
    STACKP = auto()
    RETVAL = auto()
    IMM = auto()
    COMM = auto()
    ARG = auto()
    DATA = auto()
    DEREF = auto()
    UDEREF = auto()


@dataclass
class _Ctx:
    offset: int
    """The kernel's ctx->offset: where errors point, moved by dereferences."""
    is_return: bool
    slot: int = 0
    """Index of the current fetch instruction; slot FETCH_INSN_MAX-1 is END."""

    def next_slot(self) -> bool:
        self.slot += 1
        return self.slot != FETCH_INSN_MAX - 1


def parse_fetcharg(token: str, index: int, is_return: bool,
                   used: Collection[str] = ()) -> FetchArg:
    """Parse the `index`-th (0-based) fetcharg `token`; `used` holds the
    names of the arguments before it. Raises TokenError (offset in token)."""
    eq = token.find("=")
    if eq >= 0:
        if eq > MAX_ARG_NAME_LEN:
            raise TokenError(msg.ARG_NAME_TOO_LONG, 0)
        if eq == 0:
            raise TokenError(msg.NO_ARG_NAME, 0)
        name, body, boff = token[:eq], token[eq + 1:], eq + 1
    else:
        name, body, boff = f"arg{index + 1}", token, 0
    if not is_good_name(name):
        raise TokenError(msg.BAD_ARG_NAME, 0)
    if name in RESERVED_NAMES or name in used:
        raise TokenError(msg.USED_ARG_NAME, 0)
    if len(body) > MAX_ARGSTR_LEN:
        raise TokenError(msg.ARG_TOO_LONG, boff)
    if not body:
        raise TokenError(msg.NO_ARG_BODY, boff)
    var = parse_variable(body.split(":", 1)[0])
    if var is not None:
        return _variable_arg(var, body, eq < 0, name, boff, used)

    expr_text, type_text, array, toff = _split_type(body, boff)
    is_str_source = expr_text in ("$comm", "$COMM") or expr_text.startswith('\\"')
    if is_str_source:
        if array is not None or (type_text is not None and type_text != "string"):
            raise TokenError(msg.NEED_STRING_TYPE, boff + toff)
    elif type_text is not None and not types.known_type(type_text):
        raise TokenError(msg.BAD_TYPE, boff + toff)

    if expr_text[:1] == "%" and expr_text[1:] in SUBREGISTERS:
        expr_text, type_text = _subregister(expr_text[1:], type_text, boff, toff)
    ctx = _Ctx(offset=boff, is_return=is_return)
    expr, op = _parse_expr(expr_text, ctx)
    # Past this point the kernel reports type errors at ctx->offset + the
    # type's offset, and a dereference has moved ctx->offset to its inside.
    ftype = _finalize(op, type_text, array, ctx, ctx.offset + toff, is_str_source)
    return FetchArg(name, expr, ftype, text=body)


_VARIABLE = re.compile(r"(\**)([A-Za-z_]\w*)((?:->\w+|\.\w+|\[\d+\])*)")
_STEP = re.compile(r"->(\w+)|\.(\w+)|\[(\d+)\]")


def parse_variable(text: str) -> Variable | None:
    """`[*]NAME(->FIELD|.FIELD|[N])*`, `$params` or `$vars` -> Variable; None
    for any other text (which then gets the kernel's own verdict)."""
    if text in ("$params", "$vars"):
        return Variable(text)
    m = _VARIABLE.fullmatch(text)
    if m is None:
        return None
    steps = [Step("->", f) if f else Step(".", g) if g else Step("[]", index=int(i))
             for f, g, i in _STEP.findall(m.group(3))]
    # C's precedence: `*s->next` is `*(s->next)`; the stars apply last.
    steps += [Step("*")] * len(m.group(1))
    return Variable(m.group(2), tuple(steps))


def variable_arg_name(text: str) -> str:
    """The default name of a variable's argument: a C identifier (the kernel
    names record fields so), `s->in.x` -> `s_in_x`, `arr[3]` -> `arr_3`,
    `*p` -> `p_deref`, cut to the kernel's length."""
    stars = len(text) - len(text.lstrip("*"))
    name = re.sub(r"\W+", "_", text.lstrip("*").lstrip("$")).rstrip("_") or "var"
    name += "_deref" * stars
    return name[:MAX_ARG_NAME_LEN]


def _variable_arg(var: Variable, body: str, unnamed: bool, name: str, boff: int,
                  used: Collection[str]) -> FetchArg:
    """A variable's fetcharg: its type, if written, is checked now and fetched
    instead of the DWARF type's."""
    type_text = body.partition(":")[2] or None
    ftype = types.DEFAULT_TYPE
    if type_text is not None:
        expr_text, tt, array, toff = _split_type(body, boff)
        if tt is None or not types.known_type(tt):
            raise TokenError(msg.BAD_TYPE, boff + toff)
        bitfield = types.parse_bitfield(tt) if tt[:1] == "b" else None
        if tt[:1] == "b" and bitfield is None:
            raise TokenError(msg.BAD_BITFIELD, boff + toff)
        ftype = types.make_type(tt, bitfield, array)
    if unnamed:
        base = name = variable_arg_name(body.split(":", 1)[0])
        n = 1
        while name in RESERVED_NAMES or name in used:  # `n=%di n`: the second is n_1
            name = f"{base[:MAX_ARG_NAME_LEN - 2 - len(str(n))]}_{n}"
            n += 1
    return FetchArg(name, var, ftype, text=body)


def _subregister(name: str, type_text: str | None, boff: int, toff: int) -> tuple[str, str]:
    """`%eax` is `%ax` read as 32 bits: the whole register's fetch with a type no
    wider than the part (x32 when none is given), as the kernel stores a u32 of
    a register (its low half).  -> (expression, type)."""
    reg, bits = SUBREGISTERS[name]
    if type_text is None:
        return f"%{reg}", f"x{bits}"
    wide = _TYPE_BITS.get(type_text) or (types.container_bits(type_text)
                                         if type_text[:1] == "b" else None)
    if wide is not None and wide > bits:
        raise TokenError(msg.SUBREGISTER_TYPE, boff + toff,
                         f"%{name} is the low {bits} bits of %{reg}; read it as :u{bits} "
                         f"or narrower, or write %{reg}:{type_text} for the whole register")
    return f"%{reg}", type_text


def _register(name: str, ctx: _Ctx) -> Register:
    """`%NAME`: the kernel's names, and whole registers as x86 spells them."""
    if name in REGISTERS:
        return Register(name)
    if name in REGISTER_ALIASES:
        return Register(REGISTER_ALIASES[name])
    if name in SUBREGISTERS:
        reg, bits = SUBREGISTERS[name]
        also = f" (or %r{reg})" if f"r{reg}" in REGISTER_ALIASES else ""
        raise TokenError(msg.SUBREGISTER_ADDRESS, ctx.offset,
                         f"%{name} is the low {bits} bits of %{reg}; an address is the whole "
                         f"register: %{reg}{also}")
    if name in _HIGH_BYTES:
        reg = _HIGH_BYTES[name]
        detail = f"%{name} is bits 8-15 of %{reg}: write %{reg}:b8@8/64"
    elif name.lower() in REGISTERS or name.lower() in REGISTER_ALIASES \
            or name.lower() in SUBREGISTERS:
        detail = f"%{name}: register names are lower case (%{name.lower()})"
    else:
        detail = (f"%{name} is not a register a probe can read on x86-64; use %ax %bx %cx "
                  "%dx %si %di %bp %sp %r8-%r15 %ip %flags %cs %ss %orig_ax, or %rax-style names")
    raise TokenError(msg.BAD_REG_NAME, ctx.offset, detail)


def _split_type(body: str, boff: int) -> tuple[str, str | None, int | None, int]:
    """-> (expression, type text without [N], N, offset of the type in body)."""
    colon = body.find(":")
    if colon < 0:
        return body, None, None, 0
    expr, type_text = body[:colon], body[colon + 1:]
    array: int | None = None
    bracket = type_text.find("[")
    if bracket >= 0:
        inner_at = colon + 1 + bracket + 1
        inner = type_text[bracket + 1:]
        close = inner.find("]")
        if close < 0:
            raise TokenError(msg.ARRAY_NO_CLOSE, boff + inner_at + len(inner))
        if close + 1 != len(inner):
            raise TokenError(msg.BAD_ARRAY_SUFFIX, boff + inner_at + close + 1)
        count = kstrtouint(inner[:close])
        if not count:
            raise TokenError(msg.BAD_ARRAY_NUM, boff + inner_at)
        if count > MAX_ARRAY_LEN:
            raise TokenError(msg.ARRAY_TOO_BIG, boff + inner_at)
        array = count
        type_text = type_text[:bracket]
    return expr, type_text, array, colon + 1


def _parse_expr(s: str, ctx: _Ctx) -> tuple[FetchExpr, Op]:
    head = s[:1]
    if head == "$":
        return _parse_var(s[1:], ctx)
    if head == "%":
        return _register(s[1:], ctx), Op.REG
    if head == "@":
        return _parse_memory(s, ctx)
    if head in ("+", "-"):
        return _parse_deref(s, ctx)
    if head == "\\":
        return _parse_immediate(s, ctx)
    # Live 6.x kernels also send '(' (a BTF typecast) to the BTF branch.
    if head and (is_alpha(head) or head in "_("):
        raise TokenError(msg.NOSUP_BTFARG, ctx.offset)
    raise TokenError(msg.BAD_FETCH_ARG, ctx.offset)


def _parse_var(var: str, ctx: _Ctx) -> tuple[FetchExpr, Op]:
    # Prefix matches, as the kernel's str_has_prefix(): `$retvalue` is $retval.
    if var.startswith("retval"):
        if not ctx.is_return:
            raise TokenError(msg.RETVAL_ON_PROBE, ctx.offset)
        return RetVal(), Op.RETVAL
    if var.startswith("stack"):
        rest = var[5:]
        if not rest:
            return StackPointer(), Op.STACKP
        n = kstrtoul(rest, 10) if is_digit(rest[0]) else None
        if n is None:
            raise TokenError(msg.BAD_VAR, ctx.offset)
        return StackEntry(n), Op.STACK
    if var in ("comm", "COMM"):
        return Comm(), Op.COMM
    if var.startswith("arg"):
        n = kstrtoul(var[3:], 10)
        if n is None:
            raise TokenError(msg.BAD_VAR, ctx.offset)
        if n == 0 or n > MAX_ARG_INDEX:
            raise TokenError(msg.BAD_ARG_NUM, ctx.offset)
        return Arg(n), Op.ARG
    raise TokenError(msg.BAD_VAR, ctx.offset)


def _parse_memory(s: str, ctx: _Ctx) -> tuple[FetchExpr, Op]:
    expr: FetchExpr
    if is_digit(s[1:2]):
        address = kstrtoul(s[1:])
        if address is None:
            raise TokenError(msg.BAD_MEM_ADDR, ctx.offset)
        expr = Memory(address)
    elif s[1:2] == "+":
        file_offset = kstrtol(s[2:])
        if file_offset is None:
            raise TokenError(msg.BAD_FILE_OFFS, ctx.offset)
        expr = FileOffset(file_offset)
    else:
        raise TokenError(msg.SYM_ON_UPROBE, ctx.offset)
    if not ctx.next_slot():
        raise TokenError(msg.TOO_MANY_OPS, ctx.offset)
    return expr, Op.DEREF


def _parse_deref(s: str, ctx: _Ctx) -> tuple[FetchExpr, Op]:
    user = s[1:2] == "u"
    t = s[0] + s[2:] if user else s
    if t[0] == "+":
        t = t[1:]
    paren = t.find("(")
    if paren < 0:
        raise TokenError(msg.DEREF_NEED_BRACE, ctx.offset)
    offset = kstrtol(t[:paren])
    if offset is None:
        raise TokenError(msg.BAD_DEREF_OFFS, ctx.offset)
    # The kernel's arithmetic, including its off-by-one after 'u' and '+-'.
    ctx.offset += paren + 1 + (0 if t[0] == "-" else 1)
    inner = t[paren + 1:]
    close = inner.rfind(")")
    if close < 0:
        raise TokenError(msg.DEREF_OPEN_BRACE, ctx.offset + len(inner))
    here = ctx.offset
    base, op = _parse_expr(inner[:close], ctx)
    ctx.offset = here
    if op in (Op.COMM, Op.DATA):
        raise TokenError(msg.COMM_CANT_DEREF, ctx.offset)
    if not ctx.next_slot():
        raise TokenError(msg.TOO_MANY_OPS, ctx.offset)
    return Deref(offset, base, user), (Op.UDEREF if user else Op.DEREF)


def _parse_immediate(s: str, ctx: _Ctx) -> tuple[FetchExpr, Op]:
    if s[1:2] == '"':
        text = s[2:]
        if not text or text[-1] != '"':
            raise TokenError(msg.IMMSTR_NO_CLOSE, ctx.offset + 2 + len(text))
        return ImmString(text[:-1]), Op.DATA
    digits = s[1:]
    value: int | None = None
    if is_digit(digits[:1]):
        value = kstrtoul(digits)
    elif digits[:1] == "-":
        value = kstrtol(digits)
    elif digits[:1] == "+":
        value = kstrtol(digits[1:])
    if value is None:
        raise TokenError(msg.BAD_IMM, ctx.offset + 1)
    return Immediate(value), Op.IMM


def _finalize(op: Op, type_text: str | None, array: int | None, ctx: _Ctx,
              type_at: int, is_str_source: bool) -> FetchType:
    """The store/modify/loop stage (finalize_fetch_insn): which expressions
    may carry which type, and the instruction budget."""
    if is_str_source:
        ftype = FetchType("string", explicit=type_text is not None)
        base = "string"
    elif type_text is None:
        ftype, base = types.DEFAULT_TYPE, "x64"
    else:
        ftype, base = FetchType("x64"), type_text
    if base in types.STRING_TYPES:
        if op not in (Op.DEREF, Op.UDEREF, Op.IMM, Op.COMM, Op.DATA):
            raise TokenError(msg.BAD_STRING, type_at)
        if (op in (Op.IMM, Op.COMM, Op.DATA) or array) and not ctx.next_slot():
            raise TokenError(msg.TOO_MANY_OPS, ctx.offset)
        store_is_mem = True
    elif op in (Op.DEREF, Op.UDEREF):
        store_is_mem = op is Op.DEREF
    else:
        if not ctx.next_slot():
            raise TokenError(msg.TOO_MANY_OPS, ctx.offset)
        store_is_mem = False
    bitfield = None
    if type_text is not None and type_text[:1] == "b":
        bitfield = types.parse_bitfield(type_text)
        if bitfield is None or not ctx.next_slot() \
                or bitfield.width + bitfield.offset > bitfield.container:
            raise TokenError(msg.BAD_BITFIELD, type_at)
    if array:
        if not store_is_mem:
            raise TokenError(msg.BAD_STRING, type_at)
        if not ctx.next_slot():
            raise TokenError(msg.TOO_MANY_OPS, ctx.offset)
    if type_text is None:
        return ftype
    return types.make_type(base, bitfield, array)
