"""Jump patches in functions that dispatch by computed gotos (an interpreter
loop, as CPython's eval loop is): fileplan.py takes their targets from the
file (the addresses its data holds, relocated in a PIE, in place in a
non-PIE executable or a RELR-packed one) and refuses a patch that would
cover one, and still refuses jumps whose targets the file does not hold: a
switch table's relative offsets, an address computed by arithmetic. Oracles: the labels' addresses
from the DWARF (gcc's DW_TAG_label), and the program's own counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler
from elftools.elf.elffile import ELFFile

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.trapfree.fileplan import FilePlan, plan_for

LABELS = ("op_inc", "op_double", "op_dec", "op_end", "op_half")
BUILDS = {"pie": ("-O2",), "no-pie": ("-O2", "-no-pie"),
          "relr": ("-O2", "-Wl,-z,pack-relative-relocs"), "shared-dispatch": ("-O1",)}
"""RELR: a PIE whose relative relocations are packed, their addends left
in place, as this machine's libc.so.6 is. -O1: each label loads the next
address and jumps to one `jmp rcx` they share, as CPython's eval loop does
in places."""


@pytest.fixture(scope="module", params=list(BUILDS))
def exe(request: pytest.FixtureRequest, compile_c: Compiler) -> Path:
    return compile_c("computed_goto.c", *BUILDS[request.param])


def _labels(path: Path) -> dict[str, int]:
    """The labels' link addresses, as the DWARF gives them."""
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        for cu in ELFFile(f).get_dwarf_info().iter_CUs():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_label" and "DW_AT_low_pc" in die.attributes:
                    found[die.attributes["DW_AT_name"].value.decode()] = \
                        die.attributes["DW_AT_low_pc"].value
    return found


def _plan(path: Path, link: int, tables: tuple[int, ...] = ()) -> FilePlan | str:
    st = os.stat(path)
    image = ElfImage.open(str(path))
    return plan_for(str(path), st.st_dev, st.st_ino, image.link_to_file_offset(link),
                    tables=tables)


def _table(path: Path) -> int:
    """run_goto's table of label addresses (a local symbol: `table.0`)."""
    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return next(s["st_value"] for s in symtab.iter_symbols()  # type: ignore[union-attr]
                    if s.name.startswith("table."))


def _symbol(path: Path, name: str) -> int:
    return SymbolTable.load(ElfImage.open(str(path))).lookup(name)[0].link_addr


def test_a_label_of_a_computed_goto_takes_a_jump(exe: Path) -> None:
    """With the table known (as resolution knows CPython's), every label
    takes a jump; without it, a table base the code keeps in a register
    across the function is not proven, and nothing is patched."""
    labels = _labels(exe)
    assert set(LABELS) <= set(labels), labels
    for name in LABELS:
        assert isinstance(_plan(exe, labels[name], (_table(exe),)), FilePlan), name
    unproven = _plan(exe, labels["op_inc"])
    assert isinstance(unproven, FilePlan) or "not known where it is loaded" in unproven


def test_a_target_only_a_table_names_is_never_covered(exe: Path) -> None:
    at = _symbol(exe, "asm_goto")
    image = ElfImage.open(str(exe))
    assert image.read_link(at + 0x16, 7) == bytes.fromhex("48ffc0" "4883c001")  # inc; add
    plan = _plan(exe, at + 0x16)
    assert isinstance(plan, str) and "a branch targets asm_goto+0x19" in plan, plan
    assert isinstance(_plan(exe, at + 0x19), FilePlan)


@pytest.mark.parametrize("function", ["run_switch", "asm_computed"])
def test_unknown_targets_are_still_refused(exe: Path, function: str) -> None:
    """A switch table's relative offsets, an address computed by adding to a
    label's: where the jump lands is not in the file, so no patch in it."""
    plan = _plan(exe, _symbol(exe, function))
    assert isinstance(plan, str) and "indirect jump" in plan, plan


def test_counts_at_the_labels_are_the_programs_own(exe: Path) -> None:
    labels = _labels(exe)
    image = ElfImage.open(str(exe))
    where = {n: labels[n] for n in LABELS} | {"asm_goto_mid": _symbol(exe, "asm_goto") + 0x19}
    specs = [f"p:cg/{n} {exe}:{image.link_to_file_offset(at):#x}" for n, at in where.items()]
    run = subprocess.run([sys.executable, "-m", "uprobes", "count", "-e", "ptrace", "--json",
                          *specs, "--", str(exe), "1000"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    plain = subprocess.run([str(exe), "1000"], capture_output=True, text=True, check=True)
    assert run.stdout.splitlines()[0] == plain.stdout.strip()  # the same results
    own = dict(zip(LABELS, (int(w) for w in plain.stdout.split()[1:6])))
    counts = json.loads(run.stdout.splitlines()[-1])
    # every call passes asm_goto+0x19: by the table or through the inc before it
    assert counts == {f"cg/{n}": c for n, c in (own | {"asm_goto_mid": 1000}).items()}, \
        run.stderr
    # (its table is in the code, in read-only data: proven; run_goto's labels
    # take jumps where the build loads its table's address right before)
    assert "cg/asm_goto_mid:" not in run.stderr and "probes trap-free" in run.stderr
