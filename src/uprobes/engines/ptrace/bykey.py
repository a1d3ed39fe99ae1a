"""Counting by key in the program (`count --by KEY [--value ARG]`).

Each probe's jump patch looks its key up in a bounded hash table in shared
memory and adds the hit there (engines/trapfree/keyed.py): the thread's tid
(for `--by tid` and `pid`, which the tids become at the end: this tracer
knows every thread's process), the thread's name at the hit (`--by comm`:
asked of the kernel, since a thread may be renamed at any time), or a fetcharg's value (a
register or a stack word, as trap-free recording reads them). `--value ARG`
adds the sum, min and max of a fetcharg's value per key. `--if`, `--tid`
and `--comm` are compiled into the same code, before the key is looked up (filtercode.py).
A probe whose key, value or filter cannot be read there, or whose site no
jump can cover, is not counted, and `by_key()` says why: no int3 stands in,
since its counts would be of another kind. (A key or value no probe's code
can read, or a site no jump can cover as the file says beforehand,
`key_problem`, is counted from events by the caller instead.)
"""

from __future__ import annotations

from uprobes.analysis.keyed import TASK_KEYS, Aggregate, KeyedCounts
from uprobes.engines.ptrace.state import TracerState
from uprobes.engines.ptrace.tasks import Thread, owner_of
from uprobes.engines.trapfree.fileplan import plan_for, plan_whole
from uprobes.engines.trapfree.filtercode import compile_check
from uprobes.engines.trapfree.jumppatch import Keyed
from uprobes.engines.trapfree.keyed import COMM, TID, Source, comm_name, source_of
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.model.registry import Probe
from uprobes.sys import ptrace

_U64 = 1 << 64


def key_problem(probes: list[ResolvedProbe], by: str | None, value: str | None) -> str | None:
    """Why the key `by` or the value `value` of one of `probes` cannot be
    read by the program's code, or why a site of one can be no jump (the
    caller counts from events then: that probe's hits an int3 trap each), or None."""
    for p in probes:
        for name in (None if by in TASK_KEYS else by, value):
            where = None if name is None else source_of(p, name, p.is_return)
            if isinstance(where, str):
                return where
    return jump_problem(probes)


def jump_problem(probes: list[ResolvedProbe], whole: bool = False) -> str | None:
    """Why a site of one of `probes` (an entry's, or a return's `ret`s) can
    be no jump, as the placement would find it, said before anything runs
    (its name; the tracer says why when it places it), or None. `whole` (timing): a function one
    patch covers whole needs no other. The vDSO is left to the placement."""
    sites: dict[tuple[int, int], list[int]] = {}
    for p in probes:
        if isinstance(p.key, InodeKey):
            offsets = p.ret_sites if p.is_return and p.ret_sites else (p.file_offset,)
            sites.setdefault((p.key.dev, p.key.ino), []).extend(offsets)
    for p in probes:
        if not isinstance(p.key, InodeKey):
            continue
        dev, ino = p.key.dev, p.key.ino
        if whole and not isinstance(plan_whole(p.path, dev, ino, p.file_offset), str):
            continue
        rets = p.is_return and bool(p.ret_sites)
        for offset in p.ret_sites if rets and p.ret_sites else (p.file_offset,):
            plan = plan_for(p.path, dev, ino, offset, sites[(dev, ino)], at_return=rets,
                            tables=p.computed_gotos)
            if isinstance(plan, str):  # the tracer's note says why
                return f"{p.name} can be no jump"
    return None


class KeyCounter(TracerState):
    """The ptrace engine's keyed counting (`by_key`)."""

    _by_value: str | None
    _uncounted: dict[str, str]

    def _count_by(self, by: str | None, value: str | None) -> None:
        self._by, self._by_value = by, value
        self._former_tasks, self._uncounted = {}, {}

    def _place_keyed(self, t: Thread, regs: ptrace.UserRegs, probe: Probe, addr: int,
                     file_offset: int, ident: tuple[int, int] | None) -> None:
        at_ret = self._ret_sites.get(probe.key)  # type: ignore[arg-type]
        handlers = [c.ret_handler if at_ret is not None else c.handler for c in probe.consumers]
        lines = [self._ours[h] for h in handlers if h in self._ours]
        if not lines:
            return
        line = lines[0]
        name = next(n for n, p in zip(self._names_by_line, self.probes) if p is line)
        if name in self._uncounted:
            return
        how = self._keyed_source(line, at_ret is not None)
        if ident is None:
            how = "the vDSO is not counted by key"
        if not isinstance(how, str) and (how.check is not None or how.key is COMM):
            refused = self._comm_refused(t, None if how.key is COMM else how.check)
            if refused is not None:
                how = f"the thread's name cannot be asked for in the program ({refused})"
        if isinstance(how, str) or ident is None:
            self._uncounted[name] = str(how)
            return
        others = [p.point.file_offset for p in self.registry.in_inode(*ident)]
        plan = plan_for(probe.point.path, ident[0], ident[1], file_offset, others,
                        at_return=at_ret is not None)
        why = plan if isinstance(plan, str) else self._patch(
            t, regs, plan, name, addr - (file_offset - plan.file_offset), by=how)
        if why is not None:
            self._uncounted[name] = why

    def _keyed_source(self, line: ResolvedProbe, ret: bool) -> Keyed | str:
        assert self._by is not None
        key = self._key_source(line, ret)
        if isinstance(key, str):
            return key
        check = None
        if self.hit_filter is not None:
            compiled = compile_check(self.hit_filter.combined.root,
                                     lambda field: source_of(line, field, ret))
            if isinstance(compiled, str):
                return (f"its filter cannot be tested in the program ({compiled}): filter on "
                        "the tid, the comm (== or !=) or on fetchargs that are registers or "
                        "stack words")
            check = compiled
        if self._by_value is None:
            return Keyed(key, None, check)
        value = source_of(line, self._by_value, ret)
        return value if isinstance(value, str) else Keyed(key, value, check)

    def by_key(self) -> KeyedCounts:
        """The counts by key so far, as shown (tids become pids or comms)."""
        assert self._by is not None and self._jumps is not None
        out = KeyedCounts(self._by, self._by_value, uncounted=dict(self._uncounted))
        for name, line in zip(self._names_by_line, self.probes):
            if name in out.uncounted or name in out.keys:
                continue
            key_src = self._key_source(line, False)
            val_src = None if self._by_value is None else source_of(line, self._by_value, False)
            signed = isinstance(val_src, Source) and val_src.signed
            raw, overflow = self._jumps.by_key(name, signed)
            shown: dict[int | str, Aggregate] = {}
            for k, agg in raw.items():
                shown.setdefault(self._show_key(k, key_src), Aggregate()).merge(agg)
            out.keys[name] = shown
            out.overflow[name] = overflow
        return out

    def _key_source(self, line: ResolvedProbe, ret: bool) -> Source | str:
        """What the probe keys by: the tid (for tid and pid), the thread's
        name at the hit, or a fetcharg (or why it cannot)."""
        assert self._by is not None
        if self._by == "comm":
            return COMM
        return TID if self._by in TASK_KEYS else source_of(line, self._by, ret)

    def _show_key(self, raw: int, src: Source | str | None) -> int | str:
        if src is COMM:
            return comm_name(raw)
        if src is TID:
            pid, comm, tid = owner_of(self.threads, self._nested, self._former_tasks, raw)
            return tid if self._by == "tid" else pid if self._by == "pid" else comm
        if isinstance(src, Source) and src.signed and raw >= 1 << 63:
            return raw - _U64
        return raw
