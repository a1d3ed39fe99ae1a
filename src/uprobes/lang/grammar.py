"""A probe line -> `Spec`: the kernel's uprobe_events grammar plus ours.

    p[:[GRP/|GRP.][EVENT]] PLACE [FETCHARGS]     entry probe
    r[:[GRP/|GRP.][EVENT]] PLACE [FETCHARGS]     return probe (or PLACE%return)
    PLACE [FETCHARGS]                            entry probe, `p` left out
    -:[GRP/]EVENT                                clear (`-:GRP/`: the whole group)

PLACE is described in `uprobes.lang.targets`, FETCHARGS in
`uprobes.lang.fetchargs`. Lines are split into tokens at whitespace and
anything from '#' on is a comment, as tracefs does; our one addition is a
PATH in double quotes, which may hold whitespace (`"/opt/my app/bin":main`,
`usdt:"/opt/my app/bin":prov:name`). The kernel has no quoting, so only
the first two tokens, where a PLACE can be, are read that way, and only
from a '"' that starts the PATH. The first token is the
kind token when it is `p`/`r` alone, starts `p:`/`r:`, is a `p...`/`r...`
word with no ':' (the kernel only looks at the first letter), or when the
second token is a kernel PATH:OFFSET; otherwise it is PLACE. So a file
named `p` is written `./p:main` or `p p:main`.

Errors carry the kernel's text and caret: `SpecError.text` is the tokens
joined by single spaces (what the kernel's error_log shows as `Command:`)
and `pos` indexes into it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from uprobes.errors import SpecError
from uprobes.lang import messages as msg
from uprobes.lang.ast import ClearSpec, FetchArg, ProbeKind, ProbeSpec, Spec, UsdtTarget
from uprobes.lang.fetchargs import parse_fetcharg
from uprobes.lang.messages import TokenError
from uprobes.lang.names import parse_event_name
from uprobes.lang.numbers import is_good_name, is_good_system_name
from uprobes.lang.targets import is_kernel_place, parse_target

MAX_TRACE_ARGS = 128
MAX_LINE = 4094
_SPACE = " \t\n\v\f\r"
_SPACES = re.compile(f"[{re.escape(_SPACE)}]+")


def parse(text: str) -> Spec:
    """Parse one probe line. Pure: no file is looked at.

    Raises `SpecError` (and nothing else) for any line it refuses."""
    try:
        return _parse(text)
    except SpecError:
        raise
    except Exception as exc:  # the contract: only SpecError leaves parse()
        raise SpecError(f"{msg.INTERNAL} ({type(exc).__name__}: {exc})", text, 0) from exc


def parse_args(args: Sequence[str], *, is_return: bool = False) -> tuple[FetchArg, ...]:
    """Parse fetchargs given one per string (e.g. from a command line)."""
    tokens = list(args)
    return _Line(tokens).fetchargs(0, is_return)


def _parse(text: str) -> Spec:
    line = text.split("\0", 1)[0]
    if line.endswith("\n"):
        line = line[:-1]
    if "\n" in line:
        raise SpecError(msg.MULTI_LINE, line.replace("\n", " "), line.index("\n"))
    line = line.split("#", 1)[0]
    tokens = _split(line)
    cmd = _Line(tokens)
    if len(line) > MAX_LINE:
        raise SpecError(msg.LINE_TOO_LONG, cmd.command, MAX_LINE)
    if not tokens:
        raise SpecError(msg.EMPTY_LINE, "", 0)
    if line.startswith("-"):
        return cmd.clear(text.strip())
    if tokens[0].startswith("-"):
        raise SpecError(msg.CLEAR_NOT_FIRST, cmd.command, 0)
    return cmd.probe(text.strip())


_QUOTED_PLACE = ('"', 'usdt:"', 'u:"')
"""How a token that opens a quoted PATH starts."""


def _split(line: str) -> list[str]:
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in _SPACE:
            i += 1
            continue
        j = i
        if len(words) < 2 and line.startswith(_QUOTED_PLACE, i):
            close = line.find('"', line.index('"', i) + 1)
            if close > 0:
                j = close + 1
        while j < n and line[j] not in _SPACE:
            if len(words) < 2 and line[j] == "(":
                j = _parameter_list_end(line, i, j)
            j += 1
        words.append(line[i:j])
        i = j
    return words


def _parameter_list_end(line: str, start: int, at: int) -> int:
    """Where the '(' at `at`, in a PLACE-position word from `start`, closes
    when it opens a C++ parameter list (`ns::f(int, char const*)`), which
    may hold whitespace; else `at`. It does when the word is a symbol place
    (no digit after its last ':', unlike the kernel's `PATH:OFF(REF)`), the
    list starts with a type name or closes at once, and it closes on this
    line."""
    before = line[start:at]
    colon = before.rfind(":")
    if colon < 0 or before[colon + 1:colon + 2].isdigit():
        return at
    first = line[at + 1:].lstrip(_SPACE)[:1]
    if not (first.isalpha() or first in "_)"):
        return at
    depth = 0
    for k in range(at, len(line)):
        if line[k] == "(":
            depth += 1
        elif line[k] == ")":
            depth -= 1
            if depth == 0:
                return k
    return at


class _Line:
    """The tokens of one line and where each starts in the joined command."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.command = " ".join(tokens)
        self.starts: list[int] = []
        at = 0
        for tok in tokens:
            self.starts.append(at)
            at += len(tok) + 1

    def error(self, message: str, index: int, offset: int = 0, detail: str = "") -> SpecError:
        if index >= len(self.tokens):  # the kernel: "next to the last arg + space"
            return SpecError(message, self.command, len(self.command) + 1, detail)
        return SpecError(message, self.command, self.starts[index] + offset, detail)

    def probe(self, text: str) -> ProbeSpec:
        t0 = self.tokens[0]
        explicit = t0[0] in "pr" and (
            len(t0) == 1 or t0[1] == ":" or ":" not in t0
            or (len(self.tokens) > 1 and is_kernel_place(self.tokens[1])))
        first_arg = 2 if explicit else 1
        if len(self.tokens) - first_arg > MAX_TRACE_ARGS:
            raise self.error(msg.TOO_MANY_ARGS, first_arg)
        kind = ProbeKind.RETURN if explicit and t0[0] == "r" else ProbeKind.ENTRY
        name = t0[2:] if explicit and len(t0) > 1 and t0[1] == ":" else None
        place_at = first_arg - 1
        if place_at >= len(self.tokens):
            raise self.error(msg.NO_PLACE, place_at)
        try:
            target, suffix_return = parse_target(self.tokens[place_at])
        except TokenError as e:
            detail = e.detail
            if e.message == msg.BAD_PLACE and any(":" in t for t in self.tokens[place_at + 1:]):
                detail = msg.SPACE_HINT  # `/opt/my app/bin:main`, split at the space
            raise self.error(e.message, place_at, e.offset, detail) from None
        if suffix_return:
            kind = ProbeKind.RETURN
        if isinstance(target, UsdtTarget) and kind is ProbeKind.RETURN:
            raise self.error(msg.USDT_RETURN, 0)
        group = event = None
        if name is not None:
            try:
                group, event = parse_event_name(name, 2)
            except TokenError as e:
                raise self.error(e.message, 0, e.offset) from None
        args = self.fetchargs(first_arg, kind is ProbeKind.RETURN)
        return ProbeSpec(kind, target, args, group, event, text)

    def fetchargs(self, first: int, is_return: bool) -> tuple[FetchArg, ...]:
        args: list[FetchArg] = []
        for i, tok in enumerate(self.tokens[first:]):
            try:
                args.append(parse_fetcharg(tok, i, is_return, [a.name for a in args]))
            except TokenError as e:
                raise self.error(e.message, first + i, e.offset, e.detail) from None
        return tuple(args)

    def clear(self, text: str) -> ClearSpec:
        t0 = self.tokens[0]
        if t0[1:2] != ":":
            raise self.error(msg.BAD_CLEAR, 0)
        name = t0[2:]
        group: str | None = None
        event = name
        slash = name.find("/")
        if slash >= 0:
            group, event = name[:slash], name[slash + 1:]
            if not group:
                raise self.error(msg.NO_GROUP_NAME, 0, 2)
            if not is_good_system_name(group):
                raise self.error(msg.BAD_GROUP_NAME, 0, 2)
        if not event and group is None:
            raise self.error(msg.NO_EVENT_NAME, 0, 2)
        if event and not is_good_name(event):
            raise self.error(msg.BAD_EVENT_NAME, 0, 3 + slash)
        if len(self.tokens) > 1:
            raise self.error(msg.CLEAR_ARGS, 1)
        return ClearSpec(event, group, text)
