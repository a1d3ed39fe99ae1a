"""Where a variable is at one address, from its DWARF location.

A location (an expression, or a list of them by address range) is evaluated
symbolically at the probe's address into a `Place`: memory at a register
plus an offset (`DW_OP_breg*`, `DW_OP_fbreg` over the frame base,
`DW_OP_call_frame_cfa` from the CFI), memory at a static's link address
(`DW_OP_addr`), a value in a register (`DW_OP_reg*`), a computed or constant
value (`DW_OP_stack_value`, `DW_OP_implicit_value`, `DW_AT_const_value`),
pieces of those (`DW_OP_piece`), or nothing (optimized out: no entry of the
list covers the address, or an empty expression). Memory reads inside an
expression (`DW_OP_deref`) become fetch dereferences, so the result is what
both engines fetch. `DW_OP_entry_value` of a register is that register at
the function's first instruction, and unknown elsewhere (gdb then prints
`<optimized out>` too). Any other operation makes the place "unsupported",
with the operation's name: never a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uprobes.lang.ast import Deref, FetchExpr, FileOffset, Memory, Register

# x86-64 DWARF register numbers (System V psABI, figure 3.36) -> pt_regs names.
DWARF_REGISTERS = ("ax", "dx", "cx", "bx", "si", "di", "bp", "sp",
                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "ip")


def register_name(regno: int) -> str | None:
    """The kernel's name of DWARF register `regno`, None for one a fetch cannot read."""
    return DWARF_REGISTERS[regno] if 0 <= regno < len(DWARF_REGISTERS) else None


def value_register_name(regno: int) -> str | None:
    """The name of a register a value may be held in: a general register as
    the kernel names it, or an SSE register (`xmm0`..`xmm15`: floats and
    doubles), which only the ptrace engine reads."""
    if 17 <= regno <= 32:
        return f"xmm{regno - 17}"
    return register_name(regno)


def dwarf_register_label(regno: int) -> str:
    if 17 <= regno <= 32:
        return f"xmm{regno - 17}"
    if 33 <= regno <= 40:
        return f"st{regno - 33}"
    name = register_name(regno)
    return f"%{name}" if name else f"DWARF register {regno}"


@dataclass(frozen=True)
class Place:
    """Where a value's bytes are.

    kind "memory": at address `base + offset` (`base` None: `offset` is a
    constant address, a link-time address when `link`); "value": the value
    itself is `base + offset`; "pieces": `pieces` are (bytes, Place) in
    order; "optimized_out"; "unsupported" (`note` says why)."""

    kind: str
    base: FetchExpr | None = None
    offset: int = 0
    link: bool = False
    pieces: tuple[tuple[int, Place], ...] = ()
    note: str = ""
    width: int = 0
    """A value in a register of which only the low `width` bits are the
    value's (`DW_OP_and` with a mask: LLVM's bool in a wider register)."""

    def read(self, delta: int) -> FetchExpr:
        """The fetch of the 8 bytes at a memory place. `delta` turns a link
        address into what `@+OFF` takes (the probed segment's link address
        minus its file offset)."""
        assert self.kind == "memory"
        if self.base is None:
            return FileOffset(self.offset - delta) if self.link else Memory(self.offset)
        return Deref(self.offset, self.base)


OPTIMIZED_OUT = Place("optimized_out")

_Entry = tuple[FetchExpr | None, int, bool]


@dataclass
class Frame:
    """What an expression may refer to at the probe's address: the rule for
    the CFA there, the frame base of the function, whether the address is
    the function's first instruction (where entry values are known)."""

    cfa: Callable[[], tuple[str, int] | None]
    frame_base: Callable[[], Place] | None = None
    at_entry: bool = False
    delta: int = 0
    """The probed segment's link address minus its file offset (see `Place.read`)."""


def unsupported(note: str) -> Place:
    return Place("unsupported", note=note)


def evaluate(ops: list[Any], frame: Frame) -> Place:
    """The place a DWARF location expression (parsed by pyelftools) describes."""
    stack: list[_Entry] = []
    pieces: list[tuple[int, Place]] = []
    register: Place | None = None
    is_value = False
    width = 0  # a mask taken of the top of the stack (DW_OP_and), in bits
    for op in ops:
        name, args = op.op_name, op.args
        if name == "DW_OP_piece":
            pieces.append((int(args[0]), _close(stack, register, is_value, width)))
            stack, register, is_value, width = [], None, False, 0
            continue
        if register is not None:
            return unsupported(f"{name} after a register location")
        if width and not (name in _AFTER_A_MASK or name.startswith("DW_OP_lit")):
            return unsupported(f"{name} of a masked value")
        if name.startswith("DW_OP_lit") and name[9:].isdigit():
            stack.append((None, int(name[9:]), False))
        elif name.startswith("DW_OP_const") or name == "DW_OP_constu" or name == "DW_OP_consts":
            stack.append((None, int(args[0]), False))
        elif name == "DW_OP_addr":
            stack.append((None, int(args[0]), True))
        elif name.startswith("DW_OP_breg") or name == "DW_OP_bregx":
            regno, off = (int(args[0]), int(args[1])) if name == "DW_OP_bregx" \
                else (int(name[10:]), int(args[0]))
            reg = register_name(regno)
            if reg is None:
                return unsupported(f"{name} over {dwarf_register_label(regno)}")
            stack.append((Register(reg), off, False))
        elif name.startswith("DW_OP_reg") or name == "DW_OP_regx":
            regno = int(args[0]) if name == "DW_OP_regx" else int(name[9:])
            reg = value_register_name(regno)
            if reg is None:
                return unsupported(f"in register {dwarf_register_label(regno)}, which the "
                                   "engines cannot read")
            register = Place("value", Register(reg))
        elif name == "DW_OP_fbreg":
            if frame.frame_base is None:
                return unsupported("DW_OP_fbreg outside a function")
            fb = frame.frame_base()
            if fb.kind not in ("memory", "value") or fb.link:
                return fb if fb.kind in ("unsupported", "optimized_out") else \
                    unsupported(f"a frame base of kind {fb.kind}")
            stack.append((fb.base, fb.offset + int(args[0]), False))
        elif name == "DW_OP_call_frame_cfa":
            rule = frame.cfa()
            if rule is None:
                return unsupported("DW_OP_call_frame_cfa with no CFI rule at this address")
            stack.append((Register(rule[0]), rule[1], False))
        elif name == "DW_OP_plus_uconst":
            if not stack:
                return unsupported("malformed expression (DW_OP_plus_uconst on an empty stack)")
            base, off, link = stack.pop()
            stack.append((base, off + int(args[0]), link))
        elif name in ("DW_OP_plus", "DW_OP_minus"):
            if len(stack) < 2:
                return unsupported(f"malformed expression ({name} on a short stack)")
            b, a = stack.pop(), stack.pop()
            if b[0] is None and not b[2]:
                stack.append((a[0], a[1] + b[1] if name == "DW_OP_plus" else a[1] - b[1], a[2]))
            elif a[0] is None and not a[2] and name == "DW_OP_plus":
                stack.append((b[0], a[1] + b[1], b[2]))
            else:
                return unsupported(f"{name} of two run-time values")
        elif name == "DW_OP_deref" or (name == "DW_OP_deref_size" and int(args[0]) == 8):
            if not stack:
                return unsupported("malformed expression (DW_OP_deref on an empty stack)")
            base, off, link = stack.pop()
            stack.append((Place("memory", base, off, link).read(frame.delta), 0, False))
        elif name == "DW_OP_and":
            if len(stack) < 2:
                return unsupported("malformed expression (DW_OP_and on a short stack)")
            b, a = stack.pop(), stack.pop()
            mask = b[1] if b[0] is None and not b[2] else -1
            if mask <= 0 or mask & (mask + 1) or not isinstance(a[0], Register) or a[1] \
                    or a[2]:
                return unsupported("DW_OP_and other than of a register with a low-bits mask")
            width = min(width or 64, mask.bit_length())
            stack.append(a)
        elif name == "DW_OP_stack_value":
            is_value = True
        elif name == "DW_OP_implicit_value":
            size, data = int(args[0]), bytes(args[1])
            if size > 8:
                return unsupported(f"a {size}-byte DW_OP_implicit_value")
            stack.append((None, int.from_bytes(data[:size], "little", signed=True), False))
            is_value = True
        elif name in ("DW_OP_entry_value", "DW_OP_GNU_entry_value"):
            inner = args[0] if args else []
            sub = list(inner) if isinstance(inner, list) else []
            if not frame.at_entry:
                return OPTIMIZED_OUT
            if len(sub) == 1 and sub[0].op_name.startswith("DW_OP_reg"):
                regno = int(sub[0].op_name[9:]) if sub[0].op_name != "DW_OP_regx" \
                    else int(sub[0].args[0])
                reg = register_name(regno)
                if reg is None:
                    return unsupported(f"the entry value of {dwarf_register_label(regno)}")
                stack.append((Register(reg), 0, False))
            else:
                return unsupported(f"{name} of an expression")
        elif name == "DW_OP_nop":
            continue
        else:
            return unsupported(f"{name}")
    if pieces:
        if stack or register is not None:
            return unsupported("DW_OP_piece missing after the last piece")
        return Place("pieces", pieces=tuple(pieces))
    return _close(stack, register, is_value, width)


_AFTER_A_MASK = frozenset(("DW_OP_and", "DW_OP_stack_value", "DW_OP_const1u", "DW_OP_const2u",
                           "DW_OP_const4u", "DW_OP_const8u", "DW_OP_constu"))
"""What may follow a DW_OP_and: more masks of the same value, and its end."""


def _close(stack: list[_Entry], register: Place | None, is_value: bool, width: int = 0
           ) -> Place:
    if register is not None:
        return register
    if not stack:
        return OPTIMIZED_OUT
    base, off, link = stack[-1]
    if width and not is_value:
        return unsupported("a masked address (DW_OP_and without DW_OP_stack_value)")
    return Place("value" if is_value else "memory", base, off, link, width=width)


def location_at(df: Any, die: Any, link_addr: int, frame: Frame,
                attr_name: str = "DW_AT_location") -> Place:
    """Where the variable `die` is at `link_addr` (with `attr_name`
    DW_AT_frame_base: a function's frame base)."""
    attrs = die.attributes
    if attr_name not in attrs:
        const = attrs.get("DW_AT_const_value")
        if const is None:
            return OPTIMIZED_OUT
        if isinstance(const.value, int):
            return Place("value", None, const.value)
        data = bytes(const.value)
        if len(data) > 8:
            return unsupported(f"a {len(data)}-byte constant (DW_AT_const_value)")
        return Place("value", None, int.from_bytes(data, "little"))
    cu = die.cu
    attr = attrs[attr_name]
    try:
        loc = df.location_parser().parse_from_attribute(attr, cu.header["version"], die)
    except (ValueError, NotImplementedError) as exc:
        return unsupported(f"a location list pyelftools cannot read ({exc})")
    if hasattr(loc, "loc_expr") and not isinstance(loc, list):
        return evaluate(df.expr_parser(cu).parse_expr(loc.loc_expr), frame)
    expr = _listed(loc, cu, link_addr)
    return OPTIMIZED_OUT if expr is None else evaluate(df.expr_parser(cu).parse_expr(expr), frame)


def listed_at(df: Any, die: Any, link_addr: int) -> bool:
    """Whether the location list of `die` has an entry for `link_addr` (a
    single expression: whether it has one at all)."""
    attr = die.attributes.get("DW_AT_location")
    if attr is None:
        return False
    try:
        loc = df.location_parser().parse_from_attribute(attr, die.cu.header["version"], die)
    except (ValueError, NotImplementedError):
        return False
    if hasattr(loc, "loc_expr") and not isinstance(loc, list):
        return True
    return _listed(loc, die.cu, link_addr) is not None


def _listed(loc: list[Any], cu: Any, link_addr: int) -> Any | None:
    """The expression a location list gives for `link_addr`, None if none."""
    top = cu.get_top_DIE().attributes.get("DW_AT_low_pc")
    base = top.value if top is not None else 0
    for entry in loc:
        if hasattr(entry, "base_address"):
            base = entry.base_address
        elif hasattr(entry, "loc_expr"):
            lo, hi = entry.begin_offset, entry.end_offset
            if lo == -1:  # DW_LLE_default_location
                return entry.loc_expr
            if not entry.is_absolute:
                lo, hi = lo + base, hi + base
            if lo <= link_addr < hi:
                return entry.loc_expr
    return None
