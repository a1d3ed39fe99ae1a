"""uprobes: dynamic user-space probes for Linux."""

from uprobes.errors import UprobesError

__all__ = ["Event", "Session", "UprobesError", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The API pulls in the engines; the CLI imports only what a command needs.
    if name in ("Session", "Event"):
        from uprobes import session
        return getattr(session, name)
    raise AttributeError(f"module 'uprobes' has no attribute {name!r}")
