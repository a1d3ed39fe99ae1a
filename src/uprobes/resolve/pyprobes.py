"""`py:[WHERE:]MODULE.QUALNAME`: a Python function as ordinary probes in its interpreter.

Every Python function of CPython 3.11 starts in the eval loop's RESUME
handler (RESUME_QUICK once its code is warm: each call passes exactly one
of the two) and returns through RETURN_VALUE (pyeval.py finds them, and the
register that holds the frame there); 3.12 and 3.13 have more of each
(pyversions.ENTRY_HANDLERS, RETURN_HANDLERS: the instrumented forms,
RETURN_CONST), the same fetches on each, and RETURN_CONST's value read from
the register its handler loads it into. So a `py:` function is a probe on
each of those handlers, fetching what the frame's code object says of
itself (its qualified name and file, as strings), with a `guard` that
keeps the hits of the function asked for: any engine can place it, and the
kernel tests the guard in its event filter before it writes a record.

    entry  (RESUME, RESUME_QUICK; oparg 0: a call, not a generator resumed)
        __frame=%FRAME (what pairs a call's entry with its return)
        qualname=+ASCII(+co_qualname(+f_code(%FRAME))):string
        file=+ASCII(+co_filename(+f_code(%FRAME))):string
        line=+co_firstlineno(+f_code(%FRAME)):s32
    return (RETURN_VALUE: the value is the top of the value stack)
        qualname, file as above; type=+0(+tp_name(+ob_type(-8(%STACK)))):string

The module is matched through the code's file (which CPython makes
absolute): `a.b.f` is `f` in a file ending `/a/b.py` or `/a/b/__init__.py`,
or `b.f` in `/a.py`...; every split of the dotted name is tried.
`__main__` is the program's script when the process is known (`-p`, WHERE
a pid, `-- CMD`), any file otherwise. Names are read as compact ASCII
strings (what identifiers and most paths are): a function whose name is
not ASCII is refused.

A function left by an exception leaves its frame through the loop's
unwinding (`exit_unwind`, pyexits.py), not RETURN_VALUE: a return probe is
placed there too where the build's DWARF names it, its `type` the
exception's, shown as `(raised NAME)`; a generator resumed by `throw()` or
`close()` passes another label of it (`%resume`). What a return probe
does not see: a generator's yields (its RESUME with oparg 0 is its first
`next()`, its RETURN_VALUE its end).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.dynamic import DynamicSection

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.errors import ResolveError, UprobesError
from uprobes.lang.ast import FetchArg, ProbeSpec, PyTarget
from uprobes.lang.condition import parse_condition
from uprobes.lang.grammar import parse_args
from uprobes.lang.names import c_identifier
from uprobes.model.event import FRAME_ARG, PY_FOBJ_ARG, PY_OP_ARG, PY_OPARG_ARG
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.model.pyargs import (
    ARGCOUNT,
    BUILTIN_TYPES,
    FLAGS,
    KWONLY,
    NAME_BYTES,
    RAISED_FIELD,
    RETURNED,
    SLOTS,
    TEXT_BYTES,
    TYPE_BYTES,
    TYPES_ANCHOR,
    WRAPPED_FIELD,
    WRAPPER_TYPE,
    YIELD_TPTR,
    slot_fields,
)
from uprobes.model.pyguard import Alternative, Match, PyGuard, TextTest
from uprobes.resolve.paths import FileRef, is_elf
from uprobes.resolve.pydwarf import debug_file_for
from uprobes.resolve.pyeval import EvalLoop, find_eval_loop
from uprobes.resolve.pyexits import UnwindExit, find_thrown_resume, find_unwind_exit
from uprobes.resolve.pylayout import Layout, PythonLayoutError, layout_for
from uprobes.resolve.pyversions import ENTRY_HANDLERS, OPCODES, minor
from uprobes.sys import procfs

GROUP = "py"
YIELD_HANDLERS = ("YIELD_VALUE", "INSTRUMENTED_YIELD_VALUE")
"""Where a generator or coroutine suspends (the instrumented form from 3.12)."""
MAX_GUARD = 3000
"""Bytes of a guard: the kernel takes a filter of at most a page."""
_TYPE_NAME = 0x18
"""offsetof(PyTypeObject, tp_name): fixed since the first PyObject_VAR_HEAD."""
_OB_TYPE = 0x8
"""offsetof(PyObject, ob_type) (ob_refcnt first), the same in every build
that is not a Py_TRACE_REFS one, which the layout would show."""


@dataclass(frozen=True)
class Interpreter:
    """The file whose eval loop runs Python, and what resolution read of it."""

    ref: FileRef
    image: ElfImage
    loop: EvalLoop
    layout: Layout

    @cached_property
    def unwind_exit(self) -> UnwindExit | None:
        """Where the eval loop leaves a frame by an exception (read when a
        return probe first needs it: seconds, once per build)."""
        lay = self.layout
        if "frame_is_entry" in lay.fields:  # (3.11: told by its is_entry test)
            return find_unwind_exit(self.image, self.loop.function, lay.frame_is_entry)
        if "tstate_current_exception" not in lay.fields:
            return None
        return find_unwind_exit(self.image, self.loop.function, None, lay.frame_previous)

    @cached_property
    def thrown_resume(self) -> UnwindExit | None:
        """Where a generator resumed by `throw()` or `close()` starts."""
        lay = self.layout
        return find_thrown_resume(self.image, self.loop.function, lay.frame_prev_instr,
                                  None if "frame_is_entry" in lay.fields else lay.frame_size)

    @property
    def instr_running(self) -> bool:
        """Whether the frame's instruction pointer is the instruction running
        (3.13's `instr_ptr`: after a yield, the RESUME that follows it), not
        the last one run (`prev_instr`: the yield itself)."""
        return minor(self.layout.hexversion) >= (3, 13)


def find_interpreter_file(where: str | None, pid: int | None, argv: Sequence[str] | None,
                          file: Callable[[str], FileRef],
                          image: Callable[[FileRef], ElfImage]) -> tuple[FileRef, int | None]:
    """(the file with the eval loop, the process named if one was) for a
    `py:` target's WHERE (None: process `pid`, else the program of `argv`,
    the command a run starts)."""
    if where is None and pid is None and argv:
        where = argv[0]
    if where is not None and not where.isdigit():
        ref = file(where)
        if _has_eval_loop(image(ref)):
            return ref, None
        lib = _libpython(image(ref), file)
        if lib is None or not _has_eval_loop(image(lib)):
            raise ResolveError(f"{ref.display} has no CPython eval loop "
                               "(_PyEval_EvalFrameDefault), nor a libpython that has one")
        return lib, None
    target = int(where) if where is not None else pid
    if target is None:
        raise ResolveError("a py: probe needs its interpreter: py:PATH:MODULE.NAME "
                           "(python3.11, a libpython) or py:PID:MODULE.NAME, -p PID or -- CMD")
    for m in procfs.maps(target):
        if not m.executable or not m.path.startswith("/"):
            continue
        mapped = procfs.mapped_file(target, m)
        if mapped is None:
            continue
        ref = FileRef(mapped.path, m.path, mapped.dev, mapped.ino)
        try:
            if _has_eval_loop(image(ref)):
                return ref, target
        except UprobesError:
            continue
    procfs.check_live(target)
    raise ResolveError(f"process {target} runs no CPython (no file it maps has "
                       "_PyEval_EvalFrameDefault)")


def wrapper_note(argv: Sequence[str] | None, interpreter: FileRef) -> str | None:
    """A note when the command's program, found on PATH, is a script (a
    pyenv shim) rather than the interpreter the probes went into: it may
    start another one, whose calls they would never see."""
    program = argv[0] if argv else ""
    found = shutil.which(program) if program and "/" not in program else None
    if found is None or is_elf(found):
        return None
    return (f"{program} on PATH is {found}, a script: the probes are in "
            f"{interpreter.display}; if the script starts another interpreter, name that "
            "one in the command")


def _libpython(program: ElfImage, file: Callable[[str], FileRef]) -> FileRef | None:
    """The libpython `program` loads (a `--enable-shared` build's python3.X
    runs its eval loop there), found along its own run path first."""
    needed: list[str] = []
    paths: list[str] = []
    try:
        with program.elffile() as elf:
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(str(getattr(tag, "needed", "")))
                    elif tag.entry.d_tag in ("DT_RUNPATH", "DT_RPATH"):
                        text = str(getattr(tag, "runpath", None) or getattr(tag, "rpath", ""))
                        origin = os.path.dirname(program.path)
                        paths += text.replace("${ORIGIN}", origin) \
                            .replace("$ORIGIN", origin).split(":")
    except (ELFError, ELFParseError, OSError, UprobesError):
        return None
    for name in (n for n in needed if n.startswith("libpython")):
        for directory in paths:
            candidate = os.path.join(directory, name)
            if os.path.exists(candidate):
                return file(candidate)
        try:
            return file(name)
        except UprobesError:
            continue
    return None


def _has_eval_loop(image: ElfImage) -> bool:
    return bool(SymbolTable.load(image).lookup("_PyEval_EvalFrameDefault"))


def read_interpreter(ref: FileRef, image: ElfImage) -> Interpreter:
    """The eval loop and the layout of the interpreter in `ref`."""
    symbols = SymbolTable.load(image)
    version = symbols.lookup("Py_Version")
    evals = symbols.lookup("_PyEval_EvalFrameDefault")
    if not version or not evals:
        raise ResolveError(f"{ref.display}: not a CPython 3.11 or later (no Py_Version)")
    hexversion = int.from_bytes(image.read_link(version[0].link_addr, 4), "little")
    try:
        layout = layout_for(image, ref.display, hexversion, evals[0].link_addr)
    except PythonLayoutError as e:
        raise ResolveError(str(e)) from None
    symbols_path = debug_file_for(image.path, image.build_id) or image.path
    loop = find_eval_loop(image, symbols_path, layout.frame_prev_instr, minor(hexversion),
                          layout.tuple_items)
    return Interpreter(ref, image, loop, layout)


def main_script(pid: int | None, argv: Sequence[str] | None) -> str | None:
    """The script process `pid` runs, or else the command `argv` will
    (`python3 app.py`: the path joined to the working directory, not
    normalized, as CPython names `__main__`'s code), or None: `-c`, `-m`,
    stdin, or a path that is not there (a process that has changed
    directory since: its start's is not known)."""
    if pid is not None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
            cwd = os.readlink(f"/proc/{pid}/cwd")
            root = f"/proc/{pid}/root"
        except OSError:
            return None
    elif argv:
        args, cwd, root = list(argv), os.getcwd(), ""
    else:
        return None
    script = _script_argument(args[1:])
    if script is None:
        return None
    path = os.path.join(cwd, script)
    return path if os.path.isfile(root + path) else None


_VALUED_OPTIONS = "WXQ"
"""CPython's one-letter options that take a value (`-W error`, `-Xdev`)."""
_VALUED_LONG = ("--check-hash-based-pycs",)


def _script_argument(args: Sequence[str]) -> str | None:
    """The script among CPython's arguments (after its own options), or
    None when the code comes from elsewhere (`-c`, `-m`, `-`)."""
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            i += arg in _VALUED_LONG
            continue
        for at, letter in enumerate(arg[1:], 1):
            if letter in "cm":
                return None  # the rest is the command or the module
            if letter in _VALUED_OPTIONS:
                i += at == len(arg) - 1  # its value is the next argument
                break
    if i >= len(args) or args[i] in ("", "-"):
        return None
    return args[i]


_GLOB = "*?["


def _alternatives(name: str, script: str | None) -> list[tuple[str, list[str]]]:
    """Every reading of function `name` (MODULE.QUALNAME, globs in it) as
    (qualname, the globs its file may match: none, any file)."""
    parts = name.split(".")
    out: list[tuple[str, list[str]]] = []
    for cut in range(1, 2 if parts[0] == "__main__" else len(parts)):
        module, qualname = parts[:cut], ".".join(parts[cut:])
        if module == ["__main__"]:
            files = [_escaped(script)] if script else []
        else:
            # (CPython makes the files of imported modules absolute; those
            # frozen into the interpreter, as os and posixpath, are named so)
            path = "/".join(module)
            files = [f"*/{path}.py", f"*/{path}/__init__.py",
                     _escaped("<frozen " + ".".join(module) + ">")]
        out.append((qualname, files))
    return out


def _escaped(text: str) -> str:
    """`text` as a glob that matches it alone."""
    return "".join(f"[{c}]" if c in _GLOB else c for c in text)


def name_guard(name: str, script: str | None) -> str:
    """The condition on `qualname` and `file` that holds for function `name`
    (MODULE.QUALNAME, globs in it), every split of it tried."""
    alternatives = []
    for qualname, files in _alternatives(name, script):
        op = "~" if any(c in qualname for c in _GLOB) else "=="
        names = f"qualname {op} {_quoted(qualname)}"
        tests = " || ".join(_file_test(f) for f in files)
        alternatives.append(f"({names} && ({tests}))" if tests else f"({names})")
    return " || ".join(alternatives)


def _file_test(glob: str) -> str:
    plain = _plain(glob)
    return f"file == {_quoted(plain)}" if plain is not None else f"file ~ {_quoted(glob)}"


def _plain(glob: str) -> str | None:
    """The one text `glob` matches, or None if it matches more."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "[" and i + 2 < len(glob) and glob[i + 2] == "]":
            out.append(glob[i + 1])
            i += 3
        elif c in _GLOB:
            return None
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _text_test(glob: str) -> TextTest | None:
    """`glob` as one compare of text (whole, prefix `ab*`, suffix `*ab`), or None."""
    plain = _plain(glob)
    if plain is not None:
        return TextTest(plain, Match.EXACT)
    if glob.endswith("*") and (rest := _plain(glob[:-1])) is not None:
        return TextTest(rest, Match.PREFIX)
    if glob.startswith("*") and (rest := _plain(glob[1:])) is not None:
        return TextTest(rest, Match.SUFFIX)
    return None


def py_guard(name: str, script: str | None, loop: EvalLoop, lay: Layout,
             handlers: tuple[str, ...], resumed: bool = False) -> PyGuard | None:
    """`name_guard` as the program's code can test it (model/pyguard.py) at
    `handlers` (RESUME's: its oparg 0 tested too, or not 0 if `resumed`), or
    None when a glob in the name is more than one prefix or suffix, or a
    handler's own code does not show where the frame is."""
    entry = handlers == loop.entries
    if not set(handlers) <= loop.shown:
        return None
    alternatives = []
    for qualname, files in _alternatives(name, script):
        qual = _text_test(qualname)
        tests = [_text_test(f) for f in files]
        if qual is None or None in tests or not (qual.text + "".join(
                t.text for t in tests if t is not None)).isascii():
            return None
        alternatives.append(Alternative(qual, tuple(t for t in tests if t is not None)))
    return PyGuard(frame=loop.frame, frame_code=lay.frame_code,
                   code_qualname=lay.code_qualname, code_filename=lay.code_filename,
                   str_state=lay.str_state,
                   str_state_mask=lay.str_compact_mask | lay.str_ascii_mask,
                   str_length=lay.str_length, str_data=lay.str_ascii_data,
                   alternatives=tuple(alternatives),
                   oparg=loop.next_instr if entry else None, resumed=resumed)


def _value_shift(lay: Layout) -> int | None:
    """The bit of a str's `state` its compact bit is (ascii is the next),
    or None where the build keeps an int or a str otherwise than CPython
    3.11 does (then no value is read)."""
    compact = lay.str_compact_mask
    if lay.hexversion >> 16 != 0x030B or lay.str_ascii_mask != compact << 1 or not compact:
        return None
    return compact.bit_length() - 1


def _object_fetches(lay: Layout, obj: str, f: dict[str, str], shift: int) -> list[str]:
    """The raw fields (model/pyargs.py, roles `f`) of the object `obj` points
    to: itself, its type and its type's name, an int's size and first two
    digits, a str's compact-and-ASCII bits and first bytes."""
    return [f"{f['ptr']}={obj}:x64",
            f"{f['tptr']}=+{lay.object_type}({obj}):x64",
            f"{f['type']}=+0(+{lay.type_name}(+{lay.object_type}({obj}))):"
            f"u64[{TYPE_BYTES // 8}]",
            f"{f['size']}=+{lay.var_size}({obj}):s64",
            # (3.11's int: its 30-bit digits in 32-bit words after ob_size)
            f"{f['word']}=+{lay.var_size + 8}({obj}):u64",
            f"{f['str']}=+{lay.str_state}({obj}):b2@{shift}/32",
            f"{f['text']}=+{lay.str_ascii_data}({obj}):u64[{TEXT_BYTES // 8}]"]


def argument_fetches(lay: Layout, frame: str,
                     builtins: list[str] | None = None) -> list[str]:
    """The fetchargs of a `py:` entry's arguments (model/pyargs.py): the
    code's counts, where the builtin types are (`builtins`, from
    `_builtin_types`), and per slot of `localsplus` the object's fields
    (`_object_fetches`), the slot's name and its length. None where the
    build keeps an int or a str otherwise than CPython 3.11 does."""
    shift = _value_shift(lay)
    if shift is None:
        return []
    code = f"+{lay.frame_code}(%{frame})"
    out = [f"{ARGCOUNT}=+{lay.code_argcount}({code}):s32",
           f"{KWONLY}=+{lay.code_kwonlyargcount}({code}):s32",
           f"{FLAGS}=+{lay.code_flags}({code}):s32", *(builtins or ())]
    for i in range(SLOTS):
        f = slot_fields(i)
        name = f"+{lay.tuple_items + 8 * i}(+{lay.code_localsplusnames}({code}))"
        out += [*_object_fetches(lay, f"+{lay.frame_size + 8 * i}(%{frame})", f, shift),
                f"{f['name']}=+{lay.str_ascii_data}({name}):u64[{NAME_BYTES // 8}]",
                f"{f['nlen']}=+{lay.str_length}({name}):s64"]
    return out


def _returned_fetches(interp: Interpreter, obj: str) -> list[str]:
    """The fetchargs of a `py:` return's value `obj` (model/pyargs.py
    `returned`), none where it cannot be read as 3.11's."""
    shift = _value_shift(interp.layout)
    builtins = _builtin_types(interp) if shift is not None else []
    if shift is None or not builtins:
        return []
    return builtins + _object_fetches(interp.layout, obj, slot_fields(RETURNED), shift)


def _builtin_types(interp: Interpreter) -> list[str]:
    """The fetches that say where int, bool, str and None's types are in the
    process: what PyBool_Type's `tp_base` holds (PyLong_Type's address
    there), and each type's link address, all in one file. An argument's
    kind is decided by its type's address, never by its name (a class of
    the program may be named `int`). None of them where a symbol is missing."""
    return _types_at(interp, BUILTIN_TYPES)


def _types_at(interp: Interpreter, types: dict[str, str]) -> list[str]:
    """The fetches of PyLong_Type's address in the process (`TYPES_ANCHOR`)
    and of `types`' link addresses (field: symbol), or none if a symbol is
    missing."""
    symbols = SymbolTable.load(interp.image)
    found = {name: symbols.lookup(name) for name in ("PyBool_Type", *types.values())}
    if not all(found.values()):
        return []
    at = interp.loop.handlers[interp.loop.entries[0]]
    delta = at - interp.image.link_to_file_offset(at)
    base = found["PyBool_Type"][0].link_addr + interp.layout.type_base - delta
    return [f"{TYPES_ANCHOR}=@+0x{base:x}:x64"] + [
        f"{field}=\\0x{found[symbol][0].link_addr:x}:x64" for field, symbol in types.items()]


def _yield_fetches(interp: Interpreter) -> list[str]:
    """What a yield fetches to see through an async generator's wrapper of
    the value (model/pyargs.py `yielded_type`): the value's type, and the
    type's name of what follows its header (the wrapped value, in a
    wrapper), as fixed-size words (in another object it is any word)."""
    top = f"-8(%{interp.loop.stack})"
    types = _types_at(interp, {"__py_tint": "PyLong_Type", WRAPPER_TYPE[0]: WRAPPER_TYPE[1]})
    if not types:
        return []
    held = f"+{_OB_TYPE + 8}({top})"  # (PyObject_HEAD, then the value)
    return types + [f"{YIELD_TPTR}=+{_OB_TYPE}({top}):x64",
                    f"{WRAPPED_FIELD}=+0(+{_TYPE_NAME}(+{_OB_TYPE}({held}))):"
                    f"u64[{TYPE_BYTES // 8}]"]


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def py_probes(spec: ProbeSpec, t: PyTarget, interp: Interpreter,
              script: str | None, note: str | None = None,
              with_args: bool = False, with_value: bool = False) -> list[ResolvedProbe]:
    """The probes of `spec` (a `py:` target) in `interp`; an entry fetches
    the call's arguments `with_args`, a return the value `with_value`."""
    if not t.name.isascii():
        raise ResolveError(f"py:{t.name}: only ASCII names can be matched (the names are "
                           "read as compact ASCII strings)")
    if spec.args:
        raise ResolveError(f"py:{t.name}: a py: probe fetches its own values (qualname, "
                           "file, line; type on return); give no fetchargs")
    loop, lay = interp.loop, interp.layout
    code = f"+{lay.frame_code}(%{loop.frame})"
    common = _common_fetches(lay, loop.frame)
    names = name_guard(t.name, script)
    if len(names) > MAX_GUARD:
        raise ResolveError(f"py:{t.name}: too many ways to split the name into a module and "
                           f"a function for the kernel's filter ({len(names)} bytes, at most "
                           f"{MAX_GUARD}): name fewer levels")
    alias = f"{GROUP}/{t.name}" if spec.event is None else \
        f"{spec.group or GROUP}/{spec.event}"
    unwind: UnwindExit | None = None
    notes_ret: tuple[str, ...] = ()
    if t.at and spec.is_return:
        raise ResolveError(f"py:{t.name}%{t.at}: {t.at} is a point of its own, not a "
                           "return: drop the r")
    # (the value returned or yielded is the top of the value stack)
    top_type = f"type=+0(+{_TYPE_NAME}(+{_OB_TYPE}(-8(%{loop.stack})))):string"
    oparg = f"{PY_OPARG_ARG}=+1(%{loop.next_instr}):u8"
    handlers: tuple[str, ...]
    thrown: UnwindExit | None = None
    if t.at == "yield":
        yields = tuple(h for h in YIELD_HANDLERS if h in loop.handlers)
        fetch, handlers, guard = common + [top_type, *_yield_fetches(interp)], yields, names
    elif t.at == "resume":
        fetch = common + [f"line=+{lay.code_firstlineno}({code}):s32", oparg]
        handlers, guard = loop.entries, f"{PY_OPARG_ARG} != 0 && ({names})"
        thrown = interp.thrown_resume
        if thrown is not None:
            fetch.append(f"{PY_OP_ARG}=\\0:u8")
    elif spec.is_return:
        fetch = common + [top_type]
        handlers = loop.returns
        unwind = interp.unwind_exit
        if unwind is not None:
            fetch += _not_raised()
        if with_value:
            fetch += _returned_fetches(interp, f"-8(%{loop.stack})")
        guard = names
        if unwind is None:
            notes_ret = (
                f"py:{t.name}%return: {interp.ref.display} has no DWARF that names its eval "
                "loop's exit_unwind (nor a debug file by its build-id): a call left by an "
                "exception gives no return event",)
    else:
        fetch = common + [f"line=+{lay.code_firstlineno}({code}):s32",
                          oparg,
                          *(argument_fetches(lay, loop.frame, _builtin_types(interp))
                            if with_args else ())]
        handlers = loop.entries
        guard = f"{PY_OPARG_ARG} == 0 && ({names})"
    args: tuple[FetchArg, ...] = parse_args(fetch)
    parse_condition(guard).check_fields(spec.text or t.name, {a.name: a.type for a in args})
    # (RETURN_CONST's value is in a register after its load, not on the stack)
    loaded_args = {name: parse_args(common + [
        f"type=+0(+{_TYPE_NAME}(+{_OB_TYPE}(%{reg}))):string",
        *(_not_raised() if unwind is not None else []),
        *(_returned_fetches(interp, f"%{reg}") if with_value else [])])
        for name, (_, reg) in loop.loaded.items()}
    point = f"%{t.at}" if t.at else "%return" if spec.is_return else ""
    event = c_identifier(t.name.replace(".", "_"))[:48] + point.replace("%", "__")
    notes: tuple[str, ...] = ((note,) if note else ()) + notes_ret
    if script is None and t.name.startswith("__main__."):
        notes += (f"py:{t.name}: the main script is not known (no process or command, or "
                  "code from -c, -m or stdin): __main__ matches the name in any file",)
    compiled = py_guard(t.name, script, loop, lay, handlers, resumed=t.at == "resume")
    out: list[ResolvedProbe] = []
    for handler in handlers:
        link_addr = loop.handlers[handler]
        if spec.is_return and handler in loop.loaded:
            link_addr = loop.loaded[handler][0]
        file_offset = interp.image.link_to_file_offset(link_addr)
        # A return is placed where RETURN_VALUE starts, as a return probe on
        # a function's own `ret`s is (resolve/retsites.py).
        out.append(ResolvedProbe(
            spec=spec, key=InodeKey(interp.ref.dev, interp.ref.ino, file_offset),
            path=interp.ref.path, file_offset=file_offset, kind=spec.kind,
            ret_sites=(file_offset,) if spec.is_return else None,
            group=spec.group or GROUP, event=spec.event or event,
            args=loaded_args[handler] if spec.is_return and handler in loaded_args else args,
            link_addr=link_addr, guard=guard, py_guard=compiled, computed_gotos=(loop.table,),
            alias=alias + point,
            notes=() if out else notes))
    ops = OPCODES[minor(lay.hexversion)]
    if unwind is not None:
        # A call left by an exception: the same fields, through the register
        # that holds the frame there; its `type` is the exception's (the
        # thread's: 3.11's, which holds the GIL, `_PyRuntime`'s current one;
        # from 3.12 the state the label's own call is given), shown as
        # `(raised NAME)` (model/pyargs.py). A frame that never ran has had
        # no entry, and gives no return: one pushed at the recursion limit
        # (left at once, its `prev_instr` just before its code, which the
        # kernel's filter cannot compare with the code's address: it has no
        # frame object either, which every frame that ran and raised has,
        # made for its traceback entry at the eval loop's `error`), or a
        # generator thrown into before its first next() (its last
        # instruction RETURN_GENERATOR; 3.13's `instr_ptr` is past it, at
        # the POP_TOP that follows, which never raises).
        never = ops["POP_TOP"] if interp.instr_running else ops["RETURN_GENERATOR"]
        raised = parse_args(_common_fetches(lay, unwind.frame) + [
            _raised_type(interp, unwind), f"{RAISED_FIELD}=\\1:u8", _last_op(lay, unwind.frame),
            f"{PY_FOBJ_ARG}=+{lay.frame_frame_obj}(%{unwind.frame}):x64",
            # (no value: the same fields as a return's, through the frame, unread)
            *(_returned_fetches(interp, f"%{unwind.frame}") if with_value else [])])
        out.append(_at_label(out[0], interp, unwind, raised, compiled, (never,), False,
                             f"{PY_FOBJ_ARG} != 0 && {PY_OP_ARG} != {never} && ({names})"))
    if thrown is not None:
        # A generator resumed by throw() or close(): its last instruction is
        # the YIELD_VALUE it is suspended at (a caller resumed with an
        # error, the label's other way in, has a call there), the next one
        # the RESUME it would have run; 3.13's `instr_ptr` is that RESUME.
        prev = f"+{lay.frame_prev_instr}(%{thrown.frame})"
        kept = tuple(ops[h] for h in (loop_entries(interp) if interp.instr_running
                                      else YIELD_HANDLERS) if h in ops)
        resumed = parse_args(_common_fetches(lay, thrown.frame) + [
            f"line=+{lay.code_firstlineno}(+{lay.frame_code}(%{thrown.frame})):s32",
            f"{PY_OPARG_ARG}=+{1 if interp.instr_running else 3}({prev}):u8",
            _last_op(lay, thrown.frame)])
        either = " || ".join(f"{PY_OP_ARG} == {op}" for op in kept)
        out.append(_at_label(out[0], interp, thrown, resumed, compiled, kept,
                             True, f"({either}) && ({names})"))
    return out


def loop_entries(interp: Interpreter) -> tuple[str, ...]:
    """The names of the opcodes a call starts at (RESUME and its forms)."""
    return ENTRY_HANDLERS[minor(interp.layout.hexversion)]


def _raised_type(interp: Interpreter, unwind: UnwindExit) -> str:
    """The fetch of the name of the raised exception's type at `unwind`."""
    lay = interp.layout
    if unwind.tstate is not None:  # (3.12 on: the exception object itself)
        exc = f"+{lay.tstate_current_exception}({unwind.tstate})"
        return f"type=+0(+{_TYPE_NAME}(+{_OB_TYPE}({exc}))):string"
    tstate = _current_thread(interp, unwind.link_addr)
    return f"type=+0(+{_TYPE_NAME}(+{lay.tstate_curexc_type}({tstate}))):string"


def _current_thread(interp: Interpreter, link_addr: int) -> str:
    """The fetch of the thread state that holds the GIL, from a probe at
    `link_addr` (`@+` is relative to the probed segment)."""
    runtime = SymbolTable.load(interp.image).lookup("_PyRuntime")
    if not runtime:
        raise ResolveError(f"{interp.ref.display}: no _PyRuntime symbol")
    delta = link_addr - interp.image.link_to_file_offset(link_addr)
    at = runtime[0].link_addr + interp.layout.runtime_tstate_current - delta
    return f"@+0x{at:x}"


def _not_raised() -> list[str]:
    """What an ordinary return fetches where a raised one is probed too."""
    return [f"{RAISED_FIELD}=\\0:u8", f"{PY_OP_ARG}=\\0:u8", f"{PY_FOBJ_ARG}=\\0:x64"]


def _last_op(lay: Layout, frame: str) -> str:
    """The fetch of the opcode of the frame's last instruction."""
    return f"{PY_OP_ARG}=+0(+{lay.frame_prev_instr}(%{frame})):u8"


def _at_label(first: ResolvedProbe, interp: Interpreter, label: UnwindExit,
              args: tuple[FetchArg, ...], compiled: PyGuard | None, ops: tuple[int, ...],
              kept: bool, guard: str) -> ResolvedProbe:
    """`first` moved to one of the eval loop's labels (pyexits.py), its
    frame in another register there, and the frame's last opcode tested (in
    the program, a frame that never ran (its `prev_instr` just before its
    code) is told by that, exactly)."""
    file_offset = interp.image.link_to_file_offset(label.link_addr)
    return replace(
        first, key=InodeKey(interp.ref.dev, interp.ref.ino, file_offset),
        file_offset=file_offset, ret_sites=(file_offset,) if first.is_return else None,
        args=args, link_addr=label.link_addr, notes=(), guard=guard,
        py_guard=None if compiled is None else replace(
            compiled, frame=label.frame, oparg=None, resumed=False,
            prev_instr=interp.layout.frame_prev_instr, prev_ops=ops, prev_kept=kept,
            code_start=None if kept else
            interp.layout.code_code - (0 if interp.instr_running else 2)))


def _common_fetches(lay: Layout, frame: str) -> list[str]:
    """What every `py:` probe fetches of the frame in register `frame`."""
    code = f"+{lay.frame_code}(%{frame})"
    text = f"+{lay.str_ascii_data}"
    return [f"qualname={text}(+{lay.code_qualname}({code})):string",
            f"file={text}(+{lay.code_filename}({code})):string",
            f"{FRAME_ARG}=%{frame}:x64"]
