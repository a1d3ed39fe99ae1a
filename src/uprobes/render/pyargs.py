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
    TYPE_FIELD,
    YIELD_TPTR,
    args_text,
    has_args,
    is_shown_otherwise,
    raised_text,
    yielded_type,
)

_TEXT = FetchType("string", view=ValueView("text"))
Convert = Callable[[tuple[ArgValue, ...]], tuple[ArgValue, ...]]


def _converter(info: ProbeInfo) -> tuple[ProbeInfo, Convert]:
    names = [name for name, _ in info.args]
    keep = [i for i, name in enumerate(names) if name not in RAW_FIELDS]
    with_args = has_args(names)
    raised = names.index(RAISED_FIELD) if RAISED_FIELD in names else None
    typed = names.index(TYPE_FIELD) if TYPE_FIELD in names else None
    wrapped = YIELD_TPTR in names

    def convert(values: tuple[ArgValue, ...]) -> tuple[ArgValue, ...]:
        shown = [values[i] for i in keep]
        if raised is not None and typed is not None and values[raised]:
            shown[keep.index(typed)] = raised_text(values[typed])
        if wrapped and typed is not None:
            inner = yielded_type(dict(zip(names, values)))
            if inner is not None:
                shown[keep.index(typed)] = inner
        if with_args:
            shown.append(args_text(dict(zip(names, values))))
        return tuple(shown)

    shown = tuple(info.args[i] for i in keep) + (((ARGS_FIELD, _TEXT),) if with_args else ())
    return replace(info, args=shown), convert


def shown_infos(infos: dict[str, ProbeInfo]) -> tuple[dict[str, ProbeInfo], dict[str, Convert]]:
    """The probes as they are shown (a `py:` entry's raw fields replaced by
    `args`), and per probe that has them, how its values are turned."""
    out, converts = dict(infos), {}
    for name, info in infos.items():
        if is_shown_otherwise([n for n, _ in info.args]):
            out[name], converts[name] = _converter(info)
    return out, converts


class PyArgsRenderer:
    """`inner` (made with `shown_infos`'s probes), fed hits as they are shown."""

    def __init__(self, inner: Any, converts: dict[str, Convert]) -> None:
        self.inner = inner
        self.converts = converts

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
            args = event.args
            values = self.converts[event.probe](tuple(args.values()))
            shown = [n for n in args if n not in RAW_FIELDS]
            shown += [ARGS_FIELD] if has_args(list(args)) else []
            event = replace(event, args=dict(zip(shown, values)))
        self.inner.event(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "converts"):
            object.__setattr__(self, name, value)
        else:  # (clock_end and the like: the inner renderer's)
            setattr(self.inner, name, value)
