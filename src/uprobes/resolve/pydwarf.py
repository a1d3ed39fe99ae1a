"""A CPython build's layout from its own DWARF, where it has some (a build
with debug info in the file, or a debug file found by its build-id): the
struct members `layout.py` names, read from the compile unit of the eval
loop (Python/ceval.c), which uses every struct a frame walk reads.

pyelftools parses the one unit, found through `.debug_aranges` by the
address of `_PyEval_EvalFrameDefault` (walking every unit to it takes
seconds on libpython); bit fields as DWARF 5 (`DW_AT_data_bit_offset`) or
DWARF 4 (`DW_AT_bit_offset`, counted from the storage unit's top) give them.
"""

from __future__ import annotations

import itertools
from typing import Any

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile

# Struct (or typedef) names -> the names the fields below use for them.
_TYPES = {"_PyRuntimeState": "runtime", "_is": "interp", "_ts": "tstate",
          "_PyCFrame": "cframe", "_PyInterpreterFrame": "frame", "PyCodeObject": "code",
          "PyVarObject": "var", "PyBytesObject": "bytes", "PyASCIIObject": "ascii",
          "PyCompactUnicodeObject": "compact"}
# field -> (type, member path) for offsets.
_OFFSETS = {
    "runtime_interpreters_head": ("runtime", "interpreters.head"),
    "interp_next": ("interp", "next"), "interp_threads_head": ("interp", "threads.head"),
    "tstate_next": ("tstate", "next"), "tstate_native_thread_id": ("tstate", "native_thread_id"),
    "tstate_cframe": ("tstate", "cframe"), "cframe_current_frame": ("cframe", "current_frame"),
    "frame_code": ("frame", "f_code"), "frame_previous": ("frame", "previous"),
    "frame_prev_instr": ("frame", "prev_instr"), "frame_is_entry": ("frame", "is_entry"),
    "frame_owner": ("frame", "owner"), "frame_size": ("frame", "localsplus"),
    "code_filename": ("code", "co_filename"), "code_qualname": ("code", "co_qualname"),
    "code_linetable": ("code", "co_linetable"), "code_firstlineno": ("code", "co_firstlineno"),
    "code_firsttraceable": ("code", "_co_firsttraceable"),
    "code_code": ("code", "co_code_adaptive"), "var_size": ("var", "ob_size"),
    "bytes_data": ("bytes", "ob_sval"), "str_length": ("ascii", "length"),
    "str_state": ("ascii", "state"),
}
_SIZES = {"tstate_size": "tstate", "str_ascii_data": "ascii", "str_compact_data": "compact"}
_BITS = {"str_kind_mask": "kind", "str_compact_mask": "compact", "str_ascii_mask": "ascii"}


def _name(die: DIE) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return None if attr is None else str(attr.value.decode())


def _target(die: DIE) -> DIE:
    """The struct behind typedefs, const and volatile."""
    while die.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type"):
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die


def _member(struct: DIE, name: str) -> DIE:
    for child in struct.iter_children():
        if child.tag == "DW_TAG_member" and _name(child) == name:
            return child
    raise KeyError(f"{_name(struct)}.{name}")


def _offset(struct: DIE, path: str) -> int:
    total = 0
    for part in path.split("."):
        member = _member(struct, part)
        total += int(member.attributes["DW_AT_data_member_location"].value)
        struct = _target(member.get_DIE_from_attribute("DW_AT_type"))
    return total


def _mask(state: DIE, name: str) -> int:
    """The bits of `name` in the 32-bit word at the start of `state`."""
    member = _member(state, name)
    attrs = member.attributes
    size = int(attrs["DW_AT_bit_size"].value)
    if "DW_AT_data_bit_offset" in attrs:
        low = int(attrs["DW_AT_data_bit_offset"].value)
    else:
        unit = int(attrs["DW_AT_byte_size"].value) * 8
        located = attrs.get("DW_AT_data_member_location")
        base = 0 if located is None else int(located.value) * 8
        low = base + unit - int(attrs["DW_AT_bit_offset"].value) - size
    return ((1 << size) - 1) << low


def debug_file_for(path: str, build_id: str | None) -> str | None:
    """The file with `path`'s DWARF: itself, or its debug file by build-id."""
    candidates = [path]
    if build_id:
        candidates.append(f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug")
    for candidate in candidates:
        try:
            with open(candidate, "rb") as f:
                if ELFFile(f).get_section_by_name(".debug_info") is not None:
                    return candidate
        except (OSError, ELFError, ELFParseError):
            continue
    return None


def fields_from_dwarf(path: str, eval_link_addr: int) -> dict[str, int] | None:
    """layout.py's fields from the DWARF of `path` (the interpreter's file or
    its debug file); `eval_link_addr`: `_PyEval_EvalFrameDefault`'s address,
    whose unit is read. None: no such unit, or a member is missing."""
    try:
        with open(path, "rb") as f:
            dwarf = ELFFile(f).get_dwarf_info()
            units: list[Any] = []
            aranges = dwarf.get_aranges()
            at = None if aranges is None else aranges.cu_offset_at_addr(eval_link_addr)
            if at is not None:
                units.append(dwarf.get_CU_at(at))
            # An LTO build's unit at that address is a partition (`<artificial>`)
            # whose types live in the unit of the source file: look for that next.
            for cu in itertools.chain(units, _ceval_units(dwarf)):
                found = _types(cu)
                if found is not None:
                    return _fields(*found)
            return None
    except (OSError, ELFError, ELFParseError, KeyError, ValueError, AttributeError):
        return None


def _ceval_units(dwarf: Any) -> Any:
    for cu in dwarf.iter_CUs():
        name = _name(cu.get_top_DIE())
        if name is not None and name.endswith("ceval.c"):
            yield cu


def _types(cu: Any) -> tuple[dict[str, DIE], int] | None:
    """The structs a walk reads and FRAME_OWNED_BY_GENERATOR, from unit `cu`."""
    types: dict[str, DIE] = {}
    owned_by_generator = None
    for die in cu.iter_DIEs():
        name = _name(die)
        if name is None:
            continue
        if die.tag in ("DW_TAG_structure_type", "DW_TAG_typedef") and name in _TYPES \
                and _TYPES[name] not in types:
            struct = _target(die)
            if "DW_AT_declaration" not in struct.attributes:
                types[_TYPES[name]] = struct
        elif die.tag == "DW_TAG_enumerator" and name == "FRAME_OWNED_BY_GENERATOR":
            owned_by_generator = int(die.attributes["DW_AT_const_value"].value)
    if owned_by_generator is None or len(types) != len(_TYPES):
        return None
    return types, owned_by_generator


def _fields(types: dict[str, DIE], owned_by_generator: int) -> dict[str, int]:
    fields = {k: _offset(types[t], p) for k, (t, p) in _OFFSETS.items()}
    fields.update({k: int(types[t].attributes["DW_AT_byte_size"].value)
                   for k, t in _SIZES.items()})
    state = _target(_member(types["ascii"], "state").get_DIE_from_attribute("DW_AT_type"))
    fields.update({k: _mask(state, m) for k, m in _BITS.items()})
    fields["owned_by_generator"] = owned_by_generator
    return fields

