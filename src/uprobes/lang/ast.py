"""The probe language as data: what a parsed line means, before any file is read.

Parse (text -> these frozen dataclasses) knows nothing of files; resolution
(`uprobes.resolve`) turns a `ProbeSpec` into probes keyed by inode and file
offset; engines place those. Offsets here are as written by the user: a
`FileTarget.offset` is a *file offset* (the kernel's uprobe offset), and
`symbol_offset` is added to the symbol's link-time address.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ProbeKind(Enum):
    ENTRY = "p"
    RETURN = "r"


# ---------------------------------------------------------------- targets

@dataclass(frozen=True)
class FileTarget:
    """`PATH:OFFSET` or `PATH:SYMBOL[+OFF]`.

    `path` is as written: an absolute or relative path, a library short name
    (`c`, `libc`, `libc.so.6`) or a program name looked up on PATH.
    Exactly one of `offset` (a file offset) and `symbol` is set, or, for a
    source line, neither: `source_file` and `line` (`PATH:app.c:42`). `symbol`
    may carry a version (`memcpy@GLIBC_2.14`) and glob characters (`str*`);
    with `line` it is `PATH:FUNC:+N`, N lines after the function's own line.
    """

    path: str
    offset: int | None = None
    symbol: str | None = None
    symbol_offset: int = 0
    ref_ctr_offset: int | None = None
    source_file: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class UsdtTarget:
    """`usdt:PATH:PROVIDER:NAME`; PROVIDER and NAME may be globs."""

    path: str
    provider: str
    name: str


@dataclass(frozen=True)
class VdsoTarget:
    """`:vdso:[/IMAGE:]SYMBOL[+OFF]` or `:vdso:[/IMAGE:]0xOFF` (offset into the
    vDSO image). `image` names the image by its ABI as the vdsofs proposal
    does (`64`, `32`, `x32`); None is the one the probed process maps."""

    offset: int | None = None
    symbol: str | None = None
    symbol_offset: int = 0
    image: str | None = None


@dataclass(frozen=True)
class PyTarget:
    """`py:[WHERE:]MODULE.QUALNAME`: a Python function, by its module and
    qualified name (`json.decoder.JSONDecoder.decode`, `__main__.work`,
    globs in the name: `app.Handler.*`). `where` names the interpreter:
    its file (`python3.11`, a path, a libpython) or a process id; None: the
    process of `-p` (resolution says which). Where the module ends and the
    qualified name begins is not written: resolution tries every split."""

    name: str
    where: str | None = None
    at: str = ""
    """`yield` (`%yield`: a generator or coroutine suspended by a yield or an
    await), `resume` (`%resume`: resumed after one), "": its call."""


Target = FileTarget | UsdtTarget | VdsoTarget | PyTarget


# ---------------------------------------------------------------- fetchargs

@dataclass(frozen=True)
class Register:
    """`%REG`: `name` is the kernel's x86-64 name (`ax`, `di`, `r8`, `ip`, ...)."""

    name: str


@dataclass(frozen=True)
class Memory:
    """`@ADDR`: an absolute user-space address."""

    address: int


@dataclass(frozen=True)
class FileOffset:
    """`@+OFFSET`: memory at a file offset of the probed file."""

    file_offset: int


@dataclass(frozen=True)
class StackEntry:
    """`$stackN`: the N-th word on the stack at the hit."""

    index: int


@dataclass(frozen=True)
class StackPointer:
    """`$stack`: the stack pointer."""


@dataclass(frozen=True)
class RetVal:
    """`$retval`: return probes only."""


@dataclass(frozen=True)
class Comm:
    """`$comm`: the task's command name."""


@dataclass(frozen=True)
class Arg:
    """`$argN` (N >= 1): the N-th integer argument of the SysV x86-64 ABI, or,
    in a USDT probe, the N-th SDT argument."""

    index: int


@dataclass(frozen=True)
class Deref:
    """`+|-[u]OFFS(FETCHARG)`: memory at `base + offset`."""

    offset: int
    base: FetchExpr
    user: bool = False


@dataclass(frozen=True)
class Immediate:
    r"""`\IMM`."""

    value: int


@dataclass(frozen=True)
class ImmString:
    r"""`\"text"`."""

    text: str


@dataclass(frozen=True)
class Step:
    """One step of a variable access: `.field` ("."), `->field` ("->"),
    `[index]` ("[]") or a leading `*` ("*")."""

    op: str
    field: str = ""
    index: int = 0


@dataclass(frozen=True)
class Variable:
    """A source variable by name, read through the program's DWARF: `n`,
    `s->name`, `s.in.x`, `arr[3]`, `*p`, `$params` (every parameter) or
    `$vars` (every parameter and local variable in scope).
    Resolution replaces it by fetches of registers and memory at the probe's
    address (`uprobes.resolve.dwarfargs`); no engine ever sees one."""

    name: str
    steps: tuple[Step, ...] = ()

    @property
    def is_params(self) -> bool:
        return self.name == "$params"

    @property
    def is_vars(self) -> bool:
        return self.name == "$vars"


FetchExpr = (
    Register | Memory | FileOffset | StackEntry | StackPointer | RetVal | Comm
    | Arg | Deref | Immediate | ImmString | Variable
)


@dataclass(frozen=True)
class Bitfield:
    """`b<width>@<offset>/<container>`: `container` in bits (8, 16, 32, 64)."""

    width: int
    offset: int
    container: int


@dataclass(frozen=True)
class ValueView:
    """How a value fetched by a kernel type reads in the source's terms (from
    its DWARF type): `kind` is one of "bool", "char", "enum", "float",
    "pointer", "string" (a `char *` or `char[N]`), "optimized_out" (no value
    at this address), "unsupported" (`note` says why), "elided" (a struct
    deeper than printed), "int" (a signed integer read as a bitfield) or
    "text" (a string made in user space, printed as it is: a `py:` entry's
    `args`).
    `enumerators` are an enum's (value, name) pairs; `type_name` the C type;
    `sign_bits`: a signed bitfield's width, to sign-extend its value by.

    A value made of several fetches names the arguments it takes besides
    its own in `parts` (they follow it, and print only as part of it):
    "text" (its own fetch the bytes as u64 words, its part their count: a
    Rust `&str` or `String`, a `std::string`), "list" (its own fetch the
    elements, each read by `element`, its part their count) and "variants"
    (its own fetch a Rust enum's discriminant, its parts the fields of every
    variant, `variants` saying which belong to which).

    `guards` name hidden string fetches (`uprobes.resolve.dwarfguards`): a
    witness (`$comm`), then one per memory read the value's fetch makes
    through a pointer, of the address that read reads. A guard that faulted,
    its witness not, says the value is unreadable, which prints `(fault)`
    (JSON null), never the zeros or stale bytes a faulting numeric fetch
    leaves; the guard of the value's own read (`own_guard`) only when the
    value read as zeros too.

    A "list" whose `element` has a `layout` holds structs (a Rust `Vec` of
    them): its own fetch is the raw bytes as u64 words, each element
    `stride` bytes, each member (name, byte offset, type) read from them."""

    kind: str
    type_name: str = ""
    enumerators: tuple[tuple[int, str], ...] = ()
    note: str = ""
    sign_bits: int = 0
    parts: tuple[str, ...] = ()
    element: ValueView | None = None
    variants: tuple[Variant, ...] = ()
    guards: tuple[str, ...] = ()
    layout: tuple[tuple[str, int, FetchType], ...] = ()
    stride: int = 0
    own_guard: bool = False
    """The last of `guards` is of the value's own read: its fault says the
    value is unreadable only where the value read as zeros."""


@dataclass(frozen=True)
class Variant:
    """One variant of a Rust enum with data: its name, the discriminant that
    selects it (None: any that selects no other), and its fields as
    (name, index in its enum's `parts`); tuple fields are named `__0`..."""

    name: str
    discr: int | None
    fields: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class FetchType:
    """A fetcharg type.

    `base` is one of `u8..u64 s8..s64 x8..x64 char string ustring` or
    `bitfield` (then `bitfield` is set); `array` is N for `TYPE[N]`.
    `explicit` is False when the type was defaulted (x64 on x86-64, string
    for $comm and immediate strings). `view`: how the value reads by its
    DWARF type (None: as the kernel prints the fetch type).
    """

    base: str
    bitfield: Bitfield | None = None
    array: int | None = None
    explicit: bool = True
    view: ValueView | None = None

    @property
    def is_string(self) -> bool:
        return self.base in ("string", "ustring")

    @property
    def size(self) -> int:
        """Bytes of one element (a string's element is its pointer: 8)."""
        if self.bitfield is not None:
            return self.bitfield.container // 8
        if self.base == "char":
            return 1
        if self.is_string:
            return 8
        return int(self.base[1:]) // 8

    @property
    def signed(self) -> bool:
        return self.base.startswith("s")


@dataclass(frozen=True)
class FetchArg:
    """`NAME=FETCHARG[:TYPE]`; `name` is given or generated (`arg1`, `arg2`...)."""

    name: str
    expr: FetchExpr
    type: FetchType
    text: str = ""


# ---------------------------------------------------------------- lines

@dataclass(frozen=True)
class ProbeSpec:
    """One `p`/`r` line (or a line without the `p`)."""

    kind: ProbeKind
    target: Target
    args: tuple[FetchArg, ...] = ()
    group: str | None = None
    event: str | None = None
    text: str = ""

    @property
    def is_return(self) -> bool:
        return self.kind is ProbeKind.RETURN


@dataclass(frozen=True)
class ClearSpec:
    """`-:[GRP/]EVENT`."""

    event: str
    group: str | None = None
    text: str = ""


Spec = ProbeSpec | ClearSpec
