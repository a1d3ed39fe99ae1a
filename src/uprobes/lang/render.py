"""Spec -> canonical text in our language; `parse(render(s)) == s` but for `text`.

Canonical: the kind token always written (`p`/`r`, never `%return`), offsets
in hex, dereference offsets in decimal, every argument named, a type only
where one was written.
"""

from __future__ import annotations

from uprobes.lang.ast import (
    Arg,
    ClearSpec,
    Comm,
    Deref,
    FetchArg,
    FetchExpr,
    FileOffset,
    Immediate,
    ImmString,
    Memory,
    PyTarget,
    Register,
    RetVal,
    Spec,
    StackEntry,
    StackPointer,
    Target,
    UsdtTarget,
    Variable,
    VdsoTarget,
)
from uprobes.lang.types import render_type


def render(spec: Spec) -> str:
    """The canonical line for `spec`."""
    if isinstance(spec, ClearSpec):
        return "-:" + (f"{spec.group}/" if spec.group is not None else "") + spec.event
    head = spec.kind.value
    if spec.group is not None or spec.event is not None:
        head += ":" + (f"{spec.group}/" if spec.group is not None else "") + (spec.event or "")
    return " ".join([head, render_target(spec.target), *map(render_fetcharg, spec.args)])


def render_target(target: Target) -> str:
    if isinstance(target, PyTarget):
        return "py:" + (f"{render_path(target.where)}:" if target.where else "") + target.name
    if isinstance(target, UsdtTarget):
        return f"usdt:{render_path(target.path)}:{target.provider}:{target.name}"
    if isinstance(target, VdsoTarget):
        image = f"/{target.image}:" if target.image else ""
        return f":vdso:{image}" + _location(target.offset, target.symbol, target.symbol_offset)
    if target.source_file is not None:
        return f"{render_path(target.path)}:{target.source_file}:{target.line}"
    text = f"{render_path(target.path)}:" + _location(target.offset, target.symbol,
                                                      target.symbol_offset)
    if target.line is not None:
        text += f":+{target.line}"
    if target.ref_ctr_offset is not None:
        text += f"(0x{target.ref_ctr_offset:x})"
    return text


def render_path(path: str) -> str:
    """PATH as the parser reads it back: in double quotes if it has
    whitespace, '::', a '"' first, or nothing."""
    plain = path and not any(c.isspace() for c in path) and "::" not in path \
        and not path.startswith('"')
    return path if plain else f'"{path}"'


def _location(offset: int | None, symbol: str | None, symbol_offset: int) -> str:
    if symbol is None:
        return f"0x{offset or 0:x}"
    return symbol + (f"+0x{symbol_offset:x}" if symbol_offset else "")


def render_fetcharg(arg: FetchArg) -> str:
    text = f"{arg.name}={render_expr(arg.expr)}"
    if arg.type.explicit:
        text += ":" + render_type(arg.type)
    return text


def render_variable(var: Variable) -> str:
    """`*s->in.x`, `arr[3]`: a variable access as written."""
    text, stars = var.name, 0
    for step in var.steps:
        if step.op == "*":
            stars += 1
        elif step.op == "[]":
            text += f"[{step.index}]"
        else:
            text += step.op + step.field
    return "*" * stars + text


def render_expr(expr: FetchExpr) -> str:
    """A fetch expression as the kernel (and our parser) reads it."""
    match expr:
        case Register(name):
            return f"%{name}"
        case Memory(address):
            return f"@0x{address:x}"
        case FileOffset(file_offset):
            sign = "-" if file_offset < 0 else ""
            return f"@+{sign}0x{abs(file_offset):x}"
        case StackEntry(index):
            return f"$stack{index}"
        case StackPointer():
            return "$stack"
        case RetVal():
            return "$retval"
        case Comm():
            return "$comm"
        case Arg(index):
            return f"$arg{index}"
        case Deref(offset, base, user):
            sign = "-" if offset < 0 else "+"
            return f"{sign}{'u' if user else ''}{abs(offset)}({render_expr(base)})"
        case Immediate(value):
            return f"\\{value}"
        case ImmString(text):
            return f'\\"{text}"'
        case Variable():
            return render_variable(expr)
    raise TypeError(f"not a fetch expression: {expr!r}")
