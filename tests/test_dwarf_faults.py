"""Values behind pointers that cannot be read print `(fault)` on both
engines, where gdb says `Cannot access memory`, never the zeros a faulting
kernel fetch leaves (see uprobes.resolve.dwarfguards). The fixture calls
look() with a node whose `in` and `name` point into an unmapped page, with
NULL, with the unmapped page itself, and with a node whose `in` is readable
at the very end of a mapping (a guard's string runs into the unmapped page
there: the value still prints)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import Compiler, need
from gdb_support import gdb_batch

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.resolve.resolver import Resolver

EXPRS = {"p_id": "p->id", "p_in_x": "p->in->x", "p_next_in_y": "p->next->in->y",
         "p_name": "p->name", "p_deref_id": "p->id", "p_deref_name": "p->name",
         "p_deref_in": "p->in", "p_deref_next": "p->next", "p_deref_vals": "p->vals"}
PROBE = "look p->id p->in->x p->next->in->y p->name *p n"
HITS = 4


def _gdb(exe: Path, offset: int) -> list[dict[str, str]]:
    """gdb's print of each expression at each of the hits, as our trace text
    writes it: `(fault)` where gdb cannot access the memory."""
    exprs = list(dict.fromkeys(EXPRS.values()))
    cmds = ["set pagination off", "set print pretty off", "starti",
            f"break *((char *)&look + {offset})"]
    for _ in range(HITS):
        cmds.append("continue")
        for e in exprs:
            cmds += ["echo <<\\n", f"print {e}", "echo >>\\n"]
    out = gdb_batch(exe, cmds, merged=True)
    blocks = re.findall(r"^<<\n(.*?)^>>$", out, re.M | re.S)
    assert len(blocks) == HITS * len(exprs), out
    hits = []
    for h in range(HITS):
        got = {}
        for i, e in enumerate(exprs):
            text = blocks[h * len(exprs) + i].strip()
            m = re.fullmatch(r"\$\d+ = (.*)", text)
            if m is None or "Cannot access memory" in text:
                got[e] = "(fault)"
                continue
            value = m.group(1)
            s = re.fullmatch(r'0x[0-9a-f]+ (".*")', value)
            value = s.group(1) if s else re.sub(r"^\(.*?\) | <\w+>$", "", value)
            got[e] = _pointer(value.replace(" ", "") if value.startswith("{") else value)
        hits.append(got)
    return hits


def _pointer(value: str) -> str:
    """A pointer's value as compared: ASLR moves it between runs."""
    return "0x..." if re.fullmatch(r"0x[0-9a-f]*[1-9a-f][0-9a-f]*", value) else value


def _ours(engine: str, exe: Path) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    probe = f"{exe}:{PROBE}"
    out, err = io.StringIO(), io.StringIO()
    assert main(["trace", "-e", engine, probe, "--", str(exe)], out=out, err=err) == 0, \
        err.getvalue()
    lines = [ln for ln in out.getvalue().splitlines() if " look: " in ln]
    text = [{k: _pointer(v) for k, v in re.findall(r' (\w+)=("[^"]*"|\{[^}]*\}|\S+)', ln)}
            for ln in lines]
    out = io.StringIO()
    assert main(["trace", "-e", engine, "--json", probe, "--", str(exe)], out=out) == 0
    docs = [json.loads(ln)["args"] for ln in out.getvalue().splitlines() if '"probe"' in ln]
    return text, docs


@pytest.mark.root
@pytest.mark.parametrize("level", ["-O0", "-O2"])
@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_unreadable_memory_prints_fault_as_gdb(compile_c: Compiler, engine: str,
                                               level: str) -> None:
    need(shutil.which("gdb") is not None, "gdb")
    if engine == "kernel":
        need(Path("/sys/kernel/tracing/uprobe_events").exists(), "tracefs")
    exe = compile_c("dwarf_faults.c", level)
    (resolved,) = Resolver().resolve_all(parse_specs([f"{exe}:{PROBE}"]))
    text, docs = _ours(engine, exe)
    assert [t["n"] for t in text] == ["1", "2", "3", "4"]
    for ours, gdb, doc in zip(text, _gdb(exe, resolved.symbol_offset), docs):
        for name, expr in EXPRS.items():
            assert ours[name] == gdb[expr], (engine, level, ours["n"], name, ours[name], gdb[expr])
            assert (doc[name] is None) == (gdb[expr] == "(fault)"), (name, doc)
        assert not any(k.startswith("__guard") for k in (*ours, *doc))
    # the first node: its own fields read, what its pointers point to does not
    assert (text[0]["p_id"], text[0]["p_in_x"], text[0]["p_name"]) == ("1", "(fault)", "(fault)")
    assert text[0]["p_next_in_y"] == "-6"
    assert all(v == "(fault)" for t in text[1:3] for k, v in t.items() if k != "n")
    # values at a mapping's end, no 0 byte before it, are read
    assert (text[3]["p_in_x"], text[3]["p_next_in_y"]) == ("286331153", "-6")


@pytest.mark.root
@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_session_events_show_dwarf_values_as_json_does(compile_c: Compiler, engine: str) -> None:
    """A Session's events have the user's names only (no hidden guard
    fetches) and None for a value that faulted, as `--json` has them."""
    if engine == "kernel":
        need(Path("/sys/kernel/tracing/uprobe_events").exists(), "tracefs")
    import uprobes
    exe = compile_c("dwarf_faults.c", "-O2")
    seen: list[uprobes.Event] = []
    s = uprobes.Session(engine=engine)
    s.probe(f"{exe}:{PROBE}", seen.append)
    assert s.spawn([str(exe)]) == 0
    _, docs = _ours(engine, exe)
    norm = [{k: _pointer(hex(v)) if k in ("p_deref_in", "p_deref_next") and v else v
             for k, v in args.items()} for args in (*(ev.args for ev in seen), *docs)]
    assert norm[:HITS] == norm[HITS:]
    assert [a["n"] for a in norm[:HITS]] == [1, 2, 3, 4]
    assert (norm[0]["p_id"], norm[0]["p_in_x"], norm[0]["p_name"]) == (1, None, None)
    assert all(v is None for a in norm[1:3] for k, v in a.items() if k != "n")
    assert (norm[3]["p_in_x"], norm[3]["p_next_in_y"]) == (0x11111111, -6)


def _count_by(engine: str, exe: Path, *argv: str) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    assert main(["count", "-e", engine, "--json", *argv, "--", str(exe)], out=out, err=err) \
        == 0, err.getvalue()
    doc: dict[str, object] = json.loads(out.getvalue().splitlines()[-1])
    return doc


@pytest.mark.root
@pytest.mark.parametrize("level", ["-O0", "-O2"])
def test_count_by_a_dwarf_value_counts_from_events(compile_c: Compiler, level: str) -> None:
    """`count --by` a DWARF field chain (read through pointers, which the
    program's code cannot read) or parameter counts from events: keys by
    the value, `(fault)` where it could not be read, the same on both
    engines; `--value` leaves a value that faulted out of the sum."""
    need(Path("/sys/kernel/tracing/uprobe_events").exists(), "tracefs")
    exe = compile_c("dwarf_faults.c", level)
    chain = ["--by", "p_next_in_y", "--value", "p_id", f"{exe}:look p->next->in->y p->id"]
    param = ["--by", "n", f"{exe}:look n"]  # at -O0 in look's frame, off %rbp
    cases: list[tuple[list[str], list[dict[str, object]]]] = [
        (chain, [{"key": "(fault)", "count": 2, "sum": 0, "min": None, "max": None,
                  "avg": 0.0},
                 {"key": -6, "count": 2, "sum": 5, "min": 1, "max": 4, "avg": 2.5}])]
    if level == "-O0":  # at -O2 n is a register, counted in the program (where look is
        # too short for a jump)
        cases.append((param, [{"key": k, "count": 1} for k in (1, 2, 3, 4)]))
    for argv, want in cases:
        docs = [_count_by(engine, exe, *argv) for engine in ("kernel", "ptrace")]
        assert docs[0] == docs[1], docs
        keys = docs[0]["uprobes/look"]
        assert isinstance(keys, dict) and keys["keys"] == want, keys


@pytest.mark.root
@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_a_string_too_long_for_the_record_leaves_the_guards_on(compile_c: Compiler,
                                                               engine: str) -> None:
    """`big` (a `char *` to 5999 bytes) takes all of a record's 4096 bytes of
    strings: the guards, and their witness, go before it in the record, so
    `p->in->x` still prints `(fault)` where it cannot be read (it printed 0:
    the witness was cut, which turned the guards off)."""
    if engine == "kernel":
        need(Path("/sys/kernel/tracing/uprobe_events").exists(), "tracefs")
    exe = compile_c("dwarf_faults.c", "-O2")
    out, err = io.StringIO(), io.StringIO()
    assert main(["trace", "-e", engine, f"{exe}:look big p->in->x n", "--", str(exe)],
                out=out, err=err) == 0, err.getvalue()
    got = re.findall(r" p_in_x=(\S+) n=(\d+)$", out.getvalue(), re.M)
    assert got == [("(fault)", "1"), ("(fault)", "2"), ("(fault)", "3"), ("286331153", "4")]
