"""All the symbols one can name in a file, from every source, and lookups on them.

Sources, in order of preference: `.dynsym` (carries GNU versions), `.symtab`,
MiniDebugInfo (`.gnu_debugdata`), a separate debug file, and for a Go binary
without `.symtab`, the runtime's own function table (`.gopclntab`); a file with
no section headers has its dynamic symbols read through PT_DYNAMIC.  A symbol seen in
several sources is kept once (same name and address; a versioned record wins
over an unversioned one).
"""

from __future__ import annotations

import bisect
import difflib
import fnmatch
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from uprobes.elf.debuginfo import DEFAULT_DEBUG_DIRS, find_debug_file, minidebuginfo_symbols
from uprobes.elf.demangle import is_mangled
from uprobes.elf.dynamic import dynamic_symbols
from uprobes.elf.golang import go_symbols
from uprobes.elf.image import ElfImage, FileIdentity
from uprobes.elf.source_names import cxx_keys, mangled_needle, normalized, rust_keys
from uprobes.elf.symread import Symbol, read_symbols, split_version, symbol_sections

__all__ = ["Symbol", "SymbolTable", "ifunc_warning", "matches", "split_version"]

_COLD = re.compile(r"\.cold(\.\d+)?$")
_CACHE_SIZE = 32
_cache: OrderedDict[tuple[FileIdentity, tuple[str, ...]], SymbolTable] = OrderedDict()


def ifunc_warning(symbol: Symbol) -> str | None:
    """A one-line warning when probing `symbol` would probe an IFUNC resolver."""
    if not symbol.is_ifunc_resolver:
        return None
    return (f"{symbol.display_name} is an IFUNC: its address is the resolver, which runs once "
            "when the library is loaded; calls go to the implementation it picks "
            f"(probe e.g. '__{symbol.name}_*' instead)")


def _representative_rank(sym: Symbol) -> tuple[int, int, int, int, str]:
    """Sort key choosing which alias names an address: prefer what a user would type."""
    binding = {"global": 0, "weak": 1, "unique": 1}.get(sym.binding, 2)
    versioned_hidden = int(sym.version is not None and not sym.default_version)
    underscores = len(sym.name) - len(sym.name.lstrip("_"))
    return (binding, versioned_hidden, underscores, len(sym.name), sym.name)


class SymbolTable:
    """The defined symbols of one file, with lookups by name, pattern and address."""

    def __init__(self, symbols: Iterable[Symbol], notes: Sequence[str] = (),
                 sources: Sequence[str] = ()) -> None:
        """Index `symbols` (deduplicated); `notes` says what was skipped and why."""
        self.notes: tuple[str, ...] = tuple(notes)
        self.sources: tuple[str, ...] = tuple(sources)
        by_key: dict[tuple[str, int], list[Symbol]] = {}
        for sym in symbols:
            group = by_key.get((sym.name, sym.link_addr))
            if group is None:
                by_key[sym.name, sym.link_addr] = [sym]
            else:
                self._merge(group, sym)
        self._symbols = sorted((s for group in by_key.values() for s in group),
                               key=lambda s: (s.link_addr, s.name, s.version or ""))
        self._by_name: dict[str, list[Symbol]] = {}
        self._by_addr: dict[int, list[Symbol]] = {}
        self._functions: list[Symbol] = []
        self._max_end: list[int] = []
        by_name, by_addr = self._by_name, self._by_addr
        max_end = 0
        for sym in self._symbols:
            group = by_name.get(sym.name)
            if group is None:
                by_name[sym.name] = [sym]
            else:
                group.append(sym)
            if sym.kind == "func" or sym.kind == "ifunc":
                by_addr.setdefault(sym.link_addr, []).append(sym)
                self._functions.append(sym)
                end = sym.link_addr + (sym.size or 1)
                if end > max_end:
                    max_end = end
                self._max_end.append(max_end)
        self._starts = [s.link_addr for s in self._functions]
        self._by_source: dict[str, list[Symbol]] | None = None

    @staticmethod
    def _merge(group: list[Symbol], sym: Symbol) -> None:
        for i, old in enumerate(group):
            if old.version == sym.version or sym.version is None:
                if old.size == 0 and sym.size:
                    group[i] = old._replace(size=sym.size)
                return
            if old.version is None:
                group[i] = sym._replace(size=sym.size or old.size)
                return
        group.append(sym)

    # -- loading --------------------------------------------------------------------

    @classmethod
    def load(cls, image: ElfImage, debug_dirs: Sequence[str] = DEFAULT_DEBUG_DIRS,
             use_cache: bool = True) -> SymbolTable:
        """Every symbol source of `image`; cached per file version (dev, inode, size, times).

        The separate debug file is looked for only when the file has no
        `.symtab` of its own.  Raises `ElfError` if the file's own tables are
        malformed; a bad MiniDebugInfo or debug file is skipped with a note.
        """
        key = (image.identity, tuple(debug_dirs)) if image.identity is not None else None
        if use_cache and key is not None and key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        notes: list[str] = []
        symbols: list[Symbol] = []
        sources: list[str] = []
        with image.raw() as elf:
            tables = symbol_sections(elf)
            for source in ("dynsym", "symtab"):
                if source in tables:
                    symbols += read_symbols(elf, tables[source], source)
                    sources.append(source)
            if not elf.shdrs:
                symbols += dynamic_symbols(elf)
                sources.append("dynamic")
                notes.append(f"{image.path}: no section headers"
                             f"{' (cut off the end of the file)' if elf.sections_cut else ''}; "
                             "exported symbols read through PT_DYNAMIC")
            mini = minidebuginfo_symbols(image, elf, notes)
            if mini:
                symbols += mini
                sources.append("minidebuginfo")
        if "symtab" not in tables:
            found = find_debug_file(image, debug_dirs, notes)
            if found is not None:
                symbols += found[1]
                sources.append(f"debugfile {found[0]}")
            else:  # a stripped Go binary still names every function for its runtime
                go = go_symbols(image)
                if go:
                    symbols += go
                    sources.append("gopclntab")
        table = cls(symbols, notes, sources)
        if key is not None:
            _cache[key] = table
            if len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        return table

    # -- lookups --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._symbols)

    def __iter__(self) -> Iterator[Symbol]:
        return iter(self._symbols)

    def lookup(self, name: str) -> list[Symbol]:
        """Symbols called exactly `name`, sorted by address.

        `name@@VER` matches the default version VER only, `name@VER` version VER
        (default or hidden), and a plain `name` the default version and
        unversioned symbols (as the dynamic linker binds a plain reference).
        """
        plain, version, default_only = split_version(name)
        out = []
        for sym in self._by_name.get(plain, ()):
            if version is None:
                ok = sym.version is None or sym.default_version
            else:
                ok = sym.version == version and (sym.default_version or not default_only)
            if ok:
                out.append(sym)
        return out

    def _source_index(self) -> dict[str, list[Symbol]]:
        """Functions by their source names, whitespace dropped: built on first
        use, since it demangles every mangled name."""
        if self._by_source is None:
            index: dict[str, list[Symbol]] = {}
            for sym in self._functions:
                for key in _source_keys(sym):
                    index.setdefault(key, []).append(sym)
            self._by_source = index
        return self._by_source

    def lookup_source(self, name: str) -> list[Symbol]:
        """Functions `name` names as their C++ or Rust source writes it: with
        a parameter list (`ns::C::add(int)`, its label) or without
        (`ns::C::add`, every overload), however spaced. GCC's clones
        (`[clone .cold]`) only when nothing else has that name.

        Without the index, only the names that hold the name's last
        identifier as mangled (`3add`) are demangled: all a match can be."""
        key = normalized(name)
        needle = mangled_needle(name) if self._by_source is None else None
        if needle is None:
            found = self._source_index().get(key, [])
        else:
            found = [s for s in self._functions if needle in s.name and key in _source_keys(s)]
        whole = [s for s in found if not s.source_name or not s.source_name.clone]
        return sorted(whole or found, key=lambda s: s.link_addr)

    def aliases(self, symbol: Symbol) -> list[Symbol]:
        """The other function symbols at `symbol`'s address."""
        return [s for s in self._by_addr.get(symbol.link_addr, ()) if s != symbol]

    def glob(self, pattern: str) -> list[Symbol]:
        """Functions whose plain name, or demangled label or base, matches the
        shell `pattern`, one per address.

        A user tracing `libc:str*` wants one probe per distinct piece of code,
        so where several matching names share an address one stands for them
        (global before weak before local, the default version, fewest leading
        underscores, shortest); `aliases()` gives the rest.  A `@VER` or
        `@@VER` suffix in the pattern is matched against versions the same way.
        GCC's `.cold` fragments (the unlikely half of a split function, not an
        entry point) are left out unless the pattern itself names one.
        """
        name_pat, ver_pat, default_only = split_version(pattern)
        skip_cold = ".cold" not in name_pat
        best: dict[int, Symbol] = {}
        for sym in self._functions:
            if not matches(sym, name_pat):
                continue
            if skip_cold and _COLD.search(sym.name):
                continue
            if ver_pat is not None and not (
                sym.version is not None and fnmatch.fnmatchcase(sym.version, ver_pat)
                and (sym.default_version or not default_only)
            ):
                continue
            cur = best.get(sym.link_addr)
            if cur is None or _representative_rank(sym) < _representative_rank(cur):
                best[sym.link_addr] = sym
        return sorted(best.values(), key=lambda s: s.link_addr)

    def containing(self, link_addr: int) -> Symbol | None:
        """The innermost function whose [link_addr, +size) holds `link_addr`.

        A zero-size function holds only its own address.  Of aliases, the
        representative `glob` would pick is returned.
        """
        i = bisect.bisect_right(self._starts, link_addr) - 1
        found: Symbol | None = None
        while i >= 0 and self._max_end[i] > link_addr:
            sym = self._functions[i]
            if found is not None and sym.link_addr < found.link_addr:
                break
            if sym.link_addr + max(sym.size, 1) > link_addr and (
                found is None or _representative_rank(sym) < _representative_rank(found)
            ):
                found = sym
            i -= 1
        return found

    def suggest(self, name: str, n: int = 5) -> list[str]:
        """Up to `n` existing names close to `name`, best first, for "did you mean"."""
        plain, version, _ = split_version(name)
        hidden = [s.display_name for s in self._by_name.get(plain, ()) if version is None]
        # a name written as source writes it is near other source names, not symbols
        as_source = "::" in name or "(" in name
        pool: set[str] = {k for k in self._by_name if not (as_source and is_mangled(k))}
        src = (s.source_name for s in self._functions if is_mangled(s.name))
        pool.update(n.label if "(" in name else n.base for n in src if n is not None)
        if version is not None:
            pool.update(s.display_name for s in self._symbols if s.version is not None)
        close = difflib.get_close_matches(name, pool, n=n, cutoff=0.6)
        return list(dict.fromkeys(hidden + close))[:n]

    def functions(self) -> list[Symbol]:
        """All function and IFUNC symbols, aliases included, sorted by address."""
        return list(self._functions)


def _source_keys(sym: Symbol) -> set[str]:
    """The source names `sym` answers to, whitespace dropped: its label, its
    base, and a template's or a Rust method's other spellings."""
    src = sym.source_name if is_mangled(sym.name) else None
    if src is None:
        return set()
    more = rust_keys(src.label) if src.language == "rust" else cxx_keys(src.base)
    return {normalized(k) for k in (src.label, src.base, *more)}


def matches(symbol: Symbol, pattern: str) -> bool:
    """Does the shell `pattern` match `symbol`'s plain name, or the label
    (`ns::C::add(int)`) or base (`ns::C::add`) of a mangled one?"""
    if fnmatch.fnmatchcase(symbol.name, pattern):
        return True
    src = symbol.source_name if is_mangled(symbol.name) else None
    return src is not None and (fnmatch.fnmatchcase(src.base, pattern)
                                or fnmatch.fnmatchcase(src.label, pattern))


def clear_cache() -> None:
    """Forget every cached table (tests; a long-running tool after package upgrades)."""
    _cache.clear()
