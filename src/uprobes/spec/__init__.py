"""The probe language: parse a line into frozen dataclasses, render it back.

`parse` is pure (no file system); `render` gives our canonical line;
`kernel_line` the uprobe_events line for a resolved probe.
"""

from uprobes.spec.grammar import parse, parse_args
from uprobes.spec.lower import kernel_line
from uprobes.spec.names import auto_event_name, symbol_event_name
from uprobes.spec.render import render

__all__ = ["auto_event_name", "kernel_line", "parse", "parse_args", "render",
           "symbol_event_name"]
