"""What a `py:` probe shows of a call (docs/python.md): its arguments at
entry, a return by exception, a generator's or coroutine's suspensions.

Oracles: the fixture (tests/fixtures/py_args.py) records each call's
arguments from its own frame as they are to be shown, and counts what it
does; the kernel engine and the ptrace engine give the same text, value
for value, on every CPython 3.11 build here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CPYTHONS as INTERPRETERS
from conftest import LATER_CPYTHONS, over_later_cpythons

import uprobes

pytestmark = pytest.mark.root  # the kernel engine
FIXTURE = str(Path(__file__).parent / "fixtures" / "py_args.py")
UPROBES = [sys.executable, "-m", "uprobes"]
EVERY = INTERPRETERS + LATER_CPYTHONS
"""3.11's builds and the later versions (3.12, 3.13) where installed."""


def _trace(engine: str, python: str, tmp_path: Path, *specs: str,
           rounds: int = 14) -> tuple[str, list[str]]:
    """(uprobes' output, the fixture's own lines)."""
    own = tmp_path / f"own-{engine}"
    done = subprocess.run([*UPROBES, "trace", "-e", engine, *specs, "--", python, FIXTURE,
                           str(rounds), str(own)], capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout, own.read_text().splitlines()


def _counts(engine: str, python: str, tmp_path: Path, *specs: str) -> tuple[dict[str, int],
                                                                               dict[str, int]]:
    """(uprobes' counts by probe, the fixture's own COUNT lines)."""
    own_file = tmp_path / f"own-{engine}"
    done = subprocess.run([*UPROBES, "count", "--json", "-e", engine, *specs, "--", python,
                           FIXTURE, "14", str(own_file)], capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    own = {line.split()[1]: int(line.split()[2])
           for line in own_file.read_text().splitlines() if line.startswith("COUNT ")}
    return json.loads(done.stdout.splitlines()[-1]), own


@pytest.mark.parametrize("python", INTERPRETERS, ids=[Path(p).name for p in INTERPRETERS])
def test_arguments_at_entry_are_the_programs_own(python: str, tmp_path: Path) -> None:
    """ints (a machine word's, bigger ones by type), strs (compact ASCII,
    cut at 32 characters, escaped; others by type), None, bools, objects by
    type (the program's own classes named as those builtins too); `*args`
    and `**kwargs` counted, all shown in the signature's order (`*args`
    before the keyword-only ones, as the frame does not keep them); the
    ninth on counted, not shown; names cut at 24 characters, a non-ASCII
    one marked."""
    shown = {}
    for engine in ("kernel", "ptrace"):
        out, lines = _trace(engine, python, tmp_path, "py:__main__.mixed", "py:__main__.small",
                            "py:__main__.Shape.scale", "py:__main__.lookalikes",
                            "py:__main__.named", "py:__main__.ordered")
        own = [line.split(" ", 2)[1:] for line in lines if line.startswith("ARGS ")
               and line.split()[1] in ("mixed", "small", "Shape.scale", "lookalikes", "named",
                                       "ordered")]
        seen = [(m[1], m[2]) for m in re.finditer(r": __main__\.\S+: .* qualname=\"(\S+)\""
                                                  r" .* args=(.*)$", out, re.M)]
        assert len(own) == 7 * 14
        assert seen == [(qualname, args) for qualname, args in own]
        shown[engine] = seen
    assert shown["kernel"] == shown["ptrace"]
    texts = {args for _, args in shown["kernel"]}
    # (the cases the fixture goes through, as its own rules show them)
    for words in ['n=1152921504606846975,', "n=<int>,", 'name="say \\"hi\\"\\\\"',
                  'name="tab\\x09here"', 'name="' + "b" * 32 + '"...', "name=<str>",
                  "rest=<list>", "nothing=None", "flag=False", "+3 more", "y=<float>",
                  "(self=<Shape>, by=True)", 'b="x", rest=<tuple>, k=None, kw=<dict>)',
                  "n=-1152921504606846975,",
                  # (the program's classes named int, str, bool, NoneType: by
                  # their type's address, not its name; names cut, not ASCII)
                  "(a=<int>, b=<str>, c=<bool>, d=<NoneType>)",
                  "(a_very_long_argument_nam...=0, <non-ASCII>=\"\", short=None)"]:
        assert any(words in t for t in texts), words


@pytest.mark.parametrize("python", EVERY, ids=[Path(p).name for p in EVERY])
def test_a_call_left_by_an_exception_returns_raised(python: str, tmp_path: Path) -> None:
    """`fails` raises (its exit is the eval loop's unwinding, exit_unwind);
    `catches` calls it and catches the exception (an exception inside a
    frame that handles it is no exit): every call of each gives one return,
    `(raised KeyError)` for `fails` alone (the exception's type), on both
    engines alike."""
    shown = {}
    for engine in ("kernel", "ptrace"):
        out, lines = _trace(engine, python, tmp_path, "r py:__main__.fails",
                            "r py:__main__.catches")
        own = {line.split()[1]: int(line.split()[2]) for line in lines
               if line.startswith("COUNT ")}
        returns = re.findall(r": __main__\.(\w+)%return: .* type=(\".*\")$", out, re.M)
        assert own["fails"] == own["catches"] > 0
        assert sorted(returns) == sorted([("catches", '"int"')] * own["catches"]
                                         + [("fails", '"(raised KeyError)"')] * own["fails"])
        shown[engine] = returns
    assert shown["kernel"] == shown["ptrace"]


@pytest.mark.parametrize("python", INTERPRETERS, ids=[Path(p).name for p in INTERPRETERS])
def test_yields_and_resumptions_are_the_programs_own(python: str, tmp_path: Path) -> None:
    """`%yield`: a generator's yield, a coroutine's await (its frame yields
    what the awaited yields); `%resume`: the next() or send() after one. The
    fixture counts each suspension, and each is resumed once."""
    _yields_and_resumptions(python, tmp_path)


@over_later_cpythons
def test_yields_and_resumptions_on_later_cpythons(python: str, tmp_path: Path) -> None:
    """The same on 3.12 and 3.13 (their YIELD_VALUE and RESUME forms);
    throw() and close() are test_throw_and_close_resume_a_generator's."""
    _yields_and_resumptions(python, tmp_path)


def _yields_and_resumptions(python: str, tmp_path: Path) -> None:
    specs = [f"py:__main__.{f}%{point}" for f in ("counter", "waiter")
             for point in ("yield", "resume")]
    for engine in ("kernel", "ptrace"):
        got, own = _counts(engine, python, tmp_path, *specs)
        assert own["counter%yield"] > 0 and own["waiter%yield"] > 0
        assert got == {f"py/__main__.{f}%{point}": own[f"{f}%yield"]
                       for f in ("counter", "waiter") for point in ("yield", "resume")}


@pytest.mark.parametrize("spec", ["r py:python3.11:m.gen%yield", "py:python3.11:m.gen%yield%return",
                                  "py:python3.11:m.gen%resumed"])
def test_a_yield_is_no_return(spec: str) -> None:
    done = subprocess.run([*UPROBES, "trace", spec, "--", "/bin/true"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("uprobes: error:")


@pytest.mark.parametrize("python", EVERY, ids=[Path(p).name for p in EVERY])
def test_a_frame_that_never_ran_gives_no_return(python: str, tmp_path: Path) -> None:
    """At the recursion limit the last call's frame is pushed and left by
    RecursionError before it runs (no entry), and a generator thrown into
    before its first next() ends so too: neither gives a `(raised)` return,
    so calls and returns pair exactly, as many as the fixture counts."""
    for engine in ("kernel", "ptrace"):
        got, own = _counts(engine, python, tmp_path, "py:__main__.deep", "r py:__main__.deep",
                           "py:__main__.relay", "r py:__main__.relay")
        assert own["deep"] > 100
        assert got == {"py/__main__.deep": own["deep"], "py/__main__.deep%return": own["deep"],
                       "py/__main__.relay": own["relay"],
                       "py/__main__.relay%return": own["relay"]}


@pytest.mark.parametrize("python", EVERY, ids=[Path(p).name for p in EVERY])
def test_throw_and_close_resume_a_generator(python: str, tmp_path: Path) -> None:
    """`relay` is resumed by send(), by throw() (which it catches) and by
    close() (GeneratorExit, which ends it): each is a `%resume`; its close
    is its `(raised)` return."""
    specs = [f"py:__main__.relay%{point}" for point in ("yield", "resume")]
    for engine in ("kernel", "ptrace"):
        got, own = _counts(engine, python, tmp_path, *specs)
        assert own["relay%resume"] == own["relay%yield"] > 0
        assert got == {f"py/__main__.relay%{point}": own[f"relay%{point}"]
                       for point in ("yield", "resume")}
    shown = {}
    for engine in ("kernel", "ptrace"):
        out, _ = _trace(engine, python, tmp_path, *specs, "r py:__main__.relay", rounds=2)
        shown[engine] = re.findall(r": __main__\.relay(%\w+): .*?(?:type=(\".*\"))?$", out, re.M)
        assert shown[engine] == [("%yield", '"NoneType"'), ("%resume", ""),
                                 ("%yield", '"NoneType"'), ("%resume", ""),
                                 ("%yield", '"NoneType"'), ("%resume", ""),
                                 ("%return", '"(raised GeneratorExit)"')] * 2
    assert shown["kernel"] == shown["ptrace"]


@pytest.mark.parametrize("python", INTERPRETERS, ids=[Path(p).name for p in INTERPRETERS])
def test_an_async_generators_yield_shows_the_value(python: str, tmp_path: Path) -> None:
    """An async generator's `yield` gives up its value wrapped (what its
    asend() unwraps): `%yield` shows the wrapped value's type (the wrapper
    told by its type's address), as the fixture saw it, on both engines."""
    shown = {}
    for engine in ("kernel", "ptrace"):
        out, lines = _trace(engine, python, tmp_path, "py:__main__.agen%yield")
        own = [line.split()[2] for line in lines if line.startswith("YIELDED agen ")]
        shown[engine] = re.findall(r": __main__\.agen%yield: .* type=\"(\w+)\"$", out, re.M)
        assert own and shown[engine] == own
    assert shown["kernel"] == shown["ptrace"]


@pytest.mark.parametrize("python", INTERPRETERS, ids=[Path(p).name for p in INTERPRETERS])
def test_a_sessions_py_events_give_values(python: str, tmp_path: Path) -> None:
    """`Session(py_args=True)`: a `py:` entry's `args` is a dict of the
    values the fixture saw in its own frame (ints, bools, None and short
    ASCII strs by value, their Python types kept; anything else `Shown`, as
    `trace` shows it), whose `str()` is `trace`'s text; a return's `value`
    is what the function returned (`mixed` its `n`, `small` its `x`,
    `catches` 1), `raised` the exception's type for `fails` alone; on both
    engines alike."""
    funcs = ("mixed", "small", "Shape.scale", "lookalikes", "named", "ordered", "fails",
             "catches")
    seen = {}
    for engine in ("kernel", "ptrace"):
        events: list[uprobes.Event] = []
        s = uprobes.Session(engine=engine, py_args=True, note=lambda text: None)
        for f in funcs:
            s.probe(f"py:__main__.{f}", events.append)
            s.probe(f"r py:__main__.{f}", events.append)
        own_file = tmp_path / f"own-{engine}"
        assert s.spawn([python, FIXTURE, "14", str(own_file)]) == 0
        lines = own_file.read_text().splitlines()
        own_text = [line.split(" ", 2)[2] for line in lines if line.startswith("ARGS ")
                    and line.split()[1] in funcs]
        own_values = [json.loads(line.split(" ", 2)[2]) for line in lines
                      if line.startswith("VALUES ") and line.split()[1] in funcs]
        entries = [ev for ev in events if ev.kind == "p"]
        assert len(entries) == len(own_values) > 6 * 14
        for ev, text, values in zip(entries, own_text, own_values):
            args = ev.args["args"]
            assert isinstance(args, uprobes.PyArguments) and str(args) == text
            assert len(args.pairs) == len(values)
            for (name, got), (own_name, kind, value) in zip(args.pairs, values):
                assert name == own_name
                if kind == "s":
                    assert isinstance(got, uprobes.Shown) and got == value
                else:
                    assert type(got) is type(value) and got == value, (name, got, value)
        calls = {}  # (a frame's address is reused by a later call: in time order)
        returns = []
        for ev in events:
            if ev.kind == "p":
                calls[ev.args["__frame"]] = ev.args["qualname"], ev.args["args"]
                continue
            qualname, args = calls.pop(ev.args["__frame"])
            want = {"mixed": args.get("n"), "small": args.get("x"), "ordered": args.get("a"),
                    "Shape.scale": True,
                    "catches": 1}.get(qualname)
            if qualname == "fails":
                assert (ev.args["value"], ev.args["raised"]) == (None, "KeyError")
                assert ev.args["type"] == "(raised KeyError)"
            else:
                assert ev.args["raised"] is None
                assert type(ev.args["value"]) is type(want) and ev.args["value"] == want, \
                    (qualname, ev.args, args)
            returns.append((qualname, ev.args["value"], ev.args["raised"]))
        assert not calls
        seen[engine] = [(ev.args["qualname"], str(ev.args["args"])) for ev in entries], returns
    assert seen["kernel"] == seen["ptrace"]
