"""One error root for the whole tool, a subclass per layer.

The CLI catches `UprobesError` in one place and prints one line (plus a caret
line for spec errors); anything else escaping is a bug in uprobes.
"""

from __future__ import annotations


class UprobesError(Exception):
    """Root of every error uprobes reports to the user."""

    exit_status = 1

    def lines(self) -> list[str]:
        """The message as printed after `uprobes: error: `, first line first."""
        return [str(self)]


class UsageError(UprobesError):
    """Bad command line."""

    exit_status = 2


class SpecError(UprobesError):
    """A probe line the language rejects: the kernel's wording, and where.

    `text` is the line and `pos` the index the caret points at, like the
    kernel's tracefs `error_log`.  `detail` says more than the kernel does
    (what was wrong, what to write instead); `message` stays the kernel's words.
    """

    exit_status = 2

    def __init__(self, message: str, text: str = "", pos: int = 0, detail: str = "") -> None:
        super().__init__(f"{message}: {detail}" if detail else message)
        self.message = message
        self.text = text
        self.pos = pos
        self.detail = detail

    def lines(self) -> list[str]:
        first = f"{self.message}: {self.detail}" if self.detail else self.message
        if not self.text:
            return [first]
        return [first, "  " + self.text, "  " + " " * self.pos + "^"]


class ConfigError(UsageError):
    """A bad agent config file: says the file, the line and the key."""

    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.path = path
        self.line = line
        self.key = key


class ResolveError(UprobesError):
    """A name that does not lead to (inode, file offset): file, symbol, offset."""

    exit_status = 2


class ElfError(ResolveError):
    """A file that is not ELF, or is truncated or malformed."""


class ProcessError(UprobesError):
    """A process that does not exist or that we may not look at."""

    exit_status = 2


class KernelError(UprobesError):
    """The kernel refused something (tracefs, perf_event_open, ptrace)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class EngineError(UprobesError):
    """An engine could not place or run a probe."""


class RecordingError(UsageError):
    """A recording directory (`uprobes record -o DIR`) that cannot be read back:
    missing, of another format, truncated or altered."""
