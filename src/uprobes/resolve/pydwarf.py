"""A CPython build's layout from its own DWARF, where it has some (a build
with debug info in the file, or a debug file found by its build-id): the
struct members `pylayout.py` names, read from the compile unit of the eval
loop (Python/ceval.c), which uses every public struct a walk reads, from
Objects/funcobject.c's for staticmethod and classmethod and from
Objects/descrobject.c's for property, which are private to them.

pyelftools parses the three units, found through `.debug_aranges` by the
addresses of `_PyEval_EvalFrameDefault`, `PyStaticMethod_New` and
`PyDescr_NewGetSet` (walking every unit to them takes seconds on
libpython); bit fields as DWARF 5 (`DW_AT_data_bit_offset`) or DWARF 4
(`DW_AT_bit_offset`, counted from the storage unit's top) give them.
"""

from __future__ import annotations

from typing import Any

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile

from uprobes.resolve.pyversions import Member

# Struct (or typedef) names -> the names the fields below use for them.
_TYPES = {"_PyRuntimeState": "runtime", "_is": "interp", "_ts": "tstate",
          "_PyCFrame": "cframe", "_PyInterpreterFrame": "frame", "PyCodeObject": "code",
          "PyVarObject": "var", "PyBytesObject": "bytes", "PyASCIIObject": "ascii",
          "PyCompactUnicodeObject": "compact", "_object": "object",
          "PyModuleObject": "module", "PyDictObject": "dict", "_dictkeysobject": "dictkeys",
          "PyDictKeyEntry": "entry", "PyDictUnicodeEntry": "unicode_entry",
          "PyFunctionObject": "func", "_typeobject": "type", "PyTupleObject": "tuple",
          "PyCellObject": "cell"}
_FUNCOBJECT_TYPES = {"staticmethod": "staticmethod", "classmethod": "classmethod"}
_DESCROBJECT_TYPES = {"propertyobject": "property"}
_ENUMERATORS = {"FRAME_OWNED_BY_GENERATOR": "owned_by_generator",
                "DICT_KEYS_GENERAL": "dictkeys_general"}
# field -> (type, member path) for offsets.
_OFFSETS = {
    "runtime_interpreters_head": ("runtime", "interpreters.head"),
    "interp_next": ("interp", "next"), "interp_threads_head": ("interp", "threads.head"),
    "tstate_next": ("tstate", "next"), "tstate_native_thread_id": ("tstate", "native_thread_id"),
    "tstate_thread_id": ("tstate", "thread_id"),
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
    "code_consts": ("code", "co_consts"), "code_name": ("code", "co_name"),
    "code_flags": ("code", "co_flags"), "code_argcount": ("code", "co_argcount"),
    "code_posonlyargcount": ("code", "co_posonlyargcount"),
    "code_kwonlyargcount": ("code", "co_kwonlyargcount"),
    "code_nlocalsplus": ("code", "co_nlocalsplus"),
    "code_localsplusnames": ("code", "co_localsplusnames"),
    "code_localspluskinds": ("code", "co_localspluskinds"),
    "interp_modules": ("interp", "modules"), "object_type": ("object", "ob_type"),
    "module_dict": ("module", "md_dict"),
    "dict_keys": ("dict", "ma_keys"), "dict_values": ("dict", "ma_values"),
    "dictkeys_log2_size": ("dictkeys", "dk_log2_size"),
    "dictkeys_log2_index_bytes": ("dictkeys", "dk_log2_index_bytes"),
    "dictkeys_kind": ("dictkeys", "dk_kind"), "dictkeys_nentries": ("dictkeys", "dk_nentries"),
    "dictkeys_indices": ("dictkeys", "dk_indices"),
    "dict_entry_key": ("entry", "me_key"), "dict_entry_value": ("entry", "me_value"),
    "dict_unicode_entry_key": ("unicode_entry", "me_key"),
    "dict_unicode_entry_value": ("unicode_entry", "me_value"),
    "func_code": ("func", "func_code"), "func_qualname": ("func", "func_qualname"),
    "func_module": ("func", "func_module"), "func_closure": ("func", "func_closure"),
    "type_name": ("type", "tp_name"), "type_flags": ("type", "tp_flags"),
    "type_dict": ("type", "tp_dict"), "type_base": ("type", "tp_base"),
    "tuple_items": ("tuple", "ob_item"), "cell_ref": ("cell", "ob_ref"),
    "staticmethod_callable": ("staticmethod", "sm_callable"),
    "classmethod_callable": ("classmethod", "cm_callable"),
    "property_get": ("property", "prop_get"), "property_set": ("property", "prop_set"),
    "property_del": ("property", "prop_del"),
    "runtime_tstate_current": ("runtime", "gilstate.tstate_current"),
    "frame_frame_obj": ("frame", "frame_obj"),
    "tstate_curexc_type": ("tstate", "curexc_type"),
}
_SIZES = {"tstate_size": "tstate", "str_ascii_data": "ascii", "str_compact_data": "compact",
          "dict_entry_size": "entry", "dict_unicode_entry_size": "unicode_entry"}
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


def fields_from_dwarf(path: str, eval_link_addr: int,
                      funcobject_link_addr: int | None = None,
                      descrobject_link_addr: int | None = None,
                      changed: dict[str, Member] | None = None) -> dict[str, int] | None:
    """layout.py's fields from the DWARF of `path` (the interpreter's file or
    its debug file); `eval_link_addr`: `_PyEval_EvalFrameDefault`'s address,
    `funcobject_link_addr`: `PyStaticMethod_New`'s, `descrobject_link_addr`:
    `PyDescr_NewGetSet`'s, whose units are read; `changed`: the version's
    members that differ from 3.11's (pyversions.CHANGED). None: no such
    unit, or a member is missing."""
    offsets = dict(_OFFSETS)
    enumerators = dict(_ENUMERATORS)
    for field, member in (changed or {}).items():
        offsets.pop(field, None)
        if member is not None and member[0] == "enum":
            enumerators[member[1]] = field
        elif member is not None:
            offsets[field] = member
    used = {t for t, _ in offsets.values()} | set(_SIZES.values())
    types = {name: short for name, short in _TYPES.items() if short in used}
    wanted = {"ceval.c": (eval_link_addr, types, enumerators),
              "funcobject.c": (funcobject_link_addr, _FUNCOBJECT_TYPES, {}),
              "descrobject.c": (descrobject_link_addr, _DESCROBJECT_TYPES, {})}
    try:
        with open(path, "rb") as f:
            dwarf = ELFFile(f).get_dwarf_info()
            found: dict[str, tuple[dict[str, DIE], dict[str, int]]] = {}
            aranges = dwarf.get_aranges()
            for source, (link_addr, names, enumerators) in wanted.items():
                at = None if aranges is None or link_addr is None \
                    else aranges.cu_offset_at_addr(link_addr)
                got = None if at is None else _types(dwarf.get_CU_at(at), names, enumerators)
                if got is not None:
                    found[source] = got
            # An LTO build's unit at an address is a partition (`<artificial>`)
            # whose types live in the unit of the source file: one pass over
            # the units finds those by name.
            for cu in dwarf.iter_CUs() if len(found) < len(wanted) else ():
                name = _name(cu.get_top_DIE()) or ""
                for source, (_, names, enumerators) in wanted.items():
                    if source not in found and name.endswith(source):
                        got = _types(cu, names, enumerators)
                        if got is not None:
                            found[source] = got
                if len(found) == len(wanted):
                    break
            if len(found) < len(wanted):
                return None
            dies = {k: v for got in found.values() for k, v in got[0].items()}
            return _fields(dies, found["ceval.c"][1], offsets)
    except (OSError, ELFError, ELFParseError, KeyError, ValueError, AttributeError):
        return None


def _types(cu: Any, names: dict[str, str], enumerators: dict[str, str]
           ) -> tuple[dict[str, DIE], dict[str, int]] | None:
    """The structs and constants asked for, from unit `cu` (None: not all there)."""
    types: dict[str, DIE] = {}
    constants: dict[str, int] = {}
    for die in cu.iter_DIEs():
        name = _name(die)
        if name is None:
            continue
        if die.tag in ("DW_TAG_structure_type", "DW_TAG_typedef") and name in names \
                and names[name] not in types:
            struct = _target(die)
            if "DW_AT_declaration" not in struct.attributes:
                types[names[name]] = struct
        elif die.tag == "DW_TAG_enumerator" and name in enumerators:
            constants[enumerators[name]] = int(die.attributes["DW_AT_const_value"].value)
    if len(constants) != len(enumerators) or len(types) != len(names):
        return None
    return types, constants


def _fields(types: dict[str, DIE], constants: dict[str, int],
            offsets: dict[str, tuple[str, str]]) -> dict[str, int]:
    fields = {k: _offset(types[t], p) for k, (t, p) in offsets.items()}
    fields.update({k: int(types[t].attributes["DW_AT_byte_size"].value)
                   for k, t in _SIZES.items()})
    state = _target(_member(types["ascii"], "state").get_DIE_from_attribute("DW_AT_type"))
    fields.update({k: _mask(state, m) for k, m in _BITS.items()})
    fields.update(constants)
    return fields
