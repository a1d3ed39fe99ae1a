"""The x86-64 ABIs a probe's `$argN` follows: lowered to registers and
stack entries, which both engines fetch the same way.

Plain probes follow the SysV x86-64 ABI at function entry: `$arg1..6` are
%di %si %dx %cx %r8 %r9, `$argN` for N > 6 is `$stack(N-6)` ($stack0 is the
return address). USDT probes take `$argN` from the N-th SDT operand
(`-4@%eax`, `8@-16(%rbp)`, `-4@$5`); its size and sign give the type when
the user wrote none. Go functions take their arguments in Go's register
ABI (`go_register_args`); a return probe placed on a function's `ret`s
fetches what the uretprobe would have (`at_ret_site`).
"""

from __future__ import annotations

import re

from uprobes.errors import SpecError
from uprobes.lang.ast import (
    Arg,
    Bitfield,
    Deref,
    FetchArg,
    FetchExpr,
    FetchType,
    Immediate,
    Memory,
    Register,
    RetVal,
    StackEntry,
    StackPointer,
    UsdtTarget,
)
from uprobes.lang.numbers import kstrtol, kstrtoul
from uprobes.model.event import ProbeInfo
from uprobes.model.probe import ResolvedProbe, UsdtArg

SYSV_ARG_REGISTERS = ("di", "si", "dx", "cx", "r8", "r9")
# Go's internal register ABI on amd64 (gc go1.17+): integer arguments in
# these, in order; assembly functions keep ABI0 (all on the stack).
GO_ARG_REGISTERS = ("ax", "bx", "cx", "di", "si", "r8", "r9", "r10", "r11")

_GPR = {"ax": "ax", "bx": "bx", "cx": "cx", "dx": "dx", "si": "si", "di": "di",
        "bp": "bp", "sp": "sp"}
_HIGH_BYTE = {"ah": "ax", "bh": "bx", "ch": "cx", "dh": "dx"}


def x86_register(name: str) -> tuple[str, int] | None:
    """An x86-64 register name of any width (`rax eax ax al r8d r9w r10b
    sil rip`) -> (kernel pt_regs name, width in bits); None if unknown.
    The high-byte registers (`ah`...) are handled by the caller."""
    n = name.lower()
    m = re.fullmatch(r"r(\d+)([dwbl]?)", n)
    if m and 8 <= int(m.group(1)) <= 15:
        return f"r{int(m.group(1))}", {"": 64, "d": 32, "w": 16, "b": 8, "l": 8}[m.group(2)]
    if n in ("rip", "eip", "ip"):
        return "ip", 64
    if n in ("rflags", "eflags", "flags"):
        return "flags", 64
    if len(n) == 3 and n[0] in "re" and n[1:] in _GPR:
        return _GPR[n[1:]], 64 if n[0] == "r" else 32
    if n in _GPR:
        return _GPR[n], 16
    if len(n) == 2 and n[1] == "l" and n[0] + "x" in _GPR:
        return _GPR[n[0] + "x"], 8
    if n in ("sil", "dil", "bpl", "spl"):
        return _GPR[n[:2]], 8
    return None


def sysv_arg(index: int) -> FetchExpr:
    """Where the `index`-th (1-based) integer argument is at function entry."""
    if index <= len(SYSV_ARG_REGISTERS):
        return Register(SYSV_ARG_REGISTERS[index - 1])
    return StackEntry(index - len(SYSV_ARG_REGISTERS))


def go_register_args(arg: FetchArg, abi0: bool = False) -> FetchArg:
    """`arg` with every `$argN` made Go's N-th argument register (an entry
    probe on a function of a Go binary that passes arguments in registers),
    or with `abi0` (an assembly function) its N-th stack word."""
    def swap(expr: FetchExpr) -> FetchExpr:
        if isinstance(expr, Arg) and abi0:
            return StackEntry(expr.index)
        if isinstance(expr, Arg):
            if expr.index > len(GO_ARG_REGISTERS):
                raise SpecError(f"$arg{expr.index}: Go passes {len(GO_ARG_REGISTERS)} integer "
                                "arguments in registers; fetch later ones from the stack "
                                "(+N(%sp))", arg.text or f"$arg{expr.index}", 0)
            return Register(GO_ARG_REGISTERS[expr.index - 1])
        if isinstance(expr, Deref):
            return Deref(expr.offset, swap(expr.base), expr.user)
        return expr
    return FetchArg(arg.name, swap(arg.expr), arg.type, arg.text)


def sdt_operand(arg: UsdtArg) -> tuple[FetchExpr, FetchType | None]:
    """An SDT note operand -> (fetch expression, its type from size/sign).

    Raises SpecError for operands uprobe_events cannot express."""
    text = arg.text.strip()
    size, signed = arg.size, arg.signed
    m = re.fullmatch(r"(-?)(\d+)@(.*)", text)
    if m:
        signed, size, text = m.group(1) == "-", int(m.group(2)), m.group(3)
    ftype = FetchType(f"{'s' if signed else 'u'}{size * 8}") if size in (1, 2, 4, 8) else None
    if text.startswith("%"):
        reg = text[1:].lower()
        if reg in _HIGH_BYTE:
            return Register(_HIGH_BYTE[reg]), FetchType("bitfield", Bitfield(8, 8, 64))
        known = x86_register(reg)
        if known is None:
            raise _no_equivalent(arg, "unknown register")
        return Register(known[0]), ftype or FetchType(f"u{known[1]}")
    if text.startswith("$"):
        value = kstrtol(text[1:])
        if value is None:
            raise _no_equivalent(arg, "bad constant")
        return Immediate(value), ftype
    m = re.fullmatch(r"([-+]?(?:0[xX][0-9a-fA-F]+|\d+))?\(%(\w+)\)", text)
    if m:
        known = x86_register(m.group(2))
        if known is None or known[0] == "ip":
            raise _no_equivalent(arg, "RIP-relative or unknown base register")
        disp = kstrtol(m.group(1) or "0")
        assert disp is not None
        return Deref(disp, Register(known[0])), ftype
    address = kstrtoul(text)
    if address is not None:
        return Memory(address), ftype
    raise _no_equivalent(arg, "indexed, segment or symbolic addressing")


def _no_equivalent(arg: UsdtArg, why: str) -> SpecError:
    return SpecError(f"USDT argument {arg.text!r} has no kernel fetcharg equivalent ({why})",
                     arg.text, 0)


def lower_expr(expr: FetchExpr, usdt: tuple[UsdtArg, ...] | None
               ) -> tuple[FetchExpr, FetchType | None]:
    """Replace every `$argN` in `expr`; the type is the USDT operand's, if any."""
    if isinstance(expr, Arg):
        if usdt is None:
            return sysv_arg(expr.index), None
        if expr.index > len(usdt):
            raise SpecError(f"$arg{expr.index}: this USDT probe has only {len(usdt)} arguments",
                            f"$arg{expr.index}", 0)
        return sdt_operand(usdt[expr.index - 1])
    if isinstance(expr, Deref):
        base, _ = lower_expr(expr.base, usdt)
        return Deref(expr.offset, base, expr.user), None
    return expr, None


def lower_fetcharg(arg: FetchArg, usdt: tuple[UsdtArg, ...] | None) -> FetchArg:
    expr, ftype = lower_expr(arg.expr, usdt)
    if arg.type.explicit or ftype is None:
        ftype = arg.type
    return FetchArg(arg.name, expr, ftype, arg.text)


def at_ret_site(expr: FetchExpr) -> FetchExpr | None:
    """`expr` as a uretprobe would see it, fetched instead at the function's
    `ret` (one instruction earlier: the return address is still at `%sp`).

    `$retval` is `%ax`; `%ip` (the address returned to) is `+0(%sp)`; the
    stack is one word deeper (`$stackN` -> `$stack(N+1)`, `+N(%sp)` ->
    `+(N+8)(%sp)`). None for the stack pointer itself (`$stack`, bare
    `%sp`): no fetcharg adds 8 to it.
    """
    if isinstance(expr, RetVal):
        return Register("ax")
    if isinstance(expr, Register) and expr.name == "ip":
        return Deref(0, Register("sp"))
    if isinstance(expr, StackEntry):
        return StackEntry(expr.index + 1)
    if isinstance(expr, Deref):
        if _is_stack_pointer(expr.base):
            return Deref(expr.offset + 8, Register("sp"), expr.user)
        base = at_ret_site(expr.base)
        return None if base is None else Deref(expr.offset, base, expr.user)
    return None if _is_stack_pointer(expr) else expr


def _is_stack_pointer(expr: FetchExpr) -> bool:
    return isinstance(expr, StackPointer) or (isinstance(expr, Register) and expr.name == "sp")


def probe_info(p: ResolvedProbe) -> ProbeInfo:
    """Display name, kind and argument types (after lowering: a USDT `$argN`
    takes the operand's size and sign) of a resolved probe."""
    usdt = p.usdt_args if isinstance(p.spec.target, UsdtTarget) else None
    args = tuple((a.name, lower_fetcharg(a, usdt).type) for a in p.args)
    return ProbeInfo(p.name, "r" if p.is_return else "p", args)
