"""What an engine does with a probe it cannot place, on either engine.

A probe that is one match of a glob (its spec resolved to several probes)
is left out with a note, `skipped NAME: REASON`: a glob over a library
places what can be placed (some entry points start with instructions no
engine can step). A probe its spec names alone is an error: leaving it out
would place nothing of what was asked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from uprobes.errors import EngineError, UprobesError
from uprobes.model.probe import ResolvedProbe


class Refusals:
    """The refusal rule for one run's `probes`; notes go to `note`, each name once."""

    def __init__(self, probes: Sequence[ResolvedProbe], note: Callable[[str], object]) -> None:
        per_spec = Counter(id(p.spec) for p in probes)
        self._globbed = {spec for spec, n in per_spec.items() if n > 1}
        self._note = note
        self._skipped: set[str] = set()

    def of_glob(self, probe: ResolvedProbe) -> bool:
        """Whether `probe` is one match of a glob (its spec resolved to several)."""
        return id(probe.spec) in self._globbed

    def refuse(self, probe: ResolvedProbe, name: str, reason: str,
               error: UprobesError | None = None, *, skippable: bool = True) -> None:
        """`probe` (shown as `name`) cannot be placed, for `reason`: skip it
        with a note if it is one match of a glob and `skippable` (a part of a
        probe that is placed whole or not at all is not), else raise `error`
        (by default an EngineError saying `NAME: REASON`)."""
        if not (skippable and self.of_glob(probe)):
            raise error if error is not None else EngineError(f"{name}: {reason}")
        self.skip(name, reason)

    def skip(self, name: str, reason: str) -> None:
        """Leave probe `name` out: one note, however often it is refused."""
        if name not in self._skipped:
            self._skipped.add(name)
            self._note(f"skipped {name}: {reason}")
