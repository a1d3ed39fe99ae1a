"""Resolution: a parsed `ProbeSpec` -> probes keyed by (inode, file offset).

Parse has already checked the grammar; here we read files. Every probe is
validated before an engine sees it: its offset lies in executable code and
on an instruction boundary (decoded from the start of the function that
holds it). The kernel checks neither, and a probe in the middle of an
instruction corrupts the target; we refuse unless `force`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from uprobes.elf.dwarf.index import DwarfFile, unreadable
from uprobes.elf.golang import uses_register_abi
from uprobes.elf.image import ElfImage
from uprobes.elf.insn import check_boundary
from uprobes.elf.symbols import Symbol, SymbolTable, ifunc_warning
from uprobes.elf.usdt import UsdtNote, usdt_notes
from uprobes.errors import ElfError, ProcessError, ResolveError, SpecError, UprobesError
from uprobes.lang.ast import (
    Arg,
    Deref,
    FetchArg,
    FileTarget,
    ProbeSpec,
    PyTarget,
    UsdtTarget,
    Variable,
    VdsoTarget,
)
from uprobes.lang.names import c_identifier, offset_event_name, symbol_event_name
from uprobes.lang.numbers import is_good_name
from uprobes.model.probe import InodeKey, ResolvedProbe, UsdtArg, VdsoKey
from uprobes.resolve.abi import go_register_args
from uprobes.resolve.debugdwarf import dwarf_of
from uprobes.resolve.dwarfargs import after_prologue, lower_variables, scope_at, typed_return
from uprobes.resolve.lines import LineSites, function_line, functions_by_name, source_line
from uprobes.resolve.paths import FileRef, find_file
from uprobes.resolve.retsites import return_sites_for
from uprobes.resolve.vdso import read_vdso
from uprobes.sys import procfs

if TYPE_CHECKING:
    from uprobes.resolve.pyprobes import Interpreter as PyInterpreter

DEFAULT_GROUP = "uprobes"
MAX_EVENT_NAME = 63
_GLOB = re.compile(r"[*?\[]")


@dataclass
class Resolver:
    """Resolves specs for one run: against the host, or against process `pid`.

    `uretprobe`: return probes use the kernel's uretprobe, never the
    function's own `ret`s (see `uprobes.resolve.retsites`).
    """

    pid: int | None = None
    force: bool = False
    uretprobe: bool = False
    debug_dirs: tuple[str, ...] | None = None
    py_args: bool = False
    """A `py:` entry fetches its call's arguments (model/pyargs.py): for the
    commands that show them; the others would pay for the fetches at every
    Python call (the ptrace engine reads them at each stop)."""
    py_values: bool = False
    """A `py:` return fetches the value returned too (a Session's, asked for)."""
    argv: tuple[str, ...] | None = None
    """The command the run starts (`-- CMD`), if it starts one: a `py:`
    probe's interpreter and main script when nothing else names them."""
    _images: dict[tuple[int, int], ElfImage] = field(default_factory=dict)
    _maps: list[procfs.Mapping] | None = None
    _interpreters: dict[tuple[int, int], PyInterpreter] = field(default_factory=dict)
    """The interpreters `py:` probes were resolved in, read once each."""

    # ------------------------------------------------------------ files

    def mappings(self) -> list[procfs.Mapping]:
        """The mappings of process `pid` (empty without a pid), read once."""
        if self.pid is None:
            return []
        if self._maps is None:
            self._maps = procfs.maps(self.pid)
            if not self._maps:  # a zombie's maps are empty: say what it is
                procfs.check_live(self.pid)
        return self._maps

    def file(self, spec_path: str) -> FileRef:
        return find_file(spec_path, self.pid, self.mappings())

    def image(self, ref: FileRef) -> ElfImage:
        k = (ref.dev, ref.ino)
        if k not in self._images:
            self._images[k] = ElfImage.open(ref.path)
        return self._images[k]

    def symbols(self, ref: FileRef) -> SymbolTable:
        """The file's symbols (SymbolTable.load caches them per file version)."""
        image = self.image(ref)
        if self.debug_dirs is None:
            return SymbolTable.load(image)
        return SymbolTable.load(image, debug_dirs=self.debug_dirs)

    # ------------------------------------------------------------ specs

    def resolve(self, spec: ProbeSpec) -> list[ResolvedProbe]:
        target = spec.target
        if isinstance(target, FileTarget):
            try:
                return self._resolve_file(spec, target)
            except Exception as exc:
                if not unreadable(exc):
                    raise
                raise ElfError(f"{target.path}: cannot read its DWARF (corrupt?): "
                               f"{type(exc).__name__}: {exc}") from exc
        if isinstance(target, UsdtTarget):
            return self._resolve_usdt(spec, target)
        if isinstance(target, PyTarget):
            return self._resolve_python(spec, target)
        return self._resolve_vdso(spec, target)

    def resolve_all(self, specs: list[ProbeSpec]) -> list[ResolvedProbe]:
        """Resolve many specs; event names made unique within the run. With
        a pid, a process that ends meanwhile is a ProcessError saying so,
        whatever its ending made fail (its maps, its root, its files)."""
        if self.pid is None:
            return self._resolve_all(specs)
        procfs.check_live(self.pid)
        try:
            return self._resolve_all(specs)
        except UprobesError as e:
            try:
                procfs.check_live(self.pid)
            except ProcessError:
                raise ProcessError(f"process {self.pid} exited while its probes were being "
                                   "resolved") from e
            raise

    def _resolve_all(self, specs: list[ProbeSpec]) -> list[ResolvedProbe]:
        out: list[ResolvedProbe] = []
        used: set[str] = set()
        aliases: dict[str, int] = {}  # a shared display name -> the spec it is of
        for index, spec in enumerate(specs):
            for p in self.resolve(spec):
                if p.alias is not None:  # the places of one function, one name per spec
                    alias, n = p.alias, 2
                    while aliases.setdefault(alias, index) != index:
                        alias, n = f"{p.alias}_{n}", n + 1
                    p = replace(p, alias=alias)
                name, n = p.event, 1
                while f"{p.group}/{name}" in used:
                    suffix = f"_{n}"
                    # a C++ label is no kernel name, and cut it would lose its parameters
                    keep = MAX_EVENT_NAME - len(suffix) if is_good_name(p.event) else None
                    name = p.event[:keep] + suffix
                    n += 1
                used.add(f"{p.group}/{name}")
                out.append(p if name == p.event else replace(p, event=name))
        return out

    def _resolve_file(self, spec: ProbeSpec, t: FileTarget) -> list[ResolvedProbe]:
        ref = self.file(t.path)
        image = self.image(ref)
        if t.line is not None:
            return self._resolve_line(spec, t, ref, image)
        if t.offset is not None:
            self._check_code(ref, image, t.offset, None)
            event = spec.event or offset_event_name(ref.display, t.offset)
            entry = None
            if spec.is_return:
                entry = self.symbols(ref).containing(image.file_to_link_addr(t.offset))
                if entry is not None and image.link_to_file_offset(entry.link_addr) != t.offset:
                    entry = None
            return [self._point(spec, ref, t.offset, event, ref_ctr=t.ref_ctr_offset,
                                returns=self._returns(spec, image, entry))]
        assert t.symbol is not None
        matches = self._functions_named(ref, image, t)
        if not matches:
            if not spec.is_return and "@" not in t.symbol:
                inlined = self._resolve_inlined(spec, t, ref, image)
                if inlined:
                    return inlined
            hint = self.symbols(ref).suggest(t.symbol.split("@", 1)[0])
            also = f" (did you mean: {', '.join(hint)}?)" if hint else ""
            raise ResolveError(f"symbol '{t.symbol}' not found in {ref.display}{also}")
        if spec.is_return and t.symbol_offset:
            raise SpecError("Retprobe address must be an function entry", spec.text,
                            _pos(spec.text, "+"))
        out = []
        for sym in matches:
            if t.symbol_offset and sym.size and t.symbol_offset >= sym.size and not self.force:
                raise ResolveError(f"{sym.name}+0x{t.symbol_offset:x} is past the end of "
                                   f"{sym.name} (size 0x{sym.size:x}) in {ref.display}")
            file_offset = image.link_to_file_offset(sym.link_addr + t.symbol_offset)
            notes: tuple[str, ...] = ()
            if uses_variables(spec) and not t.symbol_offset and not spec.is_return:
                body = after_prologue(dwarf_of(image, ref.display, self.debug_dirs),
                                      sym.link_addr)
                if body is not None:
                    file_offset = image.link_to_file_offset(body)
                    notes = (f"{sym.pretty_name}: probed after its prologue, at "
                             f"{sym.pretty_name}+"
                             f"0x{body - sym.link_addr:x}, where unoptimized code has "
                             "stored its arguments",)
            self._check_code(ref, image, file_offset, sym)
            if spec.event and len(matches) > 1:
                event = f"{spec.event}_{c_identifier(sym.pretty_name)}"[:MAX_EVENT_NAME]
            else:
                event = spec.event or _symbol_event(sym, "@" in t.symbol, spec.is_return)
            warning = ifunc_warning(sym)
            notes += (warning,) if warning else ()
            out.append(self._point(spec, ref, file_offset, event, sym=sym,
                                   sym_off=image.file_to_link_addr(file_offset) - sym.link_addr,
                                   ref_ctr=t.ref_ctr_offset, notes=notes,
                                   returns=self._returns(spec, image, sym)))
        return out

    def _resolve_line(self, spec: ProbeSpec, t: FileTarget, ref: FileRef,
                      image: ElfImage) -> list[ResolvedProbe]:
        """`PATH:app.c:42` and `PATH:FUNC:+N`: a probe at each address where the line starts."""
        assert t.line is not None
        if spec.is_return:
            raise SpecError("A source line cannot be a return probe", spec.text, 0)
        df = dwarf_of(image, ref.display, self.debug_dirs)
        table = self.symbols(ref)
        if t.source_file is not None:
            sites = source_line(df, t.source_file, t.line, ref.display)
            stem = t.source_file.rsplit(".", 1)[0]
        else:
            assert t.symbol is not None
            sites = function_line(df, self._function_die(df, table, t, ref, image), t.line,
                                  ref.display)
            stem = t.symbol
        line = sites.label.split(" ")[0].rsplit(":", 1)[1]
        note = _line_note(sites)
        out = []
        for i, link_addr in enumerate(sites.link_addrs):
            file_offset = image.link_to_file_offset(link_addr)
            sym = table.containing(link_addr)
            self._check_code(ref, image, file_offset, sym)
            event = spec.event or c_identifier(f"{stem}_{line}")
            out.append(self._point(spec, ref, file_offset, event, sym=sym,
                                   sym_off=link_addr - sym.link_addr if sym else 0,
                                   notes=(note,) if note and i == 0 else ()))
        return out

    def _function_die(self, df: DwarfFile, table: SymbolTable, t: FileTarget, ref: FileRef,
                      image: ElfImage) -> Any:
        """The DWARF of function `t.symbol`: at its symbol (or C++/Rust name),
        or by name for one only inlined."""
        name = t.symbol
        assert name is not None
        matches = _distinct(table.lookup(name)) or _distinct(table.lookup_source(name))
        if len(matches) > 1:
            raise ResolveError(_ambiguous(t, ref, image, matches))
        if matches:
            subs = [s for s in df.scopes_at(matches[0].link_addr)
                    if s.tag == "DW_TAG_subprogram"]
            if subs:
                return subs[-1]
        found = functions_by_name(df, name, ref.display)
        if not found:
            hint = table.suggest(name)
            also = f" (did you mean: {', '.join(hint)}?)" if hint else ""
            raise ResolveError(f"function '{name}' not found in {ref.display}{also}")
        return found[0]

    def _resolve_inlined(self, spec: ProbeSpec, t: FileTarget, ref: FileRef,
                         image: ElfImage) -> list[ResolvedProbe]:
        """A function the symbol table lacks, found in the DWARF: a probe at
        each copy and each inline site. Empty when there is none (or no DWARF)."""
        assert t.symbol is not None
        try:
            df = dwarf_of(image, ref.display, self.debug_dirs)
        except ResolveError:
            return []
        copies: list[int] = []
        sites: list[int] = []
        for die in functions_by_name(df, t.symbol, ref.display):
            c, s = df.entries(die)
            copies += c
            sites += s
        if not copies and not sites:
            return []
        table = self.symbols(ref)
        note = (f"{t.symbol} is inlined: probed at its {len(sites)} inline site"
                f"{'s' if len(sites) != 1 else ''}"
                + (f" and {len(copies)} out-of-line cop{'ies' if len(copies) != 1 else 'y'}"
                   if copies else ""))
        out = []
        for i, link_addr in enumerate(sorted(set(copies + sites))):
            file_offset = image.link_to_file_offset(link_addr + t.symbol_offset)
            sym = table.containing(link_addr)
            self._check_code(ref, image, file_offset, sym)
            event = spec.event or symbol_event_name(t.symbol, spec.is_return)
            out.append(self._point(spec, ref, file_offset, event, sym=sym,
                                   sym_off=link_addr + t.symbol_offset - sym.link_addr
                                   if sym else 0, notes=(note,) if i == 0 else ()))
        return out

    def _functions_named(self, ref: FileRef, image: ElfImage, t: FileTarget) -> list[Symbol]:
        """The functions `t.symbol` names, one per address: a symbol by its
        own name; else by its C++ or Rust name (`ns::C::add(int)`, or
        `ns::C::add` for every overload); else as a glob over both; none
        is []. One name for several functions is an error that lists them."""
        assert t.symbol is not None
        table = self.symbols(ref)
        matches = _distinct(table.lookup(t.symbol)) or _distinct(table.lookup_source(t.symbol))
        if not matches and _GLOB.search(t.symbol):
            matches = _distinct(table.glob(t.symbol))
            if not matches:
                raise ResolveError(f"no function matches '{t.symbol}' in {ref.display}")
            return matches
        if len(matches) > 1:
            raise ResolveError(_ambiguous(t, ref, image, matches))
        return matches

    def _resolve_usdt(self, spec: ProbeSpec, t: UsdtTarget) -> list[ResolvedProbe]:
        ref = self.file(t.path)
        image = self.image(ref)
        notes = [n for n in usdt_notes(image)
                 if fnmatch.fnmatchcase(n.provider, t.provider)
                 and fnmatch.fnmatchcase(n.name, t.name)]
        if not notes:
            raise ResolveError(f"no USDT probe {t.provider}:{t.name} in {ref.display} "
                               f"(see: uprobes list {t.path})")
        out = []
        for note in notes:
            _check_usdt_args(spec, note)
            group = spec.group or c_identifier(note.provider)
            event = spec.event or c_identifier(note.name)
            if spec.event and len(notes) > 1:
                event = f"{spec.event}_{c_identifier(note.name)}"[:MAX_EVENT_NAME]
            args = tuple(UsdtArg(a.size, a.signed, a.operand) for a in note.args)
            out.append(self._point(spec, ref, note.file_offset, event, group=group,
                                   ref_ctr=note.semaphore_file_offset, usdt_args=args))
        return out

    def _resolve_python(self, spec: ProbeSpec, t: PyTarget) -> list[ResolvedProbe]:
        # (imported here: it reads ELF with pyelftools, which other runs need not load)
        from uprobes.resolve.pyprobes import (
            find_interpreter_file,
            main_script,
            py_probes,
            read_interpreter,
            wrapper_note,
        )
        ref, pid = find_interpreter_file(t.where, self.pid, self.argv, self.file, self.image)
        key = (ref.dev, ref.ino)
        if key not in self._interpreters:
            self._interpreters[key] = read_interpreter(ref, self.image(ref))
        by_file = t.where is not None and not t.where.isdigit()
        if pid is None and by_file:
            pid = self.pid  # an interpreter named by its file, in the process of -p
        argv = self.argv if t.where is None or by_file else None  # (or the command's)
        note = wrapper_note(self.argv, ref) if t.where is None and pid is None else None
        return py_probes(spec, t, self._interpreters[key], main_script(pid, argv), note,
                         with_args=self.py_args, with_value=self.py_values)

    def _resolve_vdso(self, spec: ProbeSpec, t: VdsoTarget) -> list[ResolvedProbe]:
        image = read_vdso(self.pid, t.image)
        table = SymbolTable.load(image)
        ref = FileRef("[vdso]", "[vdso]", 0, 0)
        if t.offset is not None:
            syms: list[Symbol | None] = [table.containing(image.file_to_link_addr(t.offset))]
            offsets = [t.offset]
        else:
            assert t.symbol is not None
            found = _distinct(table.glob(t.symbol) if _GLOB.search(t.symbol)
                              else _vdso_lookup(table, t.symbol))
            if not found:
                hint = table.suggest(t.symbol)
                also = f" (did you mean: {', '.join(hint)}?)" if hint else ""
                raise ResolveError(f"symbol '{t.symbol}' not found in the vDSO{also}")
            syms = list(found)
            offsets = [image.link_to_file_offset(s.link_addr + t.symbol_offset) for s in found]
        out = []
        for sym, off in zip(syms, offsets):
            self._check_code(ref, image, off, sym)
            ret_sites, why = self._returns(spec, image, sym)
            name = sym.name.removeprefix("__vdso_") if sym else None
            event = spec.event or (symbol_event_name(name, spec.is_return) if name
                                   else f"p_vdso_0x{off:x}")
            out.append(ResolvedProbe(
                spec=spec, key=VdsoKey(self.pid or 0, off), path="[vdso]", file_offset=off,
                kind=spec.kind, group=spec.group or DEFAULT_GROUP, event=event, args=spec.args,
                symbol=sym.name if sym else None, symbol_offset=t.symbol_offset,
                link_addr=image.file_to_link_addr(off), ret_sites=ret_sites,
                uretprobe_reason=why))
        return out

    def _returns(self, spec: ProbeSpec, image: ElfImage, entry: Symbol | None
                 ) -> tuple[tuple[int, ...] | None, str | None]:
        """A return probe's (`ret_sites`, `uretprobe_reason`)."""
        if not spec.is_return or self.uretprobe:
            return None, None
        return return_sites_for(image, entry, spec.args)

    def _variables(self, spec: ProbeSpec, ref: FileRef, image: ElfImage, file_offset: int,
                   args: tuple[FetchArg, ...]) -> tuple[FetchArg, ...]:
        """`args` with source variables read from the DWARF at the probe's address."""
        if spec.is_return:
            raise SpecError("Variables by name are read where a probe stops; a return probe "
                            "stops after the function's frame is gone: probe a line of it "
                            "instead (FUNC:+N or FILE.c:LINE)", spec.text, 0)
        if isinstance(spec.target, UsdtTarget):
            raise SpecError("USDT probes take $argN, not variables by name", spec.text, 0)
        df = dwarf_of(image, ref.display, self.debug_dirs)
        link_addr = image.file_to_link_addr(file_offset)
        return lower_variables(args, scope_at(df, image, link_addr, file_offset))

    # ------------------------------------------------------------ checks

    def _check_code(self, ref: FileRef, image: ElfImage, file_offset: int,
                    sym: Symbol | None) -> None:
        if self.force:
            return
        if not image.is_executable_file_offset(file_offset):
            raise ResolveError(f"{ref.display}:0x{file_offset:x} is not in an executable "
                               f"segment (use --force to probe it anyway)")
        if sym is None:
            table = self.symbols(ref) if ref.path != "[vdso]" else None
            sym = table.containing(image.file_to_link_addr(file_offset)) if table else None
        if sym is None:
            raise ResolveError(
                f"{ref.display}:0x{file_offset:x}: no function symbol covers this offset, so "
                f"it cannot be checked to be an instruction boundary (use --force if you are sure)")
        check_boundary(image, sym, file_offset)

    def _point(self, spec: ProbeSpec, ref: FileRef, file_offset: int, event: str, *,
               group: str | None = None, sym: Symbol | None = None, sym_off: int = 0,
               ref_ctr: int | None = None, usdt_args: tuple[UsdtArg, ...] = (),
               notes: tuple[str, ...] = (),
               returns: tuple[tuple[int, ...] | None, str | None] = (None, None)
               ) -> ResolvedProbe:
        image = self.image(ref)
        args = _abi_args(spec, image, sym)
        if uses_variables(spec):
            args = self._variables(spec, ref, image, file_offset, args)
        elif spec.is_return and sym is not None and sym_off == 0:
            args = typed_return(args, image, self.debug_dirs, file_offset)
        return ResolvedProbe(
            spec=spec, key=InodeKey(ref.dev, ref.ino, file_offset), path=ref.path,
            file_offset=file_offset, kind=spec.kind, group=group or spec.group or DEFAULT_GROUP,
            event=event, args=args, symbol=sym.name if sym else None,
            symbol_offset=sym_off, link_addr=image.file_to_link_addr(file_offset),
            ref_ctr_offset=ref_ctr, usdt_args=usdt_args, notes=notes, ret_sites=returns[0],
            uretprobe_reason=returns[1])


def _line_note(sites: LineSites) -> str | None:
    """What a line with several addresses became: one probe at each."""
    n = len(sites.link_addrs)
    if n == 1:
        return None
    inlined = f", {sites.inlined} of them in inlined code" if sites.inlined else ""
    return f"{sites.label} starts at {n} addresses{inlined}: a probe at each"


def uses_variables(spec: ProbeSpec) -> bool:
    """Whether the spec fetches source variables by name (`s->name`, `$params`)."""
    return any(isinstance(a.expr, Variable) for a in spec.args)


def _abi_args(spec: ProbeSpec, image: ElfImage, sym: Symbol | None) -> tuple[FetchArg, ...]:
    """The spec's fetchargs, with `$argN` of an entry probe in a Go binary
    made where Go passes it (it does not pass them as C does): its argument
    registers (`%ax`, `%bx`...), or for an assembly function (`NAME.abi0`)
    the stack. Return probes keep `$argN`, which the engines refuse there."""
    if spec.is_return or isinstance(spec.target, UsdtTarget) or not spec.args:
        return spec.args
    if not uses_register_abi(image):
        return spec.args
    on_stack = sym is not None and sym.name.endswith(".abi0")
    return tuple(go_register_args(a, on_stack) for a in spec.args)


def _distinct(symbols: list[Symbol]) -> list[Symbol]:
    """One symbol per address: aliases (`__libc_malloc`/`malloc`) are one probe."""
    by_addr: dict[int, Symbol] = {}
    for s in symbols:
        by_addr.setdefault(s.link_addr, s)
    return sorted(by_addr.values(), key=lambda s: s.link_addr)


def _symbol_event(sym: Symbol, versioned: bool, is_return: bool) -> str:
    """The event name of a probe on `sym`: a C symbol's as perf probe makes
    it (`malloc`, `malloc__return`, `memcpy_GLIBC_2_14`); a C++ or Rust
    function's label as the source writes it (`ns::C::add(int)`,
    `ns::C::add(int)%return`), which the kernel engine makes a C
    identifier for tracefs."""
    src = sym.source_name
    if src is not None:
        return src.label + ("%return" if is_return else "")
    label = sym.name + (f"@{sym.version}" if sym.version and versioned else "")
    return symbol_event_name(label, is_return)


def _ambiguous(t: FileTarget, ref: FileRef, image: ElfImage, matches: list[Symbol]) -> str:
    """The one line for a name that names several functions: each with its
    file offset, by its source name (and its own, where those tie)."""
    labels = [s.pretty_name for s in matches]
    named = [label if labels.count(label) == 1 else f"{label} [{s.name}]"
             for label, s in zip(labels, matches)]
    where = ", ".join(f"{n} at 0x{image.link_to_file_offset(s.link_addr):x}"
                      for n, s in zip(named, matches))
    langs = {s.source_name.language for s in matches if s.source_name}
    how = (f"name one with its parameters, its symbol or as {t.path}:0xOFFSET" if "c++" in langs
           else f"name one by its symbol or as {t.path}:0xOFFSET" if langs
           else f"probe one as {t.path}:0xOFFSET")
    return (f"symbol '{t.symbol}' is ambiguous in {ref.display}: it names {len(matches)} "
            f"functions: {where}; {how}")


def _vdso_lookup(table: SymbolTable, name: str) -> list[Symbol]:
    return table.lookup(name) or table.lookup("__vdso_" + name)


def _check_usdt_args(spec: ProbeSpec, note: UsdtNote) -> None:
    for arg in spec.args:
        for n in _arg_indexes(arg):
            if n > len(note.args):
                raise ResolveError(
                    f"USDT probe {note.provider}:{note.name} has {len(note.args)} "
                    f"argument{'s' if len(note.args) != 1 else ''}; $arg{n} does not exist")


def _arg_indexes(arg: FetchArg) -> list[int]:
    expr = arg.expr
    while isinstance(expr, Deref):
        expr = expr.base
    return [expr.index] if isinstance(expr, Arg) else []


def _pos(text: str, ch: str) -> int:
    i = text.find(ch)
    return max(i, 0)
