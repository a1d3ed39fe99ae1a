"""Where a CPython runtime is in a process, and reading its objects there.

`_PyRuntime` is a symbol of the executable or of libpython; `Py_Version`
says which CPython it is, and the build's layout (pylayout.py) where its
structures' fields are. What reads the process (its Python stacks, its code
objects by name) starts from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.errors import UprobesError
from uprobes.resolve.pylayout import SUPPORTED_TEXT, Layout, PythonLayoutError, layout_for
from uprobes.sys import procfs

Read = Callable[[int, int], bytes]
"""Read `n` bytes of the process at a runtime address (raises UprobesError)."""

MAX_STR = 4096
_CANDIDATE = re.compile(r"(lib)?python\d+\.\d+[a-z]*(\.so[.\d]*)?$")


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 8], "little")


_PAGE = 4096


class Pages:
    """A walk's reads, served from whole pages read once: frames sit side
    by side in the thread's data stack and code objects near each other, so
    a walk costs a read per page touched rather than two per frame (a read
    is a system call). A mapped address's whole page is readable."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self._pages: dict[int, bytes] = {}

    def __call__(self, addr: int, n: int) -> bytes:
        first = addr & ~(_PAGE - 1)
        end = addr + n
        if end <= first + _PAGE:
            page = self._pages.get(first)
            if page is None:
                page = self._pages[first] = self._read(first, _PAGE)
            return page[addr - first:end - first]
        return self._read(addr, n)


TYPE_OBJECTS = ("PyFunction_Type", "PyCode_Type", "PyStaticMethod_Type", "PyClassMethod_Type",
                "PyProperty_Type", "PyModule_Type")
"""The runtime's type objects an object's type is compared with (pycode.py)."""


@dataclass(frozen=True)
class Interpreter:
    """A CPython runtime in one process: where `_PyRuntime` and `Py_Version` are."""

    path: str
    runtime_addr: int
    version_addr: int
    hexversion: int
    layout: Layout
    types: tuple[tuple[str, int], ...] = ()
    """Runtime addresses of the TYPE_OBJECTS the file names, by name."""


def find_interpreter(pid: int) -> Interpreter | None:
    """The CPython runtime mapped in `pid` (None: none is); PythonLayoutError
    when there is one whose frames cannot be read."""
    seen: set[str] = set()
    for m in procfs.maps(pid):
        if not m.executable or m.path in seen or not _CANDIDATE.match(os.path.basename(m.path)):
            continue
        seen.add(m.path)
        image = _open_mapped(pid, m)
        if image is None:
            continue
        try:
            symbols = SymbolTable.load(image)
        except UprobesError:
            continue
        runtime, version = symbols.lookup("_PyRuntime"), symbols.lookup("Py_Version")
        if not runtime:
            continue
        if not version:  # before 3.11 no build says its version as a symbol
            raise PythonLayoutError(f"a Python older than 3.11 ({m.path}): its frames cannot "
                                    f"be read (uprobes reads CPython {SUPPORTED_TEXT})")
        try:
            bias = m.start - image.file_to_link_addr(m.file_offset)
            hexversion = int.from_bytes(image.read_link(version[0].link_addr, 4), "little")
        except UprobesError:
            continue
        evals = symbols.lookup("_PyEval_EvalFrameDefault")
        statics, descrs = (symbols.lookup(name)
                           for name in ("PyStaticMethod_New", "PyDescr_NewGetSet"))
        layout = layout_for(image, m.path, hexversion, evals[0].link_addr if evals else None,
                            statics[0].link_addr if statics else None,
                            descrs[0].link_addr if descrs else None, runtime[0].link_addr)
        types = tuple((name, bias + found[0].link_addr) for name in TYPE_OBJECTS
                      if (found := symbols.lookup(name)))
        return Interpreter(m.path, bias + runtime[0].link_addr, bias + version[0].link_addr,
                           hexversion, layout, types)
    return None


def _open_mapped(pid: int, m: procfs.Mapping) -> ElfImage | None:
    """The file of mapping `m`: by its own path when that is the very file
    (as the process sees it otherwise)."""
    try:
        st = os.stat(m.path)
        same = (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) == \
            (m.inode, m.dev_major, m.dev_minor)
    except OSError:
        same = False
    try:
        return ElfImage.open(m.path if same else f"/proc/{pid}/root{m.path}")
    except UprobesError:
        return None


def read_str(read: Read, addr: int, lay: Layout) -> str:
    """A str object's text (compact strings, as code objects' names are)."""
    head = read(addr, lay.str_compact_data)
    state = int.from_bytes(head[lay.str_state:lay.str_state + 4], "little")
    length = min(_u64(head, lay.str_length), MAX_STR)
    if not state & lay.str_compact_mask:
        return "?"
    if state & lay.str_ascii_mask:
        return read(addr + lay.str_ascii_data, length).decode("latin-1")
    shift = (lay.str_kind_mask & -lay.str_kind_mask).bit_length() - 1
    width = (state & lay.str_kind_mask) >> shift
    codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}.get(width)
    if codec is None:
        return "?"
    return read(addr + lay.str_compact_data, length * width).decode(codec, "replace")
