"""Hits counted by key: per key the count, and the sum, min and max of a value."""

from __future__ import annotations

from dataclasses import dataclass, field

TASK_KEYS = ("tid", "pid", "comm")
"""Keys every hit has: its thread, its process, its thread's name."""


@dataclass
class Aggregate:
    """One key's hits, and the sum, min and max of the value."""

    count: int = 0
    sum: int = 0
    min: int | None = None
    max: int | None = None
    unread: int = 0
    """Hits counted whose value could not be read (a DWARF value that
    faulted): in `count`, not in the sum, min, max and mean."""

    def add(self, count: int, total: int, lo: int, hi: int) -> None:
        self.count += count
        self.sum += total
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def merge(self, other: Aggregate) -> None:
        """Add `other`'s hits (another entry, table or key shown alike)."""
        self.count += other.unread
        self.unread += other.unread
        if other.count > other.unread:
            assert other.min is not None and other.max is not None
            self.add(other.count - other.unread, other.sum, other.min, other.max)

    @property
    def mean(self) -> float:
        valued = self.count - self.unread
        return self.sum / valued if valued else 0.0


@dataclass
class KeyedCounts:
    """Per probe: its hits by key (ints, or names for comm), how many hits
    found no place in its table (`overflow`), and the probes not counted
    (and why). `value`: the fetcharg summed per key, if any."""

    by: str
    value: str | None
    keys: dict[str, dict[int | str, Aggregate]] = field(default_factory=dict)
    overflow: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, str] = field(default_factory=dict)
