"""Which engine serves a run: `kernel` or `ptrace`.

`auto` takes the kernel (system-wide, cheapest per hit) unless it cannot
serve: a vDSO probe (no file, so no inode for the kernel to name), a file
whose path has whitespace (uprobe_events cannot name it), an argument in
an SSE register (a float from DWARF, which no fetcharg reads), a probe
too big for one kernel event (more than 128 fetchargs, 3072 bytes of
fields or a 4094-byte `uprobe_events` line: a struct or a Rust enum of many
fields), or no usable tracefs and kernel uprobes (not root, lockdown, no
CONFIG_UPROBES). A count is judged by what it fetches: only what its
filter tests (it writes no record). Then the ptrace engine, which needs a process or a
command to trace; for a probe the kernel cannot express (an SSE register,
too big) a note says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from uprobes.engines.kernel.fits import kernel_cannot_take
from uprobes.engines.kernel.probe_line import kernel_can_name, kernel_cannot_read
from uprobes.errors import UsageError
from uprobes.model.probe import ResolvedProbe, VdsoKey

ENGINES = ("auto", "kernel", "ptrace")


def pick_engine(engine: str, probes: Sequence[ResolvedProbe], *, has_target: bool,
                python: bool = False, note: Callable[[str], object] | None = None) -> str:
    """The engine for `probes`; `has_target`: a process or a command is
    given; `python`: stacks with Python frames are asked for; `note` gets
    why `auto` takes the ptrace engine for a probe the kernel cannot express."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    if python:
        # CPython 3.11 keeps its frames in chunks of heap it allocates, not
        # on the C stack, so a sampled stack copy never holds them.
        if engine == "kernel":
            raise UsageError("--python: the kernel engine cannot read Python frames (they are "
                             "in the interpreter's heap, not in the sampled stack); "
                             "-e ptrace can")
        if not has_target:
            raise UsageError("--python reads the frames of a process at each hit: give -p PID "
                             "or -- CMD")
        return "ptrace"
    vdso = next((p for p in probes if isinstance(p.key, VdsoKey)), None)
    spaced = next((p for p in probes if not kernel_can_name(p.path)), None)
    vector = next((p for p in probes if any(kernel_cannot_read(a) for a in p.args)), None)
    if engine == "kernel" and vdso is not None:
        raise UsageError(f"{vdso.name}: the kernel's uprobes cannot probe the vDSO (it has no "
                         "file, so no inode to name); -e ptrace can")
    if engine == "kernel" and spaced is not None:
        raise UsageError(f"{spaced.path}: the kernel's uprobe_events cannot name a path with "
                         "whitespace (it splits lines at spaces); -e ptrace can")
    if engine == "kernel" and vector is not None:
        arg = next(a for a in vector.args if kernel_cannot_read(a))
        raise UsageError(f"{vector.name}: {arg.name} is in an SSE register (a float), and the "
                         "kernel's uprobe fetchargs read the general registers only; "
                         "-e ptrace can")
    if engine != "auto":
        return engine
    from uprobes.sys.features import features
    why = None
    if vdso is not None:
        why = f"{vdso.name} is in the vDSO, which the kernel cannot probe"
    elif spaced is not None:
        why = f"{spaced.path} has whitespace in its path, which the kernel cannot name"
    elif vector is not None:
        why = (f"{vector.name} reads a value in an SSE register (a float), which the "
               "kernel's fetchargs cannot")
    elif not features().kernel_engine_usable:
        why = features().tracefs_why or "the kernel's uprobes are not usable here"
    expressible = why is not None and vector is None
    if why is None:
        big = next(((p, r) for p in probes if (r := kernel_cannot_take(p)) is not None), None)
        if big is None:
            return "kernel"
        why = f"{big[0].name}: {big[1]}"
    if not has_target:
        raise UsageError(f"{why}; the ptrace engine can, in a process or a command: "
                         "give -p PID or -- CMD")
    if note is not None and not expressible:
        note(f"{why}: -e auto takes the ptrace engine, which reads it")
    return "ptrace"
