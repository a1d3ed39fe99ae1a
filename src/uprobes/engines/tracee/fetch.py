"""Fetchargs evaluated in user space, to the value the kernel engine reports.

Each argument is compiled once, the way kernel/trace/trace_probe.c compiles
it into fetch instructions: a first stage (a register, `$stackN`, `$stack`,
`$retval`, an immediate, `$comm`, an immediate string, or the load base plus
a file offset for `@+OFF`), then a chain of 8-byte dereferences, then one
store (the raw value, memory of the type's size, or a string), then an
optional bitfield and an array loop. Per hit only the reads an argument
needs are made, one pread each (an array is one read).

The kernel's results, faults included (trace_uprobe.c, trace_probe_tmpl.h,
checked against the kernel engine by tests/test_ptrace_fetch.py):
- the last read of a number faulting gives 0 (copy_from_user zero-fills
  what it could not copy); a `$stackN` beyond the stack gives 0;
- an inner dereference faulting leaves the kernel's per-CPU buffer as the
  previous event left it (stale data): we give 0, or None for a string;
- strings are read up to 4095 bytes (MAX_STRING_SIZE with its NUL);
  longer ones, and those that fault, are None, and the record's string
  space is shared out as the kernel does (see `_StringSpace`);
- an immediate string (`\\"text"`) is None: uprobes copy strings with
  strncpy_from_user(), which refuses the kernel address the text lives at.
Reads go through /proc/PID/mem, which also reads PROT_NONE pages where the
kernel's copy_from_user() would fault; nothing else differs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

from uprobes.engines.tracee.fetch_strings import Text, TextArg, TextFetch, share_string_space
from uprobes.errors import SpecError
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
    UsdtTarget,
)
from uprobes.model.event import COMM_FIELD, MAX_ARGS, ArgValue
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.abi import lower_fetcharg

MASK64 = (1 << 64) - 1

REGISTER_FIELDS = {
    "ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx", "si": "rsi", "di": "rdi",
    "bp": "rbp", "sp": "rsp", "ip": "rip", "flags": "eflags", "orig_ax": "orig_rax",
    "cs": "cs", "ss": "ss", **{f"r{n}": f"r{n}" for n in range(8, 16)},
}
"""Kernel pt_regs names (what fetchargs say) -> `UserRegs` fields."""


class Readable(Protocol):
    """What fetching needs of `uprobes.sys.procmem.ProcessMemory`."""

    def read_upto(self, runtime_addr: int, n: int) -> bytes: ...


@dataclass
class FetchContext:
    """What a hit knows besides registers and memory.

    `comm` is the hitting thread's name (`$comm`); `file_base` the run-time
    address of file offset 0 of the probed file in this process: the kernel
    reads `@+OFF` at (probe address - probe file offset) + OFF. `vector`:
    the low 8 bytes of SSE register N (`xmmN`, where a float argument is),
    read from the thread on demand; None where none can be read."""

    comm: str
    file_base: int
    vector: Callable[[int], int] | None = None


Stage = Callable[[Any, Readable, FetchContext], "int | None"]
"""Registers, memory, context -> the value before the store; None when a
dereference faulted."""
Fetch = Callable[[Any, Readable, FetchContext], Any]


class ArgFetcher:
    """A resolved probe's fetchargs, compiled once, evaluated per hit.

    `regs` is the thread's registers as the kernel's handler sees them: for
    an entry probe `rip` is the probed instruction's address (not the int3's
    next byte); for a return probe `rip` is the address returned to and
    `rax` the return value. `with_comm_field` models the hidden `$comm` the
    kernel engine appends to every probe (it shares the string space)."""

    def __init__(self, probe: ResolvedProbe, with_comm_field: bool | None = None) -> None:
        usdt = probe.usdt_args if isinstance(probe.spec.target, UsdtTarget) else None
        args = [lower_fetcharg(a, usdt) for a in probe.args]
        if probe.is_return and usdt is None and any(_has_arg(a.expr) for a in probe.args):
            raise SpecError("$argN is not available on return probes", probe.spec.text, 0)
        if with_comm_field is None:
            with_comm_field = (len(args) < MAX_ARGS
                               and all(a.name != COMM_FIELD for a in args))
        self.names = tuple(a.name for a in args)
        self.reads_vectors = any(reads_vector_register(a.expr) for a in args)
        """Whether a hit needs `FetchContext.vector` (an argument in an SSE register)."""
        self._plain: list[tuple[str, Fetch]] = []
        self._texts: list[tuple[str | None, bool, TextFetch]] = []
        fixed = 0
        for a in args:
            fixed += _field_size(a.type)
            if a.type.is_string or isinstance(a.expr, (Comm, ImmString)):
                self._texts.append((a.name, a.type.array is not None, _compile_text(a)))
            else:
                self._plain.append((a.name, _compile_number(a)))
        if self._texts and with_comm_field:
            fixed += 4
            self._texts.append((None, False, _comm_text))
        self._fixed_size = fixed
        self._window = _plan_window(args)

    def fetch(self, regs: Any, mem: Readable, ctx: FetchContext) -> dict[str, ArgValue]:
        """The probe's argument values for this hit, by name, in order."""
        if self._window is not None:
            base, lo, span = self._window
            start = (base(regs) + lo) & MASK64
            mem = _Window(mem, start, mem.read_upto(start, span))
        got: dict[str, ArgValue] = {name: f(regs, mem, ctx) for name, f in self._plain}
        if self._texts:
            texts: list[TextArg] = [(name, is_array, f(regs, mem, ctx))
                                    for name, is_array, f in self._texts]
            got.update(share_string_space(texts, self._fixed_size))
            if self._plain:
                return {name: got[name] for name in self.names}
        return got


# ------------------------------------------------------------ one read for many

WINDOW_MAX = 1024
"""The most bytes one window read covers: a pread costs about the same for
8 bytes as for a kilobyte, and much more than slicing."""


class _Window:
    """Memory with one span read ahead: reads inside the bytes it got are
    slices, the rest (beyond a fault in the span too) read as usual."""

    __slots__ = ("mem", "start", "data")

    def __init__(self, mem: Readable, start: int, data: bytes) -> None:
        self.mem, self.start, self.data = mem, start, data

    def read_upto(self, runtime_addr: int, n: int) -> bytes:
        off = runtime_addr - self.start
        if 0 <= off and off + n <= len(self.data):
            return self.data[off:off + n]
        return self.mem.read_upto(runtime_addr, n)


def _first_read(expr: FetchExpr, t: FetchType) -> tuple[str, int, int] | None:
    """The first memory read an argument makes, if it is at a register plus
    an offset: (UserRegs field, offset, bytes); None for strings' own reads."""
    if isinstance(expr, StackEntry):
        return "rsp", 8 * expr.index, 8
    base, offsets = split_derefs(expr)
    if not offsets or isinstance(base, (Memory, FileOffset, Immediate)):
        return None
    field = {StackPointer: "rsp", RetVal: "rax"}.get(type(base))
    if isinstance(base, Register):
        field = REGISTER_FIELDS[base.name]
    if field is None or isinstance(base, StackEntry):
        return None
    if len(offsets) > 1:
        return field, offsets[0], 8
    if t.is_string:  # the string is AT base + offset; an array reads pointers there
        return (field, offsets[0], 8 * t.array) if t.array else None
    return field, offsets[0], t.size * (t.array or 1)


def _plan_window(args: list[FetchArg]) -> tuple[Callable[[Any], int], int, int] | None:
    """The register whose neighbourhood most arguments read first, and the
    span they read (at least two reads within WINDOW_MAX bytes), or None."""
    reads: dict[str, list[tuple[int, int]]] = {}
    for a in args:
        first = _first_read(a.expr, a.type)
        if first is not None:
            reads.setdefault(first[0], []).append(first[1:])
    best: tuple[int, str, int, int] | None = None
    for field, spans in reads.items():
        lo = min(off for off, _ in spans)
        hi = max(off + n for off, n in spans)
        if len(spans) >= 2 and hi - lo <= WINDOW_MAX and (best is None or len(spans) > best[0]):
            best = (len(spans), field, lo, hi - lo)
    return None if best is None else (attrgetter(best[1]), best[2], best[3])


# ------------------------------------------------------------ compiling

def reads_vector_register(expr: FetchExpr) -> bool:
    """Whether `expr` reads an SSE register (`xmmN`, from a DWARF location)."""
    base, _ = split_derefs(expr)
    return isinstance(base, Register) and base.name.startswith("xmm")


def _has_arg(expr: FetchExpr) -> bool:
    return isinstance(expr, Arg) or (isinstance(expr, Deref) and _has_arg(expr.base))


def _field_size(t: FetchType) -> int:
    """Bytes of the argument's fixed field in the kernel's record (a string
    is its u32 data location)."""
    return (4 if t.is_string else t.size) * (t.array or 1)


def split_derefs(expr: FetchExpr) -> tuple[FetchExpr, list[int]]:
    """`+A(+B(X))` -> (X, [B, A]); `@ADDR` and `@+OFF` end in a deref at 0."""
    offsets: list[int] = []
    while isinstance(expr, Deref):
        offsets.append(expr.offset)
        expr = expr.base
    offsets.reverse()
    if isinstance(expr, (Memory, FileOffset)):
        offsets.insert(0, 0)
    return expr, offsets


def _first(expr: FetchExpr) -> Stage:
    """The kernel's first stage (process_fetch_insn in trace_uprobe.c)."""
    if isinstance(expr, Register) and expr.name.startswith("xmm"):
        n = int(expr.name[3:])
        return lambda r, m, c: c.vector(n) if c.vector is not None else None
    if isinstance(expr, Register):
        get = attrgetter(REGISTER_FIELDS[expr.name])
        return lambda r, m, c: get(r)
    if isinstance(expr, StackPointer):
        return lambda r, m, c: r.rsp
    if isinstance(expr, RetVal):
        return lambda r, m, c: r.rax
    if isinstance(expr, StackEntry):
        step = 8 * expr.index

        def stack_nth(r: Any, m: Readable, c: FetchContext) -> int:
            # get_user_stack_nth(): 0 when the slot cannot be read.
            b = m.read_upto((r.rsp + step) & MASK64, 8)
            return int.from_bytes(b, "little") if len(b) == 8 else 0
        return stack_nth
    if isinstance(expr, (Immediate, Memory)):
        value = (expr.value if isinstance(expr, Immediate) else expr.address) & MASK64
        return lambda r, m, c: value
    if isinstance(expr, FileOffset):
        off = expr.file_offset
        return lambda r, m, c: (c.file_base + off) & MASK64
    raise SpecError(f"cannot fetch {expr!r} with the ptrace engine")


def _chain(stage: Stage, offsets: list[int]) -> Stage:
    """Stage two: each dereference reads 8 bytes; a short read is a fault."""
    for off in offsets:
        def deref(r: Any, m: Readable, c: FetchContext, inner: Stage = stage,
                  off: int = off) -> int | None:
            v = inner(r, m, c)
            if v is None:
                return None
            b = m.read_upto((v + off) & MASK64, 8)
            return int.from_bytes(b, "little") if len(b) == 8 else None
        stage = deref
    return stage


def _compile_number(a: FetchArg) -> Fetch:
    base, offsets = split_derefs(a.expr)
    t = a.type
    if not offsets:  # FETCH_OP_ST_RAW: the value itself, cut to the type
        stage, conv = _first(base), converter(t)
        return lambda r, m, c: conv(stage(r, m, c))
    # FETCH_OP_ST_MEM: the last dereference becomes the store's read
    stage, last = _chain(_first(base), offsets[:-1]), offsets[-1]
    count, size = t.array or 1, t.size
    unpack = _unpacker(t, count)
    zero: ArgValue = [0] * count if t.array else 0

    def store_mem(r: Any, m: Readable, c: FetchContext) -> ArgValue:
        v = stage(r, m, c)
        if v is None:
            return zero
        b = m.read_upto((v + last) & MASK64, size * count)
        if len(b) < size * count:  # copy_from_user zero-fills what faulted
            b += bytes(size * count - len(b))
        return unpack(b)
    return store_mem


def converter(t: FetchType) -> Callable[[int | None], int]:
    bits = t.size * 8
    mask = (1 << bits) - 1
    if t.bitfield is not None:
        lshift = t.bitfield.container - t.bitfield.width - t.bitfield.offset
        rshift = t.bitfield.container - t.bitfield.width
        return lambda v: (((v or 0) << lshift) & mask) >> rshift
    if t.signed:
        sign = 1 << (bits - 1)
        return lambda v: (((v or 0) & mask) ^ sign) - sign
    return lambda v: (v or 0) & mask


def _unpacker(t: FetchType, count: int) -> Callable[[bytes], ArgValue]:
    code = {1: "b", 2: "h", 4: "i", 8: "q"}[t.size]
    fmt = struct.Struct("<" + str(count) + (code if t.signed else code.upper()))
    if t.bitfield is not None:
        conv = converter(t)
        if t.array:
            return lambda b: [conv(x) for x in fmt.unpack(b)]
        return lambda b: conv(fmt.unpack(b)[0])
    if t.array:
        return lambda b: list(fmt.unpack(b))
    return lambda b: fmt.unpack(b)[0]


def _comm_text(r: Any, m: Readable, c: FetchContext) -> list[Text]:
    return [Text.comm(c.comm)]


def _compile_text(a: FetchArg) -> TextFetch:
    """A string argument -> its elements as `Text`s (fetched, not yet given
    their share of the record's string space)."""
    if isinstance(a.expr, Comm):
        return _comm_text
    if isinstance(a.expr, ImmString):
        return lambda r, m, c: [Text.FAULT]
    base, offsets = split_derefs(a.expr)
    count = a.type.array
    if count is None:
        # FETCH_OP_ST_STRING replaces the last dereference: the string is AT
        # base + offset (an immediate is its address as it stands).
        stage = _chain(_first(base), offsets[:-1])
        last = offsets[-1] if offsets else 0

        def one(r: Any, m: Readable, c: FetchContext) -> list[Text]:
            v = stage(r, m, c)
            return [Text.INNER_FAULT if v is None else Text.read(m, (v + last) & MASK64)]
        return one
    if not offsets:
        # `\IMM:string[N]`: the kernel stores the first element, then its
        # array loop finds no dereference to repeat and gives up (-EILSEQ).
        stage = _first(base)
        return lambda r, m, c: [Text.read(m, stage(r, m, c) or 0)] + [Text.INNER_FAULT] * (
            count - 1)
    # An array of string pointers: element i is the string at *(p + 8 * i),
    # p being the address the last dereference reads.
    stage, last = _chain(_first(base), offsets[:-1]), offsets[-1]

    def many(r: Any, m: Readable, c: FetchContext) -> list[Text]:
        v = stage(r, m, c)
        if v is None:
            return [Text.INNER_FAULT] * count
        out: list[Text] = []
        for i in range(count):
            b = m.read_upto((v + last + 8 * i) & MASK64, 8)
            if len(b) != 8:  # the kernel stops the array here
                return out + [Text.INNER_FAULT] * (count - i)
            out.append(Text.read(m, int.from_bytes(b, "little")))
        return out
    return many
