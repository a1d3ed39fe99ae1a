"""Our frozen dataclasses (resolved probes, their fetchargs and types) to JSON
and back, exactly: `decode(encode(x)) == x`.

A recording keeps the probes it was made with, so that a replay renders
and decodes by the very same fetchargs, types and DWARF views, with no
re-resolving (the binary may have changed since). JSON, not pickle: a
recording is a file someone may hand over, and reading it must not run
code. Only the classes of `KNOWN` can come back; anything else is a
`RecordingError`.

Shapes: a dataclass is `{"$": "ClassName", field: value...}`, an enum
`{"$enum": "ClassName", "v": value}`, a tuple `{"$t": [...]}` (lists stay
lists), a dict `{"$d": [[key, value]...]}`. Every field that comes back is
checked against its class's annotation (a `str` field holds a str, a tuple
of FetchArgs holds FetchArgs...), so what a replay then hands to generated
code and renderers has the types they were written for.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from functools import cache
from types import ModuleType
from typing import Any

from uprobes.engines.trapfree import recording
from uprobes.errors import RecordingError
from uprobes.lang import ast
from uprobes.model import event, probe, pyguard


def _classes(*modules: ModuleType) -> dict[str, type]:
    out: dict[str, type] = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__ and (
                    dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                out[name] = value
    return out


KNOWN = _classes(ast, probe, event, pyguard, recording)
"""The classes a recording may hold, by name."""


def encode(value: Any) -> Any:
    """`value` as JSON-ready data."""
    if isinstance(value, enum.Enum):
        return {"$enum": type(value).__name__, "v": value.value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if KNOWN.get(name) is not type(value):
            raise TypeError(f"{name} is not a class a recording keeps")
        return {"$": name, **{f.name: encode(getattr(value, f.name))
                              for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"$t": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"$d": [[encode(k), encode(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{type(value).__name__} is not a value a recording keeps")


def decode(data: Any) -> Any:
    """What `encode` made `data` from; RecordingError for anything else."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        raise RecordingError(f"unexpected {type(data).__name__} in the recording")
    try:
        if "$t" in data:
            return tuple(decode(v) for v in data["$t"])
        if "$d" in data:
            return {decode(k): decode(v) for k, v in data["$d"]}
        if "$enum" in data:
            cls = KNOWN[data["$enum"]]
            if not issubclass(cls, enum.Enum):
                raise TypeError(f"{cls.__name__} is not an enum")
            return cls(data["v"])
        cls = KNOWN[data["$"]]
        fields = {k: decode(v) for k, v in data.items() if k != "$"}
        hints = _hints(cls)
        for name, value in fields.items():
            if name not in hints or not _conforms(value, hints[name]):
                raise TypeError(f"{cls.__name__}.{name} cannot be {value!r:.60}")
        return cls(**fields)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise RecordingError(f"the recording holds a value uprobes cannot read back ({e})") from e


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type `hint` (the shapes our
    dataclasses use: classes, unions, tuples, lists, dicts, literals)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(args) == len(value) and all(map(_conforms, value, args))
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is float:
        return type(value) in (int, float)
    if hint is int:
        return type(value) is int
    if isinstance(hint, type):
        return isinstance(value, hint)
    return False  # a shape this codec does not know: not taken on trust
