"""Where the fields of CPython's structures sit in one build (what Python stacks and
`py:` probes read).

The layouts differ per version and per build (a debug build, configure
options), so they are never assumed. Where the build has DWARF (in the
file, or a debug file by its build-id) they are read from it (dwarf.py);
otherwise (a stripped build) the C compiler computes `offsetof` for every
field against the headers installed with that very version,
`PY_VERSION_HEX` checked against the interpreter's `Py_Version`. Once per
build, cached by the file's build-id. Where the interpreter describes its
own layout (`_Py_DebugOffsets`, from 3.13), the fields it gives are taken
from it. The fields differ a little per version (pyversions.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from uprobes.elf.image import ElfImage
from uprobes.errors import UprobesError
from uprobes.resolve.pydwarf import debug_file_for, fields_from_dwarf
from uprobes.resolve.pyversions import (
    C_TYPES,
    CHANGED,
    DEBUG_COOKIE,
    DEBUG_NAMES,
    SUPPORTED,
    minor,
)

_COMPILE_TIMEOUT_S = 60.0
SUPPORTED_TEXT = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
"""The versions read, as a line says them: `3.11, 3.12, 3.13`."""
SUPPORTED_OR = ", ".join(f"{a}.{b}" for a, b in SUPPORTED[:-1]) + \
    f" or {SUPPORTED[-1][0]}.{SUPPORTED[-1][1]}"
"""`3.11, 3.12 or 3.13`."""


class PythonLayoutError(UprobesError):
    """An interpreter whose frames cannot be read (the message says why, in one line)."""


def version_text(hexversion: int) -> str:
    """0x030b02f0 -> '3.11.2'."""
    return f"{hexversion >> 24}.{(hexversion >> 16) & 0xff}.{(hexversion >> 8) & 0xff}"


# Each field the reader needs, as the C expression that gives its offset
# (or size, or bit mask); the generated program prints `name value` lines.
_FIELDS = {
    "runtime_interpreters_head": "offsetof(_PyRuntimeState, interpreters.head)",
    "interp_next": "offsetof(PyInterpreterState, next)",
    "interp_threads_head": "offsetof(PyInterpreterState, threads.head)",
    "tstate_next": "offsetof(PyThreadState, next)",
    "tstate_native_thread_id": "offsetof(PyThreadState, native_thread_id)",
    "tstate_thread_id": "offsetof(PyThreadState, thread_id)",
    "tstate_cframe": "offsetof(PyThreadState, cframe)",
    "tstate_size": "sizeof(PyThreadState)",
    "cframe_current_frame": "offsetof(_PyCFrame, current_frame)",
    "frame_code": "offsetof(_PyInterpreterFrame, f_code)",
    "frame_previous": "offsetof(_PyInterpreterFrame, previous)",
    "frame_prev_instr": "offsetof(_PyInterpreterFrame, prev_instr)",
    "frame_is_entry": "offsetof(_PyInterpreterFrame, is_entry)",
    "frame_owner": "offsetof(_PyInterpreterFrame, owner)",
    "frame_size": "offsetof(_PyInterpreterFrame, localsplus)",
    "owned_by_generator": "FRAME_OWNED_BY_GENERATOR",
    "code_filename": "offsetof(PyCodeObject, co_filename)",
    "code_qualname": "offsetof(PyCodeObject, co_qualname)",
    "code_linetable": "offsetof(PyCodeObject, co_linetable)",
    "code_firstlineno": "offsetof(PyCodeObject, co_firstlineno)",
    "code_firsttraceable": "offsetof(PyCodeObject, _co_firsttraceable)",
    "code_code": "offsetof(PyCodeObject, co_code_adaptive)",
    "var_size": "offsetof(PyVarObject, ob_size)",
    "bytes_data": "offsetof(PyBytesObject, ob_sval)",
    "str_length": "offsetof(PyASCIIObject, length)",
    "str_state": "offsetof(PyASCIIObject, state)",
    "str_ascii_data": "sizeof(PyASCIIObject)",
    "str_compact_data": "sizeof(PyCompactUnicodeObject)",
    # What pycode.py walks: sys.modules, module and class dicts (their
    # entries in order, never hashed), functions, their code and its constants.
    "code_consts": "offsetof(PyCodeObject, co_consts)",
    "code_name": "offsetof(PyCodeObject, co_name)",
    "code_flags": "offsetof(PyCodeObject, co_flags)",
    "code_argcount": "offsetof(PyCodeObject, co_argcount)",
    "code_posonlyargcount": "offsetof(PyCodeObject, co_posonlyargcount)",
    "code_kwonlyargcount": "offsetof(PyCodeObject, co_kwonlyargcount)",
    "code_nlocalsplus": "offsetof(PyCodeObject, co_nlocalsplus)",
    "code_localsplusnames": "offsetof(PyCodeObject, co_localsplusnames)",
    "code_localspluskinds": "offsetof(PyCodeObject, co_localspluskinds)",
    "interp_modules": "offsetof(PyInterpreterState, modules)",
    "object_type": "offsetof(PyObject, ob_type)",
    "module_dict": "offsetof(PyModuleObject, md_dict)",
    "dict_keys": "offsetof(PyDictObject, ma_keys)",
    "dict_values": "offsetof(PyDictObject, ma_values)",
    "dictkeys_log2_size": "offsetof(PyDictKeysObject, dk_log2_size)",
    "dictkeys_log2_index_bytes": "offsetof(PyDictKeysObject, dk_log2_index_bytes)",
    "dictkeys_kind": "offsetof(PyDictKeysObject, dk_kind)",
    "dictkeys_nentries": "offsetof(PyDictKeysObject, dk_nentries)",
    "dictkeys_indices": "offsetof(PyDictKeysObject, dk_indices)",
    "dictkeys_general": "DICT_KEYS_GENERAL",
    "dict_entry_size": "sizeof(PyDictKeyEntry)",
    "dict_entry_key": "offsetof(PyDictKeyEntry, me_key)",
    "dict_entry_value": "offsetof(PyDictKeyEntry, me_value)",
    "dict_unicode_entry_size": "sizeof(PyDictUnicodeEntry)",
    "dict_unicode_entry_key": "offsetof(PyDictUnicodeEntry, me_key)",
    "dict_unicode_entry_value": "offsetof(PyDictUnicodeEntry, me_value)",
    "func_code": "offsetof(PyFunctionObject, func_code)",
    "func_qualname": "offsetof(PyFunctionObject, func_qualname)",
    "func_module": "offsetof(PyFunctionObject, func_module)",
    "func_closure": "offsetof(PyFunctionObject, func_closure)",
    "type_name": "offsetof(PyTypeObject, tp_name)",
    "type_flags": "offsetof(PyTypeObject, tp_flags)",
    "type_dict": "offsetof(PyTypeObject, tp_dict)",
    "type_base": "offsetof(PyTypeObject, tp_base)",
    "tuple_items": "offsetof(PyTupleObject, ob_item)",
    "cell_ref": "offsetof(PyCellObject, ob_ref)",
    "staticmethod_callable": "offsetof(staticmethod, sm_callable)",
    "classmethod_callable": "offsetof(classmethod, cm_callable)",
    "property_get": "offsetof(propertyobject, prop_get)",
    "property_set": "offsetof(propertyobject, prop_set)",
    "property_del": "offsetof(propertyobject, prop_del)",
    # What a py: return by an exception reads (3.11): whether its frame has
    # an object, the thread that holds the GIL and its exception's type.
    "frame_frame_obj": "offsetof(_PyInterpreterFrame, frame_obj)",
    "runtime_tstate_current": "offsetof(_PyRuntimeState, gilstate.tstate_current)",
    "tstate_curexc_type": "offsetof(PyThreadState, curexc_type)",
}
# Bit fields have no offsetof: set one in a zeroed struct and print the word.
_MASKS = {"str_kind_mask": "kind = 7", "str_compact_mask": "compact = 1",
          "str_ascii_mask": "ascii = 1"}


def _c_fields(hexversion: int) -> dict[str, str]:
    """`_FIELDS` as the version of `hexversion` names them."""
    fields = dict(_FIELDS)
    for name, member in CHANGED.get(minor(hexversion), {}).items():
        if member is None:
            fields.pop(name, None)
        elif member[0] == "enum":
            fields[name] = member[1]
        else:
            fields[name] = f"offsetof({C_TYPES[member[0]]}, {member[1]})"
    return fields


def fields_for(hexversion: int) -> frozenset[str]:
    """Every field a Layout of that version has, whichever way it was
    derived: a cached layout lacking one (written by an older uprobes) is
    derived again."""
    return frozenset(_c_fields(hexversion)) | frozenset(_MASKS)


FIELDS = fields_for(0x030B00F0)
"""Every field of a 3.11 Layout."""
# staticmethod and classmethod are private to Objects/funcobject.c, property
# to Objects/descrobject.c: their structs as 3.11 defines them (the DWARF
# path reads the build's own).
_PRIVATE = [
    "typedef struct { PyObject_HEAD PyObject *sm_callable; PyObject *sm_dict; } staticmethod;",
    "typedef struct { PyObject_HEAD PyObject *cm_callable; PyObject *cm_dict; } classmethod;",
    "typedef struct { PyObject_HEAD PyObject *prop_get; PyObject *prop_set; "
    "PyObject *prop_del; PyObject *prop_doc; PyObject *prop_name; int getter_doc; } "
    "propertyobject;",
]


@dataclass(frozen=True)
class Layout:
    """One build's offsets (bytes) and masks, by the names in `_FIELDS`."""

    hexversion: int
    fields: dict[str, int]
    source: str = "headers"
    """Where the offsets came from: "dwarf" (the build's debug info) or
    "headers" (compiled against its headers)."""

    def __post_init__(self) -> None:
        # Plain attributes: a frame walk reads a dozen of them per frame.
        for name, value in self.fields.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> int:  # only for names not in `fields`
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None

    def current_frame_hops(self) -> tuple[int, ...]:
        """The offsets to follow from a thread state to its current frame:
        through `cframe` up to 3.12, directly from 3.13."""
        if "tstate_cframe" in self.fields:
            return self.fields["tstate_cframe"], self.fields["cframe_current_frame"]
        return (self.fields["tstate_current_frame"],)

    @property
    def entry_frames_apart(self) -> bool:
        """True: each C call of the eval loop is marked by a frame of its own
        (owned by the C stack, not a Python frame: 3.12 on); False: by the
        `is_entry` flag of its outermost Python frame (3.11)."""
        return "owned_by_cstack" in self.fields


def _program(hexversion: int) -> str:
    lines = [
        "#define Py_BUILD_CORE 1",
        "#include <Python.h>",
        "#include <internal/pycore_runtime.h>",
        "#include <internal/pycore_interp.h>",
        "#include <internal/pycore_frame.h>",
        "#include <internal/pycore_dict.h>",
        "#include <internal/pycore_moduleobject.h>",
        "#include <stddef.h>", "#include <stdio.h>", "#include <string.h>",
        *_PRIVATE,
        "int main(void) {",
        '  printf("hexversion %lu\\n", (unsigned long)PY_VERSION_HEX);',
        "  PyASCIIObject o; unsigned int w;",
    ]
    for name, expr in _c_fields(hexversion).items():
        lines.append(f'  printf("{name} %lu\\n", (unsigned long)({expr}));')
    for name, assign in _MASKS.items():
        lines.append(f"  memset(&o, 0, sizeof o); o.state.{assign}; memcpy(&w, &o.state, 4);")
        lines.append(f'  printf("{name} %u\\n", w);')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def header_dirs(path: str, hexversion: int) -> list[str]:
    """Where the headers of the interpreter in `path` would be installed: its
    prefix's include/pythonX.Y (and X.Yd for a debug build's `pythonX.Yd`)."""
    major, minor = hexversion >> 24, (hexversion >> 16) & 0xff
    base = os.path.basename(path)
    m = re.match(rf"(?:lib)?python{major}\.{minor}([a-z]*)", base)
    flags = m.group(1) if m else ""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(path)))
    names = [f"python{major}.{minor}{flags}"] + ([f"python{major}.{minor}"] if flags else [])
    return [os.path.join(prefix, "include", n) for n in names]


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "uprobes", "cpython")


def compute_layout(include: str, hexversion: int = 0x030B00F0) -> Layout:
    """Compile the offset program for version `hexversion` (its fields)
    against the headers in `include` and run it."""
    with tempfile.TemporaryDirectory(prefix="uprobes-pylayout-") as tmp:
        src, exe = os.path.join(tmp, "layout.c"), os.path.join(tmp, "layout")
        with open(src, "w") as f:
            f.write(_program(hexversion))
        try:
            done = subprocess.run(["cc", f"-I{include}", "-o", exe, src], capture_output=True,
                                  text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PythonLayoutError(f"cannot run the C compiler on {include}'s headers: "
                                    f"{e}") from None
        if done.returncode != 0:
            errors = [x for x in done.stderr.splitlines() if "error" in x]
            first = (errors or done.stderr.strip().splitlines() or ["?"])[0]
            raise PythonLayoutError(f"the headers in {include} do not compile: {first}")
        out = subprocess.run([exe], capture_output=True, text=True,
                             timeout=_COMPILE_TIMEOUT_S, check=True).stdout
    values = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    return Layout(values.pop("hexversion"), values)


def layout_for(image: ElfImage, path: str, hexversion: int,
               eval_link_addr: int | None = None,
               funcobject_link_addr: int | None = None,
               descrobject_link_addr: int | None = None,
               runtime_link_addr: int | None = None) -> Layout:
    """The layout of the interpreter in `image` (the file holding
    `_PyRuntime`, installed at `path`), whose `Py_Version` is `hexversion`:
    from its DWARF where it has some (`eval_link_addr`: where
    `_PyEval_EvalFrameDefault` is, `funcobject_link_addr` and
    `descrobject_link_addr`: where `PyStaticMethod_New` and
    `PyDescr_NewGetSet` are, whose units are read), else from its
    headers, and where it has them from the debug offsets at the start of
    `_PyRuntime` (at `runtime_link_addr`); PythonLayoutError says in one
    line why there is none."""
    found = f"Python {version_text(hexversion)} ({path})"
    if minor(hexversion) not in SUPPORTED:
        raise PythonLayoutError(f"{found}: its frames cannot be read (uprobes reads "
                                f"CPython {SUPPORTED_TEXT})")
    wanted = fields_for(hexversion)
    cached = os.path.join(_cache_dir(), f"{image.build_id}.json") if image.build_id else None
    if cached:
        try:
            with open(cached) as f:
                data = json.load(f)
            if data["hexversion"] == hexversion and wanted <= set(data["fields"]):
                return Layout(hexversion, data["fields"], data.get("source", "headers"))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    layout = _from_dwarf(image, hexversion, eval_link_addr, funcobject_link_addr,
                         descrobject_link_addr)
    tried = []
    for include in header_dirs(path, hexversion) if layout is None else ():
        if not os.path.exists(os.path.join(include, "internal", "pycore_frame.h")):
            tried.append(include)
            continue
        layout = compute_layout(include, hexversion)
        if layout.hexversion != hexversion:
            tried.append(f"{include} (headers of {version_text(layout.hexversion)})")
            layout = None
            continue
        break
    if layout is None:
        raise PythonLayoutError(f"{found}: its frames cannot be read without its own headers "
                                f"(none found in {', '.join(tried)}; Debian: python3.X-dev)")
    described = None if runtime_link_addr is None else \
        debug_offsets(image, runtime_link_addr, hexversion)
    if described:
        layout = Layout(hexversion, {**layout.fields, **{k: v for k, v in described.items()
                                                          if k in wanted}},
                        f"debug offsets+{layout.source}")
    _store(cached, layout)
    return layout


def debug_offsets(image: ElfImage, runtime_link_addr: int, hexversion: int
                  ) -> dict[str, int] | None:
    """The offsets the interpreter describes about itself (`_Py_DebugOffsets`,
    the start of `_PyRuntime` as the file initialises it), by the names of
    pyversions.DEBUG_NAMES; None: this version has none, or the words there
    are not its (no cookie, another version)."""
    names = DEBUG_NAMES.get(minor(hexversion))
    if names is None:
        return None
    try:
        raw = image.read_link(runtime_link_addr, len(DEBUG_COOKIE) + 8 * len(names))
    except UprobesError:
        return None
    if not raw.startswith(DEBUG_COOKIE):
        return None
    at = len(DEBUG_COOKIE)
    words = dict(zip(names, (int.from_bytes(raw[at + 8 * i:at + 8 * i + 8], "little")
                             for i in range(len(names))), strict=True))
    if minor(words["version"]) != minor(hexversion):
        return None
    return words


def _from_dwarf(image: ElfImage, hexversion: int, eval_link_addr: int | None,
                funcobject_link_addr: int | None,
                descrobject_link_addr: int | None) -> Layout | None:
    if eval_link_addr is None:
        return None
    debug = debug_file_for(image.path, image.build_id)
    fields = None if debug is None else \
        fields_from_dwarf(debug, eval_link_addr, funcobject_link_addr, descrobject_link_addr,
                          CHANGED.get(minor(hexversion), {}))
    return None if fields is None else Layout(hexversion, fields, "dwarf")


def _store(cached: str | None, layout: Layout) -> None:
    if not cached:
        return
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with open(cached + ".tmp", "w") as f:
            json.dump({"hexversion": layout.hexversion, "fields": layout.fields,
                       "source": layout.source}, f)
        os.replace(cached + ".tmp", cached)
    except OSError:
        pass  # computed again next time
