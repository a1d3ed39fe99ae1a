"""resolve/pyeval.py: each CPython build's eval loop, read from its file.

Oracles: the interpreter's own `dis` for the opcode numbers; the DWARF
labels the compiler left on the handlers (`TARGET_RESUME`...) for the
dispatch table's entries; and for the frame register, the RESUME handler's
own read of `frame->f_code` at the offset the build's layout gives. Every
3.11 build on the machine is read: Debian's (non-PIE, its symbols in the
debug file python3.11-dbg installs), Debian's debug build python3.11d, and
pyenv's shared libpython (relocated table) where root's pyenv has one, and
pyenv's 3.12 and 3.13 where they are installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import LATER_CPYTHONS
from elftools.elf.elffile import ELFFile
from iced_x86 import Decoder, OpKind

from uprobes.elf.image import ElfImage
from uprobes.errors import ResolveError
from uprobes.resolve.pydwarf import debug_file_for
from uprobes.resolve.pyeval import find_eval_loop
from uprobes.resolve.pyexits import eval_labels
from uprobes.resolve.pylayout import layout_for
from uprobes.resolve.pyversions import OPCODES, minor

PYENV = Path("/root/.pyenv/versions/3.11.7")
BUILDS = [("/usr/bin/python3.11", "/usr/bin/python3.11"),
          ("/usr/bin/python3.11d", "/usr/bin/python3.11d")]
if os.access(PYENV / "lib/libpython3.11.so.1.0", os.R_OK):
    BUILDS.append((str(PYENV / "lib/libpython3.11.so.1.0"), str(PYENV / "bin/python3.11")))
for _program in LATER_CPYTHONS:
    _prefix, _name = Path(_program).parent.parent, Path(_program).name
    BUILDS.append((str(_prefix / "lib" / f"lib{_name}.so.1.0"), _program))


def _interpreter(program: str, code: str) -> str:
    return subprocess.run([program, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True).stdout


@pytest.mark.parametrize(("path", "program"), BUILDS, ids=[Path(p).name for p, _ in BUILDS])
def test_the_eval_loop_of_each_build(path: str, program: str) -> None:
    got = _interpreter(program, "import dis, sys; print(sys.hexversion, *(f'{n}={o}' "
                       "for n, o in dis._all_opmap.items()))").split()
    hexversion = int(got[0])
    opcodes = OPCODES[minor(hexversion)]
    own = dict(x.split("=") for x in got[1:])
    assert {n: int(own[n]) for n in opcodes} == opcodes
    with ElfImage.open(path) as image:
        debug = debug_file_for(path, image.build_id)
        assert debug is not None, f"{path} has no DWARF (bootstrap installs python3.11-dbg)"
        evals = _eval_address(debug)
        layout = layout_for(image, path, hexversion, evals)
        loop = find_eval_loop(image, debug, layout.frame_prev_instr, minor(hexversion),
                              layout.tuple_items)
        labels = eval_labels(debug, loop.function)
        for name, addr in loop.handlers.items():
            assert labels[f"TARGET_{name}"] == addr, name
        # A handler where calls start (RESUME; 3.13's RESUME_CHECK) reads
        # frame->f_code through the frame register, early on.
        reads = [(i.memory_base, i.memory_displacement) for name in loop.entries
                 for i in list(Decoder(64, image.read_link(loop.handlers[name], 64)))[:8]
                 if i.op_count == 2 and i.op1_kind == OpKind.MEMORY]
        assert any(disp == layout.frame_code and _name(base) == loop.frame
                   for base, disp in reads), (loop, reads)
        assert len({loop.frame, loop.next_instr, loop.stack}) == 3
        # RETURN_VALUE pops the return value: it reads [stack - 8] early (a
        # debug build checks the stack's depth first).
        code = image.read_link(loop.handlers["RETURN_VALUE"], 200)
        pops = [(i.memory_base, i.memory_displacement) for i in list(Decoder(64, code))[:16]
                if i.op_count == 2 and i.op1_kind == OpKind.MEMORY]
        assert any(disp == (1 << 64) - 8 and _name(base) == loop.stack
                   for base, disp in pops), (loop, pops)


def _eval_address(debug: str) -> int:
    with open(debug, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return next(s["st_value"] for s in symtab.iter_symbols()
                    if s.name == "_PyEval_EvalFrameDefault" and s["st_value"])


def _name(register: Any) -> str:
    from uprobes.resolve.pyeval import _KERNEL_NAMES
    return _KERNEL_NAMES.get(register, "?")


def test_a_binary_that_is_not_python_is_one_line() -> None:
    with ElfImage.open("/bin/true") as image, pytest.raises(ResolveError,
                                                            match="no _PyEval_EvalFrameDefault"):
        find_eval_loop(image, "/bin/true", 0x38)
