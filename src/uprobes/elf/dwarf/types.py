"""C types from DWARF, read lazily: a struct that points to itself
(`struct item *next`) is only followed as far as an access goes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uprobes.elf.dwarf.index import die_name

_QUALIFIERS = frozenset(("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type",
                         "DW_TAG_restrict_type", "DW_TAG_atomic_type"))
_KINDS = {
    "DW_TAG_base_type": "base", "DW_TAG_pointer_type": "pointer",
    "DW_TAG_reference_type": "reference", "DW_TAG_rvalue_reference_type": "reference",
    "DW_TAG_structure_type": "struct", "DW_TAG_class_type": "struct",
    "DW_TAG_union_type": "union", "DW_TAG_array_type": "array",
    "DW_TAG_enumeration_type": "enum", "DW_TAG_subroutine_type": "function",
}
# DW_ATE_* encodings of base types.
_ENCODINGS = {0x2: "bool", 0x4: "float", 0x5: "signed", 0x6: "signed_char",
              0x7: "unsigned", 0x8: "unsigned_char", 0x10: "utf"}


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    """Bytes from the start of the struct."""
    type: CType
    bit_size: int | None = None
    bit_offset: int = 0
    """For a bitfield: bits from the start of the struct (DW_AT_data_bit_offset)."""


@dataclass(frozen=True)
class Counted:
    """A value that points to `element`s and counts them: the members
    holding its pointer and its count (offsets from the value's start);
    `text` when the elements are a string's bytes."""

    data: Member
    length: Member
    element: CType
    text: bool
    skip: int = 0
    """Bytes past where `data` points at which the elements start."""
    shared: str = ""
    """`Rc` or `Arc` for Rust's `Rc<str>` and `Arc<str>`: `data` points at
    their counts (strong, weak; each a usize), the text `skip` bytes on."""


@dataclass(frozen=True)
class VariantPart:
    """A Rust enum: the member holding its discriminant, and its variants,
    each selected by a discriminant value (None: by none of the others'),
    as a member whose type holds the variant's fields."""

    discriminant: Member
    variants: tuple[tuple[int | None, Member], ...]


class CType:
    """One C type with typedefs and qualifiers stripped (`name` keeps the
    spelling the source used). `kind`: base, pointer, reference, struct,
    union, array, enum, function, void."""

    def __init__(self, die: Any | None, spelled: str | None = None) -> None:
        self.die = die
        self._spelled = spelled

    @classmethod
    def of(cls, die: Any) -> CType:
        """The type a variable or member DIE has (`DW_AT_type`), or void."""
        if die is None or "DW_AT_type" not in die.attributes:
            return cls(None)
        t = die.get_DIE_from_attribute("DW_AT_type")
        spelled = _spell(t)
        while t is not None and t.tag in _QUALIFIERS:
            t = t.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in t.attributes else None
        return cls(t, spelled)

    @property
    def kind(self) -> str:
        return "void" if self.die is None else _KINDS.get(self.die.tag, "unknown")

    @property
    def name(self) -> str:
        return self._spelled or (_spell(self.die) if self.die is not None else "void")

    @property
    def size(self) -> int:
        if self.die is None:
            return 0
        attr = self.die.attributes.get("DW_AT_byte_size")
        if attr is not None:
            return int(attr.value)
        if self.kind in ("pointer", "reference"):
            return 8
        if self.kind == "array":
            count = self.count
            return self.target.size * count if count is not None else 0
        return 0

    @property
    def encoding(self) -> str:
        """A base type's DW_ATE as a word (signed, unsigned, bool, float,
        signed_char, unsigned_char); an enum's is its underlying sign."""
        if self.die is None:
            return ""
        attr = self.die.attributes.get("DW_AT_encoding")
        if attr is not None:
            return _ENCODINGS.get(attr.value, f"DW_ATE_0x{attr.value:x}")
        if self.kind == "enum":
            under = CType.of(self.die)
            if under.die is not None:
                return under.encoding
            return "signed" if any(v < 0 for v, _ in self.enumerators) else "unsigned"
        return ""

    @property
    def target(self) -> CType:
        """What a pointer points to, an array's element type."""
        return CType.of(self.die)

    @property
    def count(self) -> int | None:
        """An array's element count (its first dimension), None when unknown."""
        if self.die is None:
            return None
        for sub in self.die.iter_children():
            if sub.tag != "DW_TAG_subrange_type":
                continue
            if "DW_AT_count" in sub.attributes:
                return int(sub.attributes["DW_AT_count"].value)
            if "DW_AT_upper_bound" in sub.attributes:
                upper = sub.attributes["DW_AT_upper_bound"].value
                return int(upper) + 1 if isinstance(upper, int) else None
            return None
        return None

    @property
    def members(self) -> list[Member]:
        """A struct's or union's data members, in order."""
        if self.die is None:
            return []
        out: list[Member] = []
        for m in self.die.iter_children():
            if m.tag == "DW_TAG_inheritance":
                # A base class's members, at the base's offset, before the class's own
                # (C++ looks a name up through its bases; gdb prints them first too).
                where = m.attributes.get("DW_AT_data_member_location")
                at = where.value if where is not None and isinstance(where.value, int) else 0
                base = CType.of(m)
                out += [Member(b.name, b.offset + at, b.type, b.bit_size, b.bit_offset + at * 8)
                        for b in base.members]
                continue
            if m.tag != "DW_TAG_member" or "DW_AT_external" in m.attributes:
                continue  # C++ static members have no place in the object
            attrs = m.attributes
            where = attrs.get("DW_AT_data_member_location")
            offset = where.value if where is not None and isinstance(where.value, int) else 0
            bit_size = attrs["DW_AT_bit_size"].value if "DW_AT_bit_size" in attrs else None
            if "DW_AT_data_bit_offset" in attrs:
                bit_offset = int(attrs["DW_AT_data_bit_offset"].value)
            elif bit_size is not None and "DW_AT_bit_offset" in attrs:
                # DWARF 2/3: counted from the storage unit's most significant bit.
                unit = int(attrs["DW_AT_byte_size"].value) if "DW_AT_byte_size" in attrs \
                    else CType.of(m).size
                bit_offset = offset * 8 + unit * 8 - int(attrs["DW_AT_bit_offset"].value) \
                    - int(bit_size)
            else:
                bit_offset = offset * 8
            out.append(Member(die_name(m) or f"<anon@{offset}>", offset, CType.of(m),
                              bit_size, bit_offset))
        return out

    @property
    def enumerators(self) -> tuple[tuple[int, str], ...]:
        if self.die is None:
            return ()
        return tuple((int(e.attributes["DW_AT_const_value"].value), die_name(e) or "?")
                     for e in self.die.iter_children() if e.tag == "DW_TAG_enumerator")

    @property
    def is_char(self) -> bool:
        return self.kind == "base" and self.encoding in ("signed_char", "unsigned_char") \
            and self.size == 1

    @property
    def counted(self) -> Counted | None:
        """Where a run of elements that the value points to and counts is:
        Rust's `&str`, `&[T]`, `String` and `Vec<T>`, libstdc++'s
        `std::string`. None for any other type."""
        if self.kind != "struct":
            return None
        name = die_name(self.die) or ""
        members = {m.name: m for m in self.members}
        if self.in_rust:
            boxed = name.removeprefix("alloc::boxed::").startswith("Box<")
            if (boxed or name.startswith(("&", "*"))) and {"data_ptr", "length"} <= members.keys():
                # a slice's pointer and length: `&str`, `&[T]`, `Box<str>`, `Box<[T]>`
                data, length = members["data_ptr"], members["length"]
                is_text = name.removeprefix("alloc::boxed::").startswith("Box<str") if boxed \
                    else name.endswith("str")
                return Counted(data, length, data.type.target, is_text)
            shared = _shared_text(name, members)
            if shared is not None:
                return shared
            if name == "String" and "vec" in members:
                vec = members["vec"]
                inner = vec.type.counted
                return None if inner is None else Counted(
                    _moved(inner.data, vec.offset), _moved(inner.length, vec.offset),
                    inner.element, True)
            if name.startswith("Vec<") and {"buf", "len"} <= members.keys():
                buf = _first_pointer(members["buf"])
                elem = self.template_param("T")
                if buf is None or elem is None:
                    return None
                return Counted(buf, members["len"], elem, False)
            return None
        if name.startswith("basic_string_view<char,"):  # a pointer and a length, as &str
            text, count = members.get("_M_str"), members.get("_M_len")
            if text is None or count is None or text.type.kind != "pointer" \
                    or not text.type.target.is_char:
                return None
            return Counted(text, count, text.type.target, True)
        if not name.startswith("basic_string<char,"):
            return None
        hider, size = members.get("_M_dataplus"), members.get("_M_string_length")
        if hider is None or size is None:
            return None
        ptr = next((m for m in hider.type.members if m.name == "_M_p"), None)
        if ptr is None or ptr.type.kind != "pointer" or not ptr.type.target.is_char:
            return None
        return Counted(_moved(ptr, hider.offset), size, ptr.type.target, True)

    def template_param(self, name: str) -> CType | None:
        """The type a generic type's parameter `name` stands for."""
        if self.die is None:
            return None
        return next((CType.of(c) for c in self.die.iter_children()
                     if c.tag == "DW_TAG_template_type_param" and die_name(c) == name), None)

    @property
    def has_variants(self) -> bool:
        """Whether the type is a Rust enum holding data (`Option<&T>`): a
        struct whose members depend on a discriminant (DW_TAG_variant_part)."""
        return self.die is not None and any(c.tag == "DW_TAG_variant_part"
                                            for c in self.die.iter_children())

    @property
    def variant_part(self) -> VariantPart | None:
        """A Rust enum's discriminant and variants (DW_TAG_variant_part);
        None when it has none, or uses what this does not read (a
        DW_AT_discr_list of ranges, a discriminant with no member)."""
        if self.die is None:
            return None
        part = next((c for c in self.die.iter_children() if c.tag == "DW_TAG_variant_part"),
                    None)
        if part is None or "DW_AT_discr" not in part.attributes:
            return None
        discr = part.get_DIE_from_attribute("DW_AT_discr")
        where = discr.attributes.get("DW_AT_data_member_location")
        if where is None or not isinstance(where.value, int):
            return None
        variants: list[tuple[int | None, Member]] = []
        kind = CType.of(discr)
        for v in part.iter_children():
            if v.tag != "DW_TAG_variant":
                continue
            if "DW_AT_discr_list" in v.attributes:
                return None
            value = v.attributes.get("DW_AT_discr_value")
            member = next((m for m in v.iter_children() if m.tag == "DW_TAG_member"), None)
            if member is None:
                continue
            at = member.attributes.get("DW_AT_data_member_location")
            variants.append((None if value is None else _discr_value(value, kind),
                             Member(die_name(member) or "?",
                                    at.value if at is not None and isinstance(at.value, int)
                                    else 0, CType.of(member))))
        return VariantPart(Member("<discriminant>", where.value, kind),
                           tuple(variants))

    @property
    def in_rust(self) -> bool:
        """Whether the type is a Rust unit's, where `.` reads through a reference."""
        return self.die is not None and is_rust_unit(self.die.cu)


DW_LANG_RUST = 0x1C


def is_rust_unit(cu: Any) -> bool:
    attr = cu.get_top_DIE().attributes.get("DW_AT_language")
    return attr is not None and attr.value == DW_LANG_RUST


def _shared_text(name: str, members: dict[str, Member]) -> Counted | None:
    """Rust's `Rc<str>` or `Arc<str>`: a fat pointer (`ptr.pointer`: its
    `data_ptr` and `length`) to the counts, then the text (`value`, in an
    `Arc` `data`)."""
    short = name.removeprefix("alloc::rc::").removeprefix("alloc::sync::")
    kind = "Rc" if short.startswith("Rc<str") else "Arc" if short.startswith("Arc<str") else ""
    if not kind or "ptr" not in members or members["ptr"].type.kind != "struct":
        return None
    nonnull = members["ptr"]
    fat = next((m for m in nonnull.type.members if m.name == "pointer"), None)
    if fat is None or fat.type.kind != "struct":
        return None
    parts = {m.name: m for m in fat.type.members}
    data, length = parts.get("data_ptr"), parts.get("length")
    if data is None or length is None or data.type.kind != "pointer":
        return None
    inner = {m.name: m for m in data.type.target.members}
    value = inner.get("value") or inner.get("data")  # RcInner's, ArcInner's
    if value is None or inner.get("strong") is None or inner.get("weak") is None \
            or (inner["strong"].offset, inner["weak"].offset) != (0, 8):
        return None
    at = nonnull.offset + fat.offset
    return Counted(_moved(data, at), _moved(length, at), value.type, True,
                   skip=value.offset, shared=kind)


def _moved(m: Member, by: int) -> Member:
    return Member(m.name, m.offset + by, m.type)


def _first_pointer(m: Member, depth: int = 0) -> Member | None:
    """The first pointer in member `m`, looking into members in order (at
    offsets from the start of `m`'s struct): where Rust's `RawVec` keeps its
    buffer, however deep its wrappers (`inner.ptr.pointer.pointer`) go."""
    if m.type.kind == "pointer":
        return m
    if m.type.kind != "struct" or depth > 6:
        return None
    for inner in m.type.members:
        found = _first_pointer(_moved(inner, m.offset), depth + 1)
        if found is not None:
            return found
    return None


def _spell(die: Any | None, depth: int = 0) -> str:
    """How C writes the type `die` is (`const char *`, `struct item`, `long [4]`)."""
    if die is None:
        return "void"
    if depth > 8:
        return "..."
    tag = die.tag
    inner = (die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes
             else None)
    name = die_name(die)
    if tag == "DW_TAG_pointer_type" and name is not None:
        return name  # Rust names its references and raw pointers (`&app::Item`)
    if tag == "DW_TAG_pointer_type":
        return _spell(inner, depth + 1) + " *"
    if tag in ("DW_TAG_reference_type", "DW_TAG_rvalue_reference_type"):
        return _spell(inner, depth + 1) + " &"
    if tag == "DW_TAG_const_type":
        return "const " + _spell(inner, depth + 1)
    if tag == "DW_TAG_volatile_type":
        return "volatile " + _spell(inner, depth + 1)
    if tag in ("DW_TAG_restrict_type", "DW_TAG_atomic_type"):
        return _spell(inner, depth + 1)
    if tag == "DW_TAG_array_type":
        count = CType(die).count
        return f"{_spell(inner, depth + 1)} [{'' if count is None else count}]"
    prefix = {"DW_TAG_structure_type": "struct ", "DW_TAG_union_type": "union ",
              "DW_TAG_enumeration_type": "enum ", "DW_TAG_class_type": "class "}.get(tag, "")
    if prefix and is_rust_unit(die.cu):
        prefix = ""  # Rust writes `Item`, not `struct Item`
    if tag == "DW_TAG_subroutine_type":
        return "function"
    return prefix + (name or "<anonymous>")


_DATA_BYTES = {"DW_FORM_data1": 1, "DW_FORM_data2": 2, "DW_FORM_data4": 4, "DW_FORM_data8": 8}


def _discr_value(attr: Any, discr: CType) -> int:
    """A variant's DW_AT_discr_value as the discriminant's value: a fixed-size
    form holds it in as few bytes as fit (rustc writes an i32's -5 as the
    byte 251), so a signed discriminant's value is sign-extended from them."""
    value = int(attr.value)
    size = _DATA_BYTES.get(attr.form)
    if size is not None and discr.encoding.startswith("signed") and value >> (size * 8 - 1):
        value -= 1 << (size * 8)
    return value
