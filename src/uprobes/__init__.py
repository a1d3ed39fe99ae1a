"""uprobes: dynamic user-space probes for Linux."""

from uprobes.errors import UprobesError

__all__ = ["UprobesError", "__version__"]
__version__ = "0.1.0"
