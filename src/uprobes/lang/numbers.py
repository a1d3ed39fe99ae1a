"""The kernel's number and character rules (lib/kstrtox.c, lib/vsprintf.c, ctype).

Python's `int()` and `str.isdigit()` accept things the kernel does not
(`1_000`, Unicode digits, spaces), so the parser uses these instead.
"""

from __future__ import annotations

import re

U64 = 1 << 64
S64_MIN_MAG = 1 << 63
_HEX = "0123456789abcdefABCDEF"


def is_digit(c: str) -> bool:
    return len(c) == 1 and "0" <= c <= "9"


def is_alpha(c: str) -> bool:
    return len(c) == 1 and ("a" <= c <= "z" or "A" <= c <= "Z")


def is_alnum(c: str) -> bool:
    return is_alpha(c) or is_digit(c)


# ASCII classes spelled out: `\w` and str.isalnum() take Unicode letters, the kernel does not.
_GOOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GOOD_SYSTEM_NAME = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*")


def is_good_name(name: str) -> bool:
    """Event, group and argument names: C identifiers (trace.h is_good_name)."""
    return _GOOD_NAME.fullmatch(name) is not None


def is_good_system_name(name: str) -> bool:
    """Group names: C identifiers that may also contain '-' (is_good_system_name)."""
    return _GOOD_SYSTEM_NAME.fullmatch(name) is not None


def _fixup_radix(s: str, base: int) -> tuple[str, int]:
    if base == 0:
        if s[:1] == "0":
            base = 16 if s[1:2] in ("x", "X") and s[2:3] != "" and s[2] in _HEX else 8
        else:
            base = 10
    if base == 16 and s[:1] == "0" and s[1:2] in ("x", "X"):
        s = s[2:]
    return s, base


_DIGIT_RUNS: dict[int, re.Pattern[str]] = {}


def _digits(s: str, base: int) -> tuple[int, int]:
    """Value and count of the leading digits of `s` in `base` (2 to 16, ASCII only)."""
    run = _DIGIT_RUNS.get(base)
    if run is None:
        digits = "0123456789abcdef"[:base]
        run = _DIGIT_RUNS[base] = re.compile(f"[{digits}{digits[10:].upper()}]*")
    m = run.match(s)
    assert m is not None  # a `*` run matches at least the empty string
    found = m.group()
    return (int(found, base) if found else 0), len(found)


def _kstrtoull(s: str, base: int) -> int | None:
    s, base = _fixup_radix(s, base)
    value, n = _digits(s, base)
    if n == 0 or value >= U64 or s[n:] not in ("", "\n"):
        return None
    return value


def kstrtoul(s: str, base: int = 0) -> int | None:
    """kstrtoul(): an unsigned long, or None where the kernel says -EINVAL/-ERANGE."""
    if s[:1] == "+":
        s = s[1:]
    return _kstrtoull(s, base)


def kstrtouint(s: str, base: int = 0) -> int | None:
    value = kstrtoul(s, base)
    return value if value is not None and value < (1 << 32) else None


def kstrtol(s: str, base: int = 0) -> int | None:
    """kstrtol(): a signed long (a leading '-' or '+' allowed)."""
    if s[:1] == "-":
        mag = _kstrtoull(s[1:], base)
        return None if mag is None or mag > S64_MIN_MAG else -mag
    value = kstrtoul(s, base)
    return None if value is None or value >= S64_MIN_MAG else value


def simple_strtoul(s: str) -> tuple[int, int]:
    """simple_strtoul(s, &tail, 0): the value and the index of `tail` in `s`."""
    rest, base = _fixup_radix(s, 0)
    skipped = len(s) - len(rest)
    value, n = _digits(rest, base)
    return value % U64, skipped + n
