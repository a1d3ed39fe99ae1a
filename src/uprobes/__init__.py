"""uprobes: dynamic user-space probes for Linux."""

from uprobes.errors import UprobesError

__all__ = ["Event", "PyArguments", "Session", "Shown", "UprobesError", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The API pulls in the engines; the CLI imports only what a command needs.
    if name in ("Session", "Event"):
        from uprobes import session
        return getattr(session, name)
    if name in ("PyArguments", "Shown"):  # (a py: event's values, Session(py_args=True))
        from uprobes.model import pyargs
        return getattr(pyargs, name)
    raise AttributeError(f"module 'uprobes' has no attribute {name!r}")
