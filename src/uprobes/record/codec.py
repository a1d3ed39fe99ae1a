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
lists), a dict `{"$d": [[key, value]...]}`.
"""

from __future__ import annotations

import dataclasses
import enum
from types import ModuleType
from typing import Any

from uprobes.engines.trapfree import recording
from uprobes.errors import RecordingError
from uprobes.lang import ast
from uprobes.model import event, probe


def _classes(*modules: ModuleType) -> dict[str, type]:
    out: dict[str, type] = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__ and (
                    dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                out[name] = value
    return out


KNOWN = _classes(ast, probe, event, recording)
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
            return cls(data["v"])
        cls = KNOWN[data["$"]]
        fields = {k: decode(v) for k, v in data.items() if k != "$"}
        return cls(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise RecordingError(f"the recording holds a value uprobes cannot read back ({e})") from e
