"""The probe language: parse a line into frozen dataclasses, render it back.

`parse` is pure (no file system); `render` gives our canonical line.
"""

from uprobes.lang.grammar import parse, parse_args
from uprobes.lang.names import auto_event_name, symbol_event_name
from uprobes.lang.render import render

__all__ = ["auto_event_name", "parse", "parse_args", "render",
           "symbol_event_name"]
