"""A resolved probe: what engines place. Identity is (st_dev, st_ino, file offset).

Three address spaces meet here; names say which one a number is in:
`file_offset` (the kernel's uprobe offset, inside the file), `link_addr`
(an address in the ELF's own view, as symbols give it) and `runtime_addr`
(where it sits in one process). Conversions live in `uprobes.elf.image`
(file <-> link) and `uprobes.sys.procfs` (file <-> runtime, per mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uprobes.lang.ast import FetchArg, ProbeKind, ProbeSpec
from uprobes.model.pyguard import PyGuard


@dataclass(frozen=True, order=True)
class InodeKey:
    """A probed instruction in a file: the kernel's identity of a uprobe."""

    dev: int
    ino: int
    file_offset: int


@dataclass(frozen=True, order=True)
class VdsoKey:
    """A probed instruction in one process's vDSO (which has no inode)."""

    pid: int
    offset: int


ProbeKey = InodeKey | VdsoKey


@dataclass(frozen=True)
class UsdtArg:
    """One SDT argument as the note spells it (`-4@%eax`, `8@-16(%rbp)`, `$5`)."""

    size: int
    signed: bool
    text: str


@dataclass(frozen=True)
class ResolvedProbe:
    """One probe point from one spec (a glob gives several).

    `path` opens the very file `key` names (absolute; may be a
    `/proc/PID/root/...` path). `event` and `group` are final names.
    `args` are the spec's fetchargs, with `$argN` still symbolic: each engine
    turns them into what it fetches (the kernel engine into `%di`... or the
    USDT operand, through `uprobes.resolve.abi`).

    A return probe has `ret_sites`: the file offsets of its function's `ret`s,
    where engines place it as entry-style probes that see what a uretprobe
    would (`uprobes.resolve.retsites`); or None, and `uretprobe_reason` says
    why the kernel's uretprobe is used instead (None when the user asked for it).
    """

    spec: ProbeSpec
    key: ProbeKey
    path: str
    file_offset: int
    kind: ProbeKind
    group: str
    event: str
    args: tuple[FetchArg, ...]
    symbol: str | None = None
    symbol_offset: int = 0
    link_addr: int | None = None
    ref_ctr_offset: int | None = None
    usdt_args: tuple[UsdtArg, ...] = ()
    notes: tuple[str, ...] = field(default=())
    ret_sites: tuple[int, ...] | None = None
    uretprobe_reason: str | None = None
    guard: str | None = None
    """A condition (the `--if` language, on this probe's own fetchargs) a hit
    must meet to be a hit of this probe at all: a `py:` function's probes sit
    in the interpreter's eval loop, where every Python function passes, and
    the guard keeps that function's. Every engine tests it where it tests a
    filter (the kernel in its event filter, the ptrace engine per hit)."""
    py_guard: PyGuard | None = None
    computed_gotos: tuple[int, ...] = ()
    """Link addresses of the tables the probed function's computed gotos
    read, when resolution knows them (a `py:` probe's eval loop reads
    CPython's dispatch table, `opcode_targets`): where a jump patch in
    that function must not land (engines/trapfree/gotos.py)."""
    """The same guard as reads and compares the program's code can make
    (model/pyguard.py), when the names allow it: the trap-free engine
    tests it in the jump's code. None: only the text guard."""
    alias: str | None = None
    """The name this probe shares with the other places of one function (a
    `py:` function starts at two handlers of the eval loop): shown and
    counted as one. None: `GROUP/EVENT`."""

    @property
    def is_return(self) -> bool:
        return self.kind is ProbeKind.RETURN

    @property
    def name(self) -> str:
        return self.alias or f"{self.group}/{self.event}"
