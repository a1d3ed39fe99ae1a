"""The one place where a library's exception becomes an `ElfError`.

pyelftools, lzma and zlib raise an open-ended set of exceptions on malformed
input (ELFError, ELFParseError, struct.error, ValueError, IndexError, KeyError,
UnicodeDecodeError, AssertionError, LZMAError, zlib.error, and AttributeError
or TypeError when a corrupt field turns into None).  Our public API promises
that nothing but an `UprobesError` escapes for any input file, so every entry
point that touches file content runs inside `guard()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from uprobes.errors import ElfError, UprobesError


@contextmanager
def guard(name: str | os.PathLike[str], what: str = "malformed ELF file") -> Iterator[None]:
    """Turn any non-uprobes exception raised inside into one `ElfError` line naming `name`."""
    try:
        yield
    except UprobesError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ElfError(f"{os.fspath(name)}: cannot read: {reason}") from exc
    except MemoryError as exc:
        raise ElfError(f"{os.fspath(name)}: {what} (too large to load)") from exc
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        detail = str(exc).splitlines()[0] if str(exc) else ""
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise ElfError(f"{os.fspath(name)}: {what} ({detail[:200]})") from exc
