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
