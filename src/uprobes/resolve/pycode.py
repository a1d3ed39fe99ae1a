"""The code objects of a running CPython process (3.11 to 3.13), found by name: what
a `py:` probe's `module.qualname` resolves to in one process.

A Python function is a code object (`co_qualname`, `co_filename`,
`co_firstlineno`), and the interpreter reaches every function a program
defined from `sys.modules` (the interpreter's `modules` dict): a module's
dict holds its functions and classes, a class's `tp_dict` its methods (plain,
`staticmethod`, `classmethod`), a function's `func_code` its code, and a
code object's `co_consts` the code of every function nested in it, so
`outer.<locals>.inner` is found before `outer` ever runs. A decorator's
wrapper holds the function it wraps in its closure, which is followed too.

Dicts are read entry by entry from their keys object's entries array, never
by hashing a key, so the walk needs no hash function of the interpreter's.
A function is named as Python names it: its `__module__` (`func_module`)
and its code's `co_qualname`; the pattern is a glob over that full name.

The process runs while it is read, so anything read may be stale or
garbage (a dict being resized, an object being freed): every read is
bounded in size, every loop in count, the whole walk in reads
(`MAX_READS`); an object that cannot be read, or does not look like what
was expected, is skipped and counted, never followed.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from uprobes.errors import ResolveError, UprobesError
from uprobes.resolve.pylayout import SUPPORTED_OR, Layout, PythonLayoutError, version_text
from uprobes.resolve.pyprocess import Interpreter, Pages, Read, find_interpreter, read_str
from uprobes.sys.procmem import ProcessMemory

# Include/object.h's type flags (the same in every 3.11-3.13 build): what kind
# of object an instance of a type is, read from the type, so subclasses count.
_HEAPTYPE = 1 << 9
_TUPLE_SUBCLASS = 1 << 26
_UNICODE_SUBCLASS = 1 << 28
_DICT_SUBCLASS = 1 << 29
_TYPE_SUBCLASS = 1 << 31

MAX_READS = 200_000
"""Reads of /proc/PID/mem one walk may make (a page each, mostly): the bound
on its time whatever the process holds. The result says when it was hit."""
MAX_BYTES = 64 << 20
"""Bytes one walk may read (and keep, as pages): the bound on its memory."""
_MAX_INTERPRETERS = 64
_MAX_ENTRIES = 1 << 17
_MAX_LOG2_SIZE = 30
_MAX_DEPTH = 32
_MAX_TUPLE = 1 << 16
_MAX_BASES = 16
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class CodeObject:
    """One Python function's code, in one process."""

    runtime_addr: int
    module: str
    """The function's `__module__` (the module whose dict led to it when it has none)."""
    qualname: str
    filename: str
    firstlineno: int

    @property
    def name(self) -> str:
        """`module.qualname`, the name a pattern matches."""
        return f"{self.module}.{self.qualname}"


@dataclass(frozen=True)
class CodeObjects:
    """What a walk found: the code objects matching, and how it went."""

    pid: int
    python: str
    """The interpreter: `3.11.2 (/usr/bin/python3.11)`."""
    codes: tuple[CodeObject, ...]
    modules: int
    """Modules walked."""
    skipped: int
    """Objects skipped: unreadable, or not what their place promised."""
    reads: int
    truncated: bool
    """MAX_READS was reached: the walk stopped early."""


class _Budget(Exception):
    """MAX_READS reached (caught by the walk, never seen outside)."""


class _Skip(Exception):
    """An object that does not look like what was expected."""


def find_code_objects(pid: int, pattern: str = "*") -> CodeObjects:
    """The code objects of process `pid` whose `module.qualname` matches the
    glob `pattern`, read while it runs. ResolveError (one line) when `pid`
    runs no CPython whose objects uprobes can read."""
    try:
        interp = find_interpreter(pid)
    except PythonLayoutError as e:
        raise ResolveError(f"process {pid}: {e}") from None
    if interp is None:
        raise ResolveError(f"process {pid} runs no CPython interpreter that uprobes can read "
                           f"(Python functions need CPython {SUPPORTED_OR})")
    with ProcessMemory(pid) as mem:
        return code_objects_in(pid, interp, mem.read, pattern)


def code_objects_in(pid: int, interp: Interpreter, read: Read, pattern: str = "*",
                    max_reads: int = MAX_READS, max_bytes: int = MAX_BYTES) -> CodeObjects:
    """The code objects matching `pattern` in `interp`, through `read` (the
    process's memory: stopped or running)."""
    counted = _Counted(read, max_reads, max_bytes)
    walk = _Walk(Pages(counted), interp.layout, dict(interp.types), pattern)
    try:
        walk.run(interp.runtime_addr)
    except _Budget:
        walk.truncated = True
    python = f"{version_text(interp.hexversion)} ({interp.path})"
    return CodeObjects(pid, python, tuple(walk.found.values()), len(walk.modules), walk.skipped,
                       counted.count, walk.truncated)


class _Counted:
    """A Read that raises _Budget past `reads` calls or `size` bytes."""

    def __init__(self, read: Read, reads: int, size: int) -> None:
        self._read = read
        self._reads = reads
        self._size = size
        self.count = 0

    def __call__(self, addr: int, n: int) -> bytes:
        if self.count >= self._reads or n > self._size:
            raise _Budget
        self.count += 1
        self._size -= n
        return self._read(addr, n)


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 8], "little")


def _literal(pattern: str) -> str:
    """The part of `pattern` before its first wildcard: every match starts with it."""
    m = _GLOB.search(pattern)
    return pattern if m is None else pattern[:m.start()]


@dataclass
class _Walk:
    read: Pages
    lay: Layout
    types: dict[str, int]
    pattern: str
    found: dict[int, CodeObject] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    skipped: int = 0
    truncated: bool = False
    _seen: set[int] = field(default_factory=set)
    _type_flags: dict[int, int] = field(default_factory=dict)
    _is_module_type: dict[int, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._prefix = _literal(self.pattern)

    def _wanted(self, name: str) -> bool:
        """Whether a name's subtree can hold a match (a prefix either way)."""
        return name.startswith(self._prefix) or self._prefix.startswith(name)

    # ---------------------------------------------------------------- reads

    def _word(self, addr: int) -> int:
        return _u64(self.read(addr, 8), 0)

    def _type_of(self, obj: int) -> int:
        return self._word(obj + self.lay.object_type)

    def _flags(self, tp: int) -> int:
        flags = self._type_flags.get(tp)
        if flags is None:
            flags = self._type_flags[tp] = self._word(tp + self.lay.type_flags)
        return flags

    def _is_str(self, obj: int) -> bool:
        return bool(self._flags(self._type_of(obj)) & _UNICODE_SUBCLASS)

    def _str(self, obj: int) -> str | None:
        if not obj or not self._is_str(obj):
            return None
        return read_str(self.read, obj, self.lay)

    def _is_module(self, tp: int) -> bool:
        """`tp` is ModuleType or a subclass (by tp_base, a bounded chain)."""
        known = self._is_module_type.get(tp)
        if known is None:
            known, base = False, tp
            for _ in range(_MAX_BASES):
                if not base:
                    break
                if base == self.types.get("PyModule_Type"):
                    known = True
                    break
                base = self._word(base + self.lay.type_base)
            self._is_module_type[tp] = known
        return known

    def _entries(self, d: int) -> Iterator[tuple[int, int]]:
        """(key, value) of dict `d`, from its entries in order."""
        lay = self.lay
        if not d or not self._flags(self._type_of(d)) & _DICT_SUBCLASS:
            raise _Skip
        head = self.read(d, lay.dict_values + 8)
        keys, values = _u64(head, lay.dict_keys), _u64(head, lay.dict_values)
        if not keys:
            raise _Skip
        k = self.read(keys, lay.dictkeys_indices)
        log2_size, log2_index_bytes = k[lay.dictkeys_log2_size], k[lay.dictkeys_log2_index_bytes]
        n = int.from_bytes(k[lay.dictkeys_nentries:lay.dictkeys_nentries + 8], "little",
                           signed=True)
        # A keys object's fields obey these; garbage (a freed or resized
        # table read mid-change) rarely does, and is never followed.
        if log2_size > _MAX_LOG2_SIZE or not log2_size <= log2_index_bytes <= log2_size + 3 \
                or not 0 <= n <= min(1 << log2_size, _MAX_ENTRIES):
            raise _Skip
        general = k[lay.dictkeys_kind] == lay.dictkeys_general
        if general:
            size, key_at, value_at = (lay.dict_entry_size, lay.dict_entry_key,
                                      lay.dict_entry_value)
        else:
            size, key_at, value_at = (lay.dict_unicode_entry_size, lay.dict_unicode_entry_key,
                                      lay.dict_unicode_entry_value)
        start = keys + lay.dictkeys_indices + (1 << log2_index_bytes)
        entries = self.read(start, n * size) if n else b""
        split = self.read(values, n * 8) if values and n else None
        for i in range(n):
            key = _u64(entries, i * size + key_at)
            value = _u64(split, i * 8) if split is not None else \
                _u64(entries, i * size + value_at)
            if key and value:  # else a deleted entry
                yield key, value

    def _items(self, d: int, path: str) -> Iterator[tuple[str, int]]:
        """(path.key, value) of dict `d` that the pattern may want below.
        Once `path` starts with the pattern's literal part every key is
        wanted, and is not read (its path names nothing any more)."""
        covered = path.startswith(self._prefix)
        for key, value in self._entries(d):
            if covered:
                yield path, value
                continue
            name = self._guarded_str(key)
            if name is not None and self._wanted(f"{path}.{name}"):
                yield f"{path}.{name}", value

    def _guarded_str(self, obj: int) -> str | None:
        try:
            return self._str(obj)
        except UprobesError:
            self.skipped += 1
            return None

    # ---------------------------------------------------------------- walk

    def run(self, runtime: int) -> None:
        lay = self.lay
        interp = self._word(runtime + lay.runtime_interpreters_head)
        seen: set[int] = set()
        for _ in range(_MAX_INTERPRETERS):
            if not interp or interp in seen:
                break
            seen.add(interp)
            try:
                modules = self._word(interp + lay.interp_modules)
                for key, module in list(self._entries(modules)):
                    name = self._guarded_str(key)
                    if name is not None and self._wanted(name):
                        self._module(name, module)
                interp = self._word(interp + lay.interp_next)
            except (_Skip, UprobesError):
                self.skipped += 1
                break

    def _module(self, name: str, module: int) -> None:
        try:
            if not self._is_module(self._type_of(module)):
                return  # sys.modules may hold anything; only modules have md_dict
            self.modules.append(name)
            for path, value in self._items(self._word(module + self.lay.module_dict), name):
                self._visit(value, path, name, 0)
        except (_Skip, UprobesError):
            self.skipped += 1

    def _visit(self, obj: int, path: str, module: str, depth: int) -> None:
        """A value found at `path` (a dict key path under a module)."""
        if depth > _MAX_DEPTH or obj in self._seen:
            return
        self._seen.add(obj)
        try:
            self._classify(obj, path, module, depth)
        except (_Skip, UprobesError):
            self.skipped += 1

    def _classify(self, obj: int, path: str, module: str, depth: int) -> None:
        lay, types = self.lay, self.types
        tp = self._type_of(obj)
        if tp == types.get("PyFunction_Type"):
            self._function(obj, path, module, depth)
        elif tp == types.get("PyStaticMethod_Type"):
            self._visit(self._word(obj + lay.staticmethod_callable), path, module, depth + 1)
        elif tp == types.get("PyClassMethod_Type"):
            self._visit(self._word(obj + lay.classmethod_callable), path, module, depth + 1)
        elif tp == types.get("PyProperty_Type"):
            for at in (lay.property_get, lay.property_set, lay.property_del):
                accessor = self._word(obj + at)
                if accessor:
                    self._visit(accessor, path, module, depth + 1)
        elif self._flags(tp) & _TYPE_SUBCLASS and self._flags(obj) & _HEAPTYPE:
            # A class (a static type, defined in C, has no Python functions).
            for child, value in self._items(self._word(obj + lay.type_dict), path):
                self._visit(value, child, module, depth + 1)

    def _function(self, func: int, path: str, module: str, depth: int) -> None:
        lay = self.lay
        head = self.read(func, max(lay.func_code, lay.func_qualname, lay.func_module,
                                   lay.func_closure) + 8)
        own = self._guarded_str(_u64(head, lay.func_module))
        # functools.wraps gives a wrapper the wrapped function's names but
        # not its code: a function whose __qualname__ is not its code's runs
        # code defined elsewhere (found there, through its own module).
        renamed = self._guarded_str(_u64(head, lay.func_qualname))
        self._code(_u64(head, lay.func_code), own or module, 0, renamed)
        closure = _u64(head, lay.func_closure)
        if closure:  # a decorator's wrapper: the function it wraps is in a cell
            for cell in self._tuple(closure):
                if cell:
                    self._visit(self._word(cell + lay.cell_ref), path, module, depth + 1)

    def _tuple(self, t: int) -> list[int]:
        lay = self.lay
        if not self._flags(self._type_of(t)) & _TUPLE_SUBCLASS:
            raise _Skip
        n = self._word(t + lay.var_size)
        if not 0 <= n <= _MAX_TUPLE:
            raise _Skip
        items = self.read(t + lay.tuple_items, n * 8) if n else b""
        return [_u64(items, i * 8) for i in range(n)]

    def _code(self, code: int, module: str, depth: int, qualname_of: str | None = None) -> None:
        """A code object and, within the pattern, the code nested in its
        constants (`depth` deep); none of it when the function's
        `qualname_of` is not its own."""
        lay = self.lay
        if depth > _MAX_DEPTH or not code or self._type_of(code) != self.types.get("PyCode_Type"):
            raise _Skip
        end = max(lay.code_consts, lay.code_filename, lay.code_qualname, lay.code_firstlineno)
        head = self.read(code, end + 8)
        qualname = self._str(_u64(head, lay.code_qualname))
        if qualname is None:
            raise _Skip
        if qualname_of is not None and qualname_of != qualname:
            return
        full = f"{module}.{qualname}"
        if not self._wanted(full):
            return
        if code not in self.found and fnmatch.fnmatchcase(full, self.pattern):
            filename = self._str(_u64(head, lay.code_filename)) or "?"
            line = int.from_bytes(head[lay.code_firstlineno:lay.code_firstlineno + 4],
                                  "little", signed=True)
            self.found[code] = CodeObject(code, module, qualname, filename, line)
        code_type = self.types.get("PyCode_Type")
        for const in self._tuple(_u64(head, lay.code_consts)):
            if const and const not in self._seen:
                try:
                    if self._type_of(const) == code_type:
                        self._seen.add(const)
                        self._code(const, module, depth + 1)
                except (_Skip, UprobesError):
                    self.skipped += 1
