"""A symbol's name as its source writes it, in the forms a user names it by.

For a mangled symbol (`uprobes.elf.demangle`):

* `label`: the demangled name without a C++ return type, parameters kept
  (`ns::Counter::add(int)`, `Foo::get() const`, `foo(int) [clone .cold]`;
  a Rust path: `app::shapes::twice`). What output shows and what a probe
  with a parameter list names.
* `base`: the label without parameters, qualifiers and clone suffixes
  (`ns::Counter::add`), as `c++filt -p` prints it. What a probe without a
  parameter list names; overloads share it.
* `clone`: GCC made this copy (`.cold`, `.isra.0`, `.constprop.0`): the
  base names the function itself first.

The split reads the demangler's text: the parameter list is the last
top-level `(...)`; the return type, when a function template has one, ends
at the last space outside brackets, with operator names (`operator<`,
`operator()`, `operator new`, a conversion `operator char const*`) read as
one word.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from uprobes.elf.demangle import demangle, language

_CLONE = " [clone "
_QUALIFIERS = (" const", " volatile", " &&", " &", " noexcept", " transaction_safe")
_SPECIAL = ("non-virtual thunk to ", "virtual thunk to ", "covariant return thunk to ",
            "transaction clone for ", "TLS init function for ", "TLS wrapper function for ",
            "guard variable for ", "reference temporary ", "hidden alias for ",
            "vtable for ", "VTT for ", "construction vtable for ", "typeinfo for ",
            "typeinfo name for ", "java Class for ", "non-transaction clone for ")
_OPEN, _CLOSE = "<([{", ">)]}"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKENS = re.compile(r"operator|[<>()\[\]{} ]")
_OPERATORS = sorted(("<<=", ">>=", "<=>", "->*", "<<", ">>", "<=", ">=", "==", "!=", "&&", "||",
                     "++", "--", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "->", "<", ">",
                     "=", "!", "+", "-", "*", "/", "%", "^", "&", "|", "~", ","),
                    key=len, reverse=True)
_NAMED_OPERATORS = ("new[]", "delete[]", "new", "delete", "co_await")


class SourceName(NamedTuple):
    label: str
    base: str
    clone: bool
    language: str


@functools.lru_cache(maxsize=1 << 17)
def source_name(name: str) -> SourceName | None:
    """The source forms of symbol `name`, or None for a name that is not
    mangled (C) or that no demangler takes."""
    lang = language(name)
    if lang is None:
        return None
    text = demangle(name, lang)
    if text is None:
        return None
    if lang == "rust":
        return SourceName(text, text, False, lang)
    label, base, clone = split_cxx(text)
    return SourceName(label, base, clone, lang)


def split_cxx(text: str) -> tuple[str, str, bool]:
    """Demangled C++ `text` -> (label, base, clone); see the module."""
    clone_at = text.find(_CLONE)
    clone = clone_at > 0
    body = text[:clone_at] if clone else text
    if body.startswith(_SPECIAL):
        return text, body, clone
    params_at = _parameter_list(body)
    if params_at < 0:  # not a function: a variable or a guard
        return text, body, clone
    name = _without_return_type(body[:params_at])
    if name.startswith(("(*", "(&")) and name.endswith(")"):
        # a function returning a pointer to function: `void (*f<int>())()`
        return split_cxx(name[2:-1] + text[len(body):])
    label = name + body[params_at:] + text[len(body):]
    return label, name, clone


def _parameter_list(body: str) -> int:
    """Where the parameter list of demangled `body` opens, or -1."""
    end = len(body)
    stripped = True
    while stripped:
        stripped = False
        for q in _QUALIFIERS:
            if body.endswith(q, 0, end):
                end -= len(q)
                stripped = True
    if end == 0 or body[end - 1] != ")":
        return -1
    return _matching_open(body, end - 1)


def _matching_open(text: str, close: int) -> int:
    """Where the '(' that the ')' at `close` closes is, or -1."""
    depth = 0
    i = close + 1
    while True:
        opened, closed = text.rfind("(", 0, i), text.rfind(")", 0, i)
        if closed > opened:
            depth += 1
            i = closed
        elif opened < 0:
            return -1
        else:
            depth -= 1
            if depth == 0:
                return opened
            i = opened


def _without_return_type(name: str) -> str:
    """`int ns::add<int>` -> `ns::add<int>`: from after the last space that
    is outside brackets and not inside an operator's name."""
    if " " not in name:
        return name
    depth = 0
    cut = 0
    skip_to = 0
    for m in _TOKENS.finditer(name):
        i = m.start()
        if i < skip_to:
            continue
        c = m.group()
        if c == "operator":
            if (i == 0 or not _is_word(name[i - 1])) and not _is_word(name[i + 8:i + 9]):
                skip_to = _operator_end(name, i + 8)
        elif c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0:
            cut = i + 1
    return name[cut:]


def _operator_end(name: str, i: int) -> int:
    """The end of the operator's name that starts at `name[i]`, just after
    the word `operator`."""
    if name.startswith(("()", "[]"), i):
        return i + 2
    if name.startswith('""', i):  # a literal operator: operator"" _km
        j = i + 2
        while j < len(name) and (name[j] == " " or _is_word(name[j])):
            j += 1
        return j
    for op in _OPERATORS:  # the longest: `operator>><T>` is `>>` then `<T>`
        if name.startswith(op, i):
            j = i + len(op)
            # `operator< <int>`: the demangler spaces template arguments off
            return j + 1 if name.startswith(" <", j) else j
    if name.startswith(" ", i):
        for word in _NAMED_OPERATORS:
            if name.startswith(word, i + 1):
                return i + 1 + len(word)
        return len(name)  # a conversion operator: its type runs to the end
    return i


def _is_word(c: str) -> bool:
    return c != "" and (c.isalnum() or c == "_")


def cxx_keys(base: str) -> set[str]:
    """The other way source names a C++ function template's instance:
    `ns::twice<long>` as `ns::twice`, which names each instance."""
    if not base.endswith(">"):
        return set()
    opened = _template_open(base)
    name = base[:opened].rstrip() if opened > 0 else ""
    if not name or name.endswith("operator") or name.endswith(":"):
        return set()
    return {name}


def _template_open(text: str) -> int:
    """Where the '<' that the '>' ending `text` closes is, or -1."""
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        if text[i] == ">":
            depth += 1
        elif text[i] == "<":
            depth -= 1
            if depth == 0:
                return i
    return -1


def rust_keys(label: str) -> set[str]:
    """The other ways source names a Rust function: a v0 inherent method
    `<app::Counter>::add` as `app::Counter::add`, and a generic function's
    instance `app::twice::<u32>` as `app::twice` (which names each instance)."""
    keys = set()
    path = inherent_path(label)
    if path is not None:
        keys.add(path)
    for name in (label, path):
        if name is not None and name.endswith(">") and (cut := name.rfind("::<")) > 0:
            keys.add(name[:cut])
    return keys


def inherent_path(label: str) -> str | None:
    """A Rust v0 inherent method `<app::Counter>::add` as the legacy mangling
    and the source write it, `app::Counter::add` (None for other names; a
    trait method `<T as Trait>::m` has no such path)."""
    if not label.startswith("<"):
        return None
    depth = 0
    for i, c in enumerate(label):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                inner = label[1:i]
                if " as " in inner or not label.startswith("::", i + 1):
                    return None
                return inner + label[i + 1:]
    return None


def mangled_needle(name: str) -> str | None:
    """What every mangled name of a function that source name `name` names
    holds: its last component as both manglings spell an identifier,
    `<length><identifier>` (`ns::C::add(int)` -> `3add`), so a lookup need
    only demangle the few names that hold it. None where that is not so
    (an operator, a constructor or destructor, a name starting with '_',
    which v0 spells `<length>_<identifier>`)."""
    params = _parameter_list(name)
    body = name[:params] if params > 0 else name
    while body.endswith(">"):  # template arguments, `<long>` or Rust's `::<u32>`
        opened = _template_open(body)
        if opened <= 0 or body[:opened].rstrip().endswith("operator"):
            return None
        body = body[:opened].rstrip().removesuffix("::")
    ident = body.rsplit("::", 1)[-1]
    if not _IDENTIFIER.fullmatch(ident) or ident.startswith("_"):
        return None
    scope = body[:-len(ident)].removesuffix("::")
    if scope.endswith(">"):
        scope = scope[:max(_template_open(scope), 0)]
    if scope.rsplit("::", 1)[-1] == ident:  # a constructor: C1, C2 in the mangled name
        return None
    return f"{len(ident)}{ident}"


def normalized(text: str) -> str:
    """`text` with whitespace dropped, so a name matches however it is
    spaced (`f(int,char const*)` is `f(int, char const*)`)."""
    return "".join(text.split())
