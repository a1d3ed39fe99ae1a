"""Mangled symbol names as their source spells them: C++ (the Itanium ABI)
and Rust (its legacy and v0 manglings), by maintained demanglers.

C++ goes through libstdc++'s own `abi::__cxa_demangle` (GCC's libiberty
demangler, the one c++filt uses: the same text as `c++filt -i`), Rust
through the `rustc-demangle` crate (rust-lang's, the one std's backtraces
and rustfilt use) by its Python binding `pyderust`, without the hash.
A Rust legacy name is an Itanium name whose last component is its hash
(`17h<16 hex digits>E`), told apart as libiberty does; v0 names start `_R`.
"""

from __future__ import annotations

import ctypes
import functools

import pyderust

_HEX = frozenset("0123456789abcdef")
_STATUS_OK = 0


class _CxaDemangle:
    """`char *abi::__cxa_demangle(const char *, char *, size_t *, int *)`
    from libstdc++; the string it returns is malloc'd and ours to free."""

    def __init__(self) -> None:
        # by its soname, stable since GCC 3.4 (ctypes.util.find_library would
        # run ldconfig or a compiler to find it, which costs more than all the demangling)
        lib = ctypes.CDLL("libstdc++.so.6")
        # getattr: a `lib.__cxa_demangle` in a class body is name-mangled by Python
        self._call = getattr(lib, "__cxa_demangle")
        self._call.restype = ctypes.c_void_p
        self._call.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.POINTER(ctypes.c_int)]
        self._free = ctypes.CDLL(None).free
        self._free.argtypes = [ctypes.c_void_p]
        self._free.restype = None
        self._status = ctypes.c_int(-1)
        self._status_ref = ctypes.byref(self._status)

    def __call__(self, name: str) -> str | None:
        status = self._status
        status.value = -1
        out = self._call(name.encode(errors="surrogateescape"), None, None, self._status_ref)
        if not out:
            return None
        try:
            if status.value != _STATUS_OK:
                return None
            return ctypes.string_at(out).decode(errors="replace")
        finally:
            self._free(out)


@functools.cache
def _cxa() -> _CxaDemangle | None:
    try:
        return _CxaDemangle()
    except (OSError, AttributeError):  # no libstdc++ here: C++ names stay mangled
        return None


def is_mangled(name: str) -> bool:
    """Could `name` be a C++ or Rust mangled name (cheap: by its prefix)?"""
    return name.startswith(("_Z", "_R"))


def demangle_cxx(name: str) -> str | None:
    """`name` demangled as C++, or None when it is not a valid C++ name."""
    cxa = _cxa()
    return cxa(name) if cxa is not None and name.startswith("_Z") else None


def demangle_rust(name: str) -> str | None:
    """`name` demangled as Rust (legacy or v0, without the hash), or None."""
    try:
        return pyderust.demangle(name)
    except ValueError:
        return None


def language(name: str) -> str | None:
    """'rust', 'c++' or None (not mangled), by the name's form alone."""
    if name.startswith("_R"):
        return "rust"
    if not name.startswith("_Z"):
        return None
    return "rust" if _is_rust_legacy(name) else "c++"


def _is_rust_legacy(name: str) -> bool:
    """`_ZN...17h<16 hex digits>E`, maybe with a `.llvm.N`-like suffix."""
    body = name.partition(".")[0]
    return (name.startswith("_ZN") and body.endswith("E") and body[-20:-17] == "17h"
            and all(c in _HEX for c in body[-17:-1]))


def demangle(name: str, lang: str | None = None) -> str | None:
    """`name` as its language spells it, or None when it is not a mangled
    name (a C name, or not valid); `lang` as `language` gives it, if known.
    Not cached: `source_name` is."""
    lang = lang or language(name)
    if lang == "rust":
        return demangle_rust(name) or demangle_cxx(name)
    if lang == "c++":
        return demangle_cxx(name) or demangle_rust(name)
    return None
