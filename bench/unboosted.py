"""`uprobes` with the ptrace engine's boosting off:  python -m bench.unboosted ARGS...

The ptrace engine always boosts what it can: the displaced instruction runs
from a slot that jumps back, with no second trap.  `relocate.plan(boost=False)`
single-steps it from the slot instead (the kernel's tier).  The engine has no
switch for that (no user should want it), so this entry point runs the CLI
with plan's default flipped, to measure what boosting saves.
"""

from __future__ import annotations

import functools
import sys

from uprobes.commands import entry_point
from uprobes.engines.tracee import relocate

relocate.plan = functools.partial(relocate.plan, boost=False)  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(entry_point())
