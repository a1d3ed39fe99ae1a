"""The probe point token: where a probe goes.

Forms, tried in this order:

* `usdt:PATH:PROVIDER:NAME` (also `u:PATH:PROVIDER:NAME`): a USDT probe.
  PROVIDER and NAME are the last two ':'-separated fields, PATH the rest.
  The short `u:` form is taken only when there are exactly three ':' and no
  empty field, so a file named `u` still works (`u:main`, `u:0x10`).
* `:vdso:SYMBOL[+OFF][%return]` or `:vdso:OFFSET[%return]`, either with
  the image named by its ABI first, as the vdsofs proposal does:
  `:vdso:/64:0x8d0` (`/64`, `/32`, `/x32`).
* `PATH:OFFSET[%return][(REF_CTR_OFFSET)]`, the kernel's own form: PATH is
  everything before the LAST ':', and OFFSET starts with a digit. Checked
  with the kernel's rules, errors and caret positions.
* `PATH:SYMBOL[+OFF][%return][(REF_CTR_OFFSET)]`, our extension. Since C++
  symbols contain `::` and a path never does, the token is split at the
  last ':' that is not part of a `::` (`libfoo.so:ns::func` is PATH
  `libfoo.so`, SYMBOL `ns::func`). SYMBOL may carry a version
  (`memcpy@GLIBC_2.14`, `@@GLIBC_2.2.5`) and glob characters. A trailing
  `(...)` is a reference counter only if it holds a number, so demangled
  `ns::f(int)` stays a symbol. `+OFF` is split off at the last '+' only if
  a number follows (`operator+` stays whole).

* `py:[WHERE:]MODULE.QUALNAME[%return|%yield|%resume]`: a Python function
  (its call, return, a generator's or coroutine's suspension or its
  resumption after one; WHERE: the
  interpreter's file or a process id; MODULE.QUALNAME a dotted name,
  globs allowed, split into module and qualified name by resolution).

* `PATH:FILE.c:LINE` (a source file by its suffix: .c .cc .cpp .cxx .h
  .hh .hpp .rs .go) and `PATH:FUNC:+N` (N lines after FUNC's own line):
  source lines, our extension, resolved through the DWARF line table.

PATH may be written in double quotes (`"/opt/my app/bin":main`), the way to
give one with whitespace or '::' in it; the quotes are not part of it.

PATH is never looked at: short names (`c`, `libc.so.6`, `python3`) are for
resolution to decide.
"""

from __future__ import annotations

import re
from dataclasses import replace

from uprobes.lang import messages as msg
from uprobes.lang.ast import FileTarget, PyTarget, Target, UsdtTarget, VdsoTarget
from uprobes.lang.messages import TokenError
from uprobes.lang.numbers import is_digit, kstrtoul

VDSO_PREFIX = ":vdso:"
PY_PREFIX = "py:"
_ANONYMOUS = "(anonymous namespace)"
"""How a demangled C++ name that starts with a '(' starts."""
VDSO_IMAGES = ("64", "32", "x32")
"""The vDSO images by ABI, as the vdsofs proposal names them."""


def is_kernel_place(token: str) -> bool:
    """Would the kernel take `token` as its PATH:OFFSET (a '/' in it, and a
    digit after the last ':')?"""
    colon = token.rfind(":")
    return "/" in token and colon >= 0 and is_digit(token[colon + 1:colon + 2])


_SOURCE_LINE = re.compile(r"(.+):([^:]+\.(?:c|cc|cpp|cxx|c\+\+|h|hh|hpp|rs|go)):(\d+)")
_FUNCTION_LINE = re.compile(r"(.+[^:]):\+(\d+)")


def parse_target(token: str) -> tuple[Target, bool]:
    """-> (target, True if `%return` was given). Raises TokenError."""
    if token.startswith('"'):
        return _parse_quoted(token)
    if token.startswith(PY_PREFIX):
        return _parse_python(token)
    m = _SOURCE_LINE.fullmatch(token)
    if m and not token.startswith(("usdt:", VDSO_PREFIX)):
        return FileTarget(_unquote(m.group(1)), source_file=m.group(2),
                          line=int(m.group(3))), False
    m = _FUNCTION_LINE.fullmatch(token)
    if m and not token.startswith(("usdt:", VDSO_PREFIX)):
        target, is_return = parse_target(m.group(1))
        if isinstance(target, FileTarget) and target.symbol is not None \
                and not target.symbol_offset and not is_return:
            return replace(target, line=int(m.group(2))), False
        raise TokenError(msg.BAD_PLACE, len(m.group(1)), "a line (:+N) follows a function name")
    if token.startswith("usdt:") or _is_short_usdt(token):
        return _parse_usdt(token), False
    if token.startswith(VDSO_PREFIX):
        return _parse_vdso(token)
    colon = token.rfind(":")
    if colon >= 0 and is_digit(token[colon + 1:colon + 2]):
        return _parse_file_offset(token, colon)
    sep = _symbol_separator(token)
    if sep < 0:
        raise TokenError(msg.BAD_PLACE, 0)
    if sep == 0:
        raise TokenError(msg.NO_PATH, 0)
    if is_digit(token[sep + 1:sep + 2]):
        return _parse_file_offset(token, sep)
    return _parse_file_symbol(token, sep)


def _parse_quoted(token: str) -> tuple[Target, bool]:
    """`"PATH":...`: PATH is what the quotes hold, the rest is parsed as
    after any PATH."""
    close = token.find('"', 1)
    if close < 0:
        raise TokenError(msg.QUOTE_NOT_CLOSED, 0)
    if close == 1:
        raise TokenError(msg.NO_PATH, 0)
    if token[close + 1:close + 2] != ":":
        raise TokenError(msg.QUOTED_PATH, close + 1)
    # A stand-in PATH that takes no other form (not usdt, vdso, quoted).
    rest = "_" + token[close + 1:]
    try:
        target, is_return = parse_target(rest)
    except TokenError as e:
        raise TokenError(e.message, e.offset + close, e.detail) from None
    assert isinstance(target, FileTarget)
    return replace(target, path=token[1:close]), is_return


def _unquote(path: str) -> str:
    return path[1:-1] if len(path) > 2 and path[0] == path[-1] == '"' else path


def _is_short_usdt(token: str) -> bool:
    if not token.startswith("u:") or token.count(":") != 3 or "::" in token:
        return False
    return all(token.split(":"))


def _parse_usdt(token: str) -> UsdtTarget:
    rest = token.split(":", 1)[1]
    fields = rest.rsplit(":", 2)
    if len(fields) != 3 or not all(fields):
        raise TokenError(msg.BAD_USDT, 0)
    path, provider, name = fields
    path = _unquote(path)
    if "%" in provider + name or "(" in provider + name:
        raise TokenError(msg.USDT_SUFFIX, len(token) - len(name) - len(provider) - 1)
    return UsdtTarget(path, provider, name)


_PY_NAME = re.compile(r"[A-Za-z_*?\[][\w.*?\[\]<>-]*")
"""(no `!`: a kernel glob reads a leading one as "not", fnmatch as itself)"""


PY_POINTS = ("yield", "resume")
"""`py:NAME%yield`, `py:NAME%resume`: a generator's or coroutine's suspension, resumption."""


def _parse_python(token: str) -> tuple[Target, bool]:
    """`py:[WHERE:]NAME[%return]`: WHERE is everything before the last ':'."""
    rest = token[len(PY_PREFIX):]
    where, colon, name = rest.rpartition(":")
    at = len(PY_PREFIX) + len(where) + len(colon)
    point = next((p for p in PY_POINTS if name.endswith("%" + p)), "")
    name = name[:len(name) - len(point) - 1] if point else name
    name, is_return = _split_return(name, at)
    if colon and not where:
        raise TokenError(msg.NO_PATH, len(PY_PREFIX))
    if not _PY_NAME.fullmatch(name) or "." not in name or name.startswith(".") \
            or name.endswith(".") or ".." in name:
        raise TokenError(msg.BAD_PY_NAME, at)
    if point and is_return:
        raise TokenError(msg.PY_POINT_RETURN, at)
    return PyTarget(name, _unquote(where) if where else None, point), is_return


def _parse_vdso(token: str) -> tuple[Target, bool]:
    at = len(VDSO_PREFIX)
    rest = token[at:]
    if "(" in rest:
        raise TokenError(msg.VDSO_REFCNT, at + rest.index("("))
    image: str | None = None
    if rest.startswith("/"):
        image, colon, rest = rest[1:].partition(":")
        if not colon or image not in VDSO_IMAGES:
            raise TokenError(msg.BAD_VDSO_IMAGE, at)
        at += len(image) + 2
    rest, is_return = _split_return(rest, at)
    if not rest:
        raise TokenError(msg.BAD_VDSO, at)
    if is_digit(rest[0]):
        offset = kstrtoul(rest)
        if offset is None:
            raise TokenError(msg.BAD_UPROBE_OFFS, at)
        return VdsoTarget(offset=offset, image=image), is_return
    symbol, symbol_offset = _split_symbol_offset(rest, at)
    return VdsoTarget(symbol=symbol, symbol_offset=symbol_offset, image=image), is_return


def _parse_file_offset(token: str, colon: int) -> tuple[Target, bool]:
    """The kernel's order: reference counter, then %return, then offset."""
    at = colon + 1
    place = token[at:]
    ref: int | None = None
    open_at = place.find("(")
    if open_at >= 0:
        close_at = place.find(")", open_at)
        if close_at < 0:
            raise TokenError(msg.REFCNT_OPEN_BRACE, at + len(place))
        if close_at + 1 != len(place):
            raise TokenError(msg.BAD_REFCNT_SUFFIX, at + close_at + 1)
        ref = kstrtoul(place[open_at + 1:close_at])
        if ref is None:
            raise TokenError(msg.BAD_REFCNT, at + open_at + 1)
        place = place[:open_at]
    is_return = False
    pct = place.find("%")
    if pct >= 0:
        if place[pct:] != "%return":
            raise TokenError(msg.BAD_ADDR_SUFFIX, at + pct)
        is_return = True
        place = place[:pct]
    offset = kstrtoul(place)
    if offset is None:
        raise TokenError(msg.BAD_UPROBE_OFFS, at)
    return FileTarget(token[:colon], offset=offset, ref_ctr_offset=ref), is_return


def _parse_file_symbol(token: str, sep: int) -> tuple[Target, bool]:
    at = sep + 1
    place = token[at:]
    if not place:
        raise TokenError(msg.NO_SYMBOL, at)
    ref: int | None = None
    if place.endswith(")"):
        open_at = place.rfind("(")
        value = kstrtoul(place[open_at + 1:-1]) if open_at > 0 else None
        if value is not None:
            ref, place = value, place[:open_at]
    place, is_return = _split_return(place, at)
    symbol, symbol_offset = _split_symbol_offset(place, at)
    return FileTarget(token[:sep], symbol=symbol, symbol_offset=symbol_offset,
                      ref_ctr_offset=ref), is_return


def _split_return(place: str, at: int) -> tuple[str, bool]:
    pct = place.find("%")
    if pct < 0:
        return place, False
    if place[pct:] != "%return":
        raise TokenError(msg.BAD_ADDR_SUFFIX, at + pct)
    return place[:pct], True


def _split_symbol_offset(place: str, at: int) -> tuple[str, int]:
    plus = place.rfind("+")
    if plus > 0:
        value = kstrtoul(place[plus + 1:])
        if value is not None:
            return place[:plus], value
    if not place or place[0] == "+":
        raise TokenError(msg.NO_SYMBOL, at)
    if place[0] in "-%()@:=\\\"" and not place.startswith(_ANONYMOUS):
        raise TokenError(msg.BAD_SYMBOL, at)
    return place, 0


def _symbol_separator(token: str) -> int:
    """Index of the last ':' not part of a '::', or -1."""
    for i in range(len(token) - 1, -1, -1):
        if token[i] == ":" and token[i - 1:i] != ":" and token[i + 1:i + 2] != ":":
            return i
    return -1
