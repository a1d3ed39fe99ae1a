"""What differs between the CPython versions uprobes reads, as names: which
struct member gives a layout field in each version, and the format of the
layout 3.13 describes about itself (`_Py_DebugOffsets`). The offsets
themselves always come from the build (pylayout.py); only the member names
and that table's order are known here.

3.12 moved `modules` into `interp->imports` and marks the C call of the
eval loop by a frame owned by the C stack (`FRAME_OWNED_BY_CSTACK`) instead
of 3.11's `is_entry` flag. 3.13 drops `_PyCFrame` (the thread state points
at the current frame itself), names the frame's code `f_executable` and
keeps the instruction running, `instr_ptr`, where 3.12 kept the one before
the next, `prev_instr` (the same code unit while a call is made).
"""

from __future__ import annotations

SUPPORTED = ((3, 11), (3, 12), (3, 13))

C_TYPES = {"runtime": "_PyRuntimeState", "interp": "PyInterpreterState",
           "tstate": "PyThreadState", "cframe": "_PyCFrame", "frame": "_PyInterpreterFrame"}
"""The C names of the structs whose members change, by the short names
pydwarf.py gives them."""

Member = tuple[str, str] | None
"""(struct's short name, member path); an enumerator as ("enum", NAME); None:
the version has no such field."""

_CHANGED_312: dict[str, Member] = {
    "frame_is_entry": None,
    "owned_by_cstack": ("enum", "FRAME_OWNED_BY_CSTACK"),
    "interp_modules": ("interp", "imports.modules"),
    "tstate_status": ("tstate", "_status"),  # whose `active` bit says which state runs
    # 3.11's state holding the GIL (a py: return by an exception, and the
    # trap-free walk's, pywalk.py); later ones keep it per thread.
    "runtime_tstate_current": None,
    "tstate_curexc_type": None,
    # (3.12 keeps the exception itself, whose type is its ob_type)
    "tstate_current_exception": ("tstate", "current_exception"),
}
CHANGED: dict[tuple[int, int], dict[str, Member]] = {
    (3, 11): {},
    (3, 12): _CHANGED_312,
    (3, 13): {**_CHANGED_312, "tstate_cframe": None, "cframe_current_frame": None,
              "tstate_current_frame": ("tstate", "current_frame"),
              "frame_code": ("frame", "f_executable"),
              "frame_prev_instr": ("frame", "instr_ptr")},
}
"""Per version, the fields whose member differs from 3.11's (or that it
lacks, or that only it has)."""


def minor(hexversion: int) -> tuple[int, int]:
    """0x030c01f0 -> (3, 12)."""
    return hexversion >> 24, (hexversion >> 16) & 0xff


DEBUG_COOKIE = b"xdebugpy"
# `_Py_DebugOffsets` (Include/internal/pycore_runtime.h), the first member of
# `_PyRuntime` from 3.13: every member a uint64, in this order after the
# cookie. Its `version` says which CPython wrote it.
_DEBUG_313 = (
    ("version", "free_threaded"),
    ("runtime_size", "runtime_finalizing", "runtime_interpreters_head"),
    ("interp_size", "interp_id", "interp_next", "interp_threads_head", "interp_gc",
     "interp_modules", "interp_sysdict", "interp_builtins", "interp_ceval_gil",
     "interp_gil_runtime_state", "interp_gil_enabled", "interp_gil_locked",
     "interp_gil_holder"),
    ("tstate_size", "tstate_prev", "tstate_next", "tstate_interp", "tstate_current_frame",
     "tstate_thread_id", "tstate_native_thread_id", "tstate_datastack_chunk",
     "tstate_status"),
    ("frame_struct_size", "frame_previous", "frame_code", "frame_prev_instr", "frame_size",
     "frame_owner"),
    ("code_size", "code_filename", "code_name", "code_qualname", "code_linetable",
     "code_firstlineno", "code_argcount", "code_localsplusnames", "code_localspluskinds",
     "code_code"),
    ("object_size", "object_type"),
    ("type_size", "type_name", "type_repr", "type_flags"),
    ("tuple_size", "tuple_items", "var_size"),
    ("list_size", "list_items", "list_ob_size"),
    ("dict_size", "dict_keys", "dict_values"),
    ("float_size", "float_fval"),
    ("long_size", "long_lv_tag", "long_ob_digit"),
    ("bytes_size", "bytes_ob_size", "bytes_data"),
    ("str_size", "str_state", "str_length", "str_ascii_data"),
    ("gc_size", "gc_collecting"),
)
DEBUG_NAMES: dict[tuple[int, int], tuple[str, ...]] = {
    (3, 13): tuple(name for group in _DEBUG_313 for name in group)}
"""Per version, the uint64 words of `_Py_DebugOffsets` after its cookie,
named as layout fields where a layout has the field (others are named for
their place only)."""


OPCODES: dict[tuple[int, int], dict[str, int]] = {
    (3, 11): {"RESUME": 151, "RESUME_QUICK": 150, "RETURN_VALUE": 83, "YIELD_VALUE": 86,
              "RETURN_GENERATOR": 75, "POP_TOP": 1},
    (3, 12): {"RESUME": 151, "INSTRUMENTED_RESUME": 240, "RETURN_VALUE": 83,
              "INSTRUMENTED_RETURN_VALUE": 242, "RETURN_CONST": 121,
              "INSTRUMENTED_RETURN_CONST": 247, "YIELD_VALUE": 150,
              "INSTRUMENTED_YIELD_VALUE": 243, "RETURN_GENERATOR": 75, "POP_TOP": 1},
    (3, 13): {"RESUME": 149, "RESUME_CHECK": 207, "INSTRUMENTED_RESUME": 236,
              "RETURN_VALUE": 36, "INSTRUMENTED_RETURN_VALUE": 239, "RETURN_CONST": 103,
              "INSTRUMENTED_RETURN_CONST": 240, "YIELD_VALUE": 118,
              "INSTRUMENTED_YIELD_VALUE": 241, "RETURN_GENERATOR": 35, "POP_TOP": 32},
}
"""Per version, the numbers of the opcodes whose handlers `py:` probes use
(each version's Include/opcode.h or opcode_ids.h; the tests check them
against the interpreter's own `dis`)."""

ENTRY_HANDLERS: dict[tuple[int, int], tuple[str, ...]] = {
    (3, 11): ("RESUME", "RESUME_QUICK"),
    (3, 12): ("RESUME", "INSTRUMENTED_RESUME"),
    (3, 13): ("RESUME", "RESUME_CHECK", "INSTRUMENTED_RESUME"),
}
"""Where a Python call starts: RESUME, its quickened form once the code is
warm (3.11, 3.13), and its instrumented form while sys.monitoring (or, from
3.12, sys.settrace or sys.setprofile) watches the code; each call passes
exactly one of them. Its argument is 0 at a function's start in every
version (3.12 adds where a generator resumes in its low two bits, 3.13 a
depth bit above them: both only after a yield or await)."""
RETURN_HANDLERS: dict[tuple[int, int], tuple[str, ...]] = {
    (3, 11): ("RETURN_VALUE",),
    (3, 12): ("RETURN_VALUE", "INSTRUMENTED_RETURN_VALUE", "RETURN_CONST",
              "INSTRUMENTED_RETURN_CONST"),
    (3, 13): ("RETURN_VALUE", "INSTRUMENTED_RETURN_VALUE", "RETURN_CONST",
              "INSTRUMENTED_RETURN_CONST"),
}
"""Where a Python call returns: RETURN_VALUE pops the value from the stack;
RETURN_CONST (3.12 on) returns `co_consts[oparg]`, loaded in the handler."""
