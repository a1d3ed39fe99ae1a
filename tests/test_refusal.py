"""The refusal rule both engines apply (uprobes.model.refusal): a probe of a
glob is skipped with one note, a probe named alone is an error."""

from __future__ import annotations

import pytest

from uprobes.errors import EngineError, KernelError
from uprobes.lang import parse
from uprobes.lang.ast import ProbeSpec
from uprobes.model.refusal import Refusals
from uprobes.resolve.resolver import Resolver


def _resolve(*lines: str):  # type: ignore[no-untyped-def]
    specs = [parse(line) for line in lines]
    assert all(isinstance(s, ProbeSpec) for s in specs)
    return Resolver().resolve_all(specs)  # type: ignore[arg-type]


def test_a_probe_of_a_glob_is_skipped_once_a_named_probe_is_an_error() -> None:
    probes = _resolve("libc:str*cmp", "libc:malloc")
    globbed = [p for p in probes if p.symbol != "malloc"]
    [named] = [p for p in probes if p.symbol == "malloc"]
    notes: list[str] = []
    rule = Refusals(probes, notes.append)
    assert len(globbed) > 1 and all(rule.of_glob(p) for p in globbed)
    assert not rule.of_glob(named)
    rule.refuse(globbed[0], "g/one", "cannot step it")
    rule.refuse(globbed[0], "g/one", "cannot step it")  # refused again elsewhere: one note
    assert notes == ["skipped g/one: cannot step it"]
    with pytest.raises(EngineError, match="^g/malloc: cannot step it$"):
        rule.refuse(named, "g/malloc", "cannot step it")
    with pytest.raises(KernelError, match="the kernel's own"):
        rule.refuse(named, "g/malloc", "x", KernelError("the kernel's own"))
    with pytest.raises(EngineError):  # a part placed whole or not at all
        rule.refuse(globbed[1], "g/two", "x", skippable=False)
    assert len(notes) == 1
