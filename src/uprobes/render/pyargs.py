"""`py:` entries' arguments as one field: a renderer in front of another
that turns each such hit's raw fields (model/pyargs.py) into
`args=(self=<Job>, k=3)`, so every output format shows the same text,
whichever engine fetched the fields, live or from a recording."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from uprobes.lang.ast import FetchType, ValueView
from uprobes.model.event import ArgValue, Event, Hit, ProbeInfo
from uprobes.model.pyargs import (
    ARGS_FIELD,
    RAISED_FIELD,
    RAW_FIELDS,
    RETURNED,
    TYPE_FIELD,
    YIELD_TPTR,
    args_text,
    arguments,
    has_args,
    is_shown_otherwise,
    raised_text,
    raised_type,
    returned,
    slot_fields,
    yielded_type,
)

_TEXT = FetchType("string", view=ValueView("text"))
RAISED_KEY = "raised"
VALUE_KEY = "value"
"""A Session's `py:` return: the name of the exception's type it was left by
(None: it returned), and the value it returned (model/pyargs.py `returned`)."""
Convert = Callable[[tuple[ArgValue, ...]], tuple[Any, ...]]


def _converter(info: ProbeInfo, structured: bool) -> tuple[ProbeInfo, Convert]:
    names = [name for name, _ in info.args]
    keep = [i for i, name in enumerate(names) if name not in RAW_FIELDS]
    with_args = has_args(names)
    raised = names.index(RAISED_FIELD) if RAISED_FIELD in names else None
    typed = names.index(TYPE_FIELD) if TYPE_FIELD in names else None
    wrapped = YIELD_TPTR in names
    extra: list[str] = [ARGS_FIELD] if with_args else []
    if structured:
        extra += [RAISED_KEY] if raised is not None else []
        extra += [VALUE_KEY] if slot_fields(RETURNED)["ptr"] in names else []

    def convert(values: tuple[ArgValue, ...]) -> tuple[Any, ...]:
        shown: list[Any] = [values[i] for i in keep]
        if raised is not None and typed is not None and values[raised]:
            shown[keep.index(typed)] = raised_text(values[typed])
        if wrapped and typed is not None:
            inner = yielded_type(dict(zip(names, values)))
            if inner is not None:
                shown[keep.index(typed)] = inner
        if extra:
            shown += _extras(dict(zip(names, values)), extra, structured)
        return tuple(shown)

    shown = tuple(info.args[i] for i in keep) + tuple((key, _TEXT) for key in extra)
    return replace(info, args=shown), convert


def _extras(raw: dict[str, ArgValue], keys: list[str], structured: bool) -> list[Any]:
    """The values of `keys` (ARGS_FIELD, RAISED_KEY, VALUE_KEY) from a hit's raw fields."""
    out: list[Any] = []
    for key in keys:
        if key == ARGS_FIELD:
            out.append(arguments(raw) if structured else args_text(raw))
        else:
            out.append(raised_type(raw) if key == RAISED_KEY else returned(raw))
    return out


def shown_infos(infos: dict[str, ProbeInfo], structured: bool = False
                ) -> tuple[dict[str, ProbeInfo], dict[str, Convert]]:
    """The probes as they are shown (a `py:` entry's raw fields replaced by
    `args`), and per probe that has them, how its values are turned.
    `structured` (a Session's events): `args` is a `PyArguments` (a dict of
    the values), and a return adds `raised` and, where fetched, `value`."""
    out, converts = dict(infos), {}
    for name, info in infos.items():
        if is_shown_otherwise([n for n, _ in info.args]):
            out[name], converts[name] = _converter(info, structured)
    return out, converts


def shown_event_args(args: dict[str, Any], info: ProbeInfo, convert: Convert
                     ) -> dict[str, Any]:
    """An event's `args` (the raw fields, by name) as `shown_infos`' probe
    `info` shows them."""
    return dict(zip((n for n, _ in info.args), convert(tuple(args.values()))))


class PyArgsRenderer:
    """`inner` (made with `shown_infos`'s probes), fed hits as they are shown."""

    def __init__(self, inner: Any, converts: dict[str, Convert],
                 infos: dict[str, ProbeInfo]) -> None:
        self.inner = inner
        self.converts = converts
        self.infos = infos

    def _hits(self, hits: list[Hit]) -> list[Hit]:
        converts = self.converts
        return [h if h[4] not in converts else (*h[:8], converts[h[4]](h[8]), *h[9:])
                for h in hits]

    def hits(self, hits: list[Hit]) -> None:
        self.inner.hits(self._hits(hits))

    def lines(self, hits: list[Hit]) -> list[str]:
        lines: list[str] = self.inner.lines(self._hits(hits))
        return lines

    def event(self, event: Event) -> None:
        if event.probe in self.converts:
            event = replace(event, args=shown_event_args(
                event.args, self.infos[event.probe], self.converts[event.probe]))
        self.inner.event(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "converts", "infos"):
            object.__setattr__(self, name, value)
        else:  # (clock_end and the like: the inner renderer's)
            setattr(self.inner, name, value)
