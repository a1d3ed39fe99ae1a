"""Filters compiled into the counting code: `count --if/--tid` with no record per hit.

A counting probe with a filter used to record every hit into a ring for
uprobes to test in Python. When every test of the filter (`HitFilter.combined`)
compares a number the program's code can read (the thread's tid, a
fetcharg that is a register or a stack word) with a constant, the jump's
code tests it itself: `&&`, `||` and `!` become branches, a comparison a
`cmp` (signed or not, as the fetcharg's type says) or a `test` for `&`, and
only a hit that passes does the `lock inc` of its counter. A hit that fails
costs the compare and nothing else. What cannot be compiled (`pid`,
strings, memory behind a pointer) keeps the recording path.

`comm == "NAME"` (and `--comm`) asks the kernel for the thread's name
(`prctl(PR_GET_NAME)`, 16 bytes padded with NULs) and compares the 16
bytes with the name's. Any thread of the process may rename any other at
any time (`prctl(PR_SET_NAME)`, a `write` to /proc/PID/task/TID/comm), and
no code of ours runs then: a verdict is kept per thread (CommCache) only
while a word the kernel moves at each rename stays put (renames.py,
docs/filters.md); without it, each hit asks. A system call is dearer than
a compare, so the operands of `&&` and `||` are tested cheapest first: a
hit the other tests already decide makes none.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import count
from typing import Any

from iced_x86 import Code, Instruction
from iced_x86 import Register as R

from uprobes.engines.trapfree.keyed import TID, Source, load
from uprobes.engines.trapfree.layout import COUNTER_TLS, COUNTER_UNNAMED, NO_KEPT_VERDICTS
from uprobes.engines.trapfree.timing import (
    COMM_BYTES,
    NR_PRCTL,
    PR_GET_NAME,
    _Asm,
    _enter,
    _leave,
    _locked_inc,
    _mem,
    _tid,
    comm_into,
)
from uprobes.lang.condition import Compare, Logic, Node, Not
from uprobes.sys import seccomp

_U64 = (1 << 64) - 1
_JUMPS = {  # op -> (signed jcc, unsigned jcc) taken when the comparison holds
    "==": (Code.JE_REL32_64, Code.JE_REL32_64), "!=": (Code.JNE_REL32_64, Code.JNE_REL32_64),
    "<": (Code.JL_REL32_64, Code.JB_REL32_64), "<=": (Code.JLE_REL32_64, Code.JBE_REL32_64),
    ">": (Code.JG_REL32_64, Code.JA_REL32_64), ">=": (Code.JGE_REL32_64, Code.JAE_REL32_64),
    "&": (Code.JNE_REL32_64, Code.JNE_REL32_64),
}


@dataclass(frozen=True)
class CommCache:
    """Where a name test keeps its verdicts (renames.py): the address of
    the rename word in the process, and per `comm` comparison of the check
    (in `comm_tests` order) a table of COMM_SLOTS verdicts, 8 bytes each."""

    word: int
    tables: tuple[int, ...]


COMM_SLOTS = 64  # a power of two: threads whose tids share a slot ask the kernel more often
COMM_TABLE_BYTES = 8 * COMM_SLOTS


@dataclass(frozen=True)
class Check:
    """A filter the code can test: its tree, where each field it names is,
    and (once placed, if the kernel moves a rename word) its name cache."""

    root: Node
    sources: tuple[tuple[str, Source], ...]
    cache: CommCache | None = None
    seal: int = 0  # the seccomp word guarding its prctl (timing.comm_into), 0: none


def comm_tests(node: Node) -> list[Compare]:
    """The `comm` comparisons of `node`, in the order CommCache.tables follows."""
    if isinstance(node, Compare):
        return [node] if node.field == "comm" else []
    if isinstance(node, Not):
        return comm_tests(node.operand)
    return [c for n in node.operands for c in comm_tests(n)]


def compile_check(root: Node, source: Callable[[str], Source | str]) -> Check | str:
    """`root` as code can test it, `source(field)` saying where a fetcharg
    is (or why it cannot be read there); else why not."""
    found: dict[str, Source] = {}
    stack: list[Node] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Logic):
            stack.extend(node.operands)
        elif isinstance(node, Not):
            stack.append(node.operand)
        elif node.field == "comm":
            why = _comm_why_not(node)
            if why is not None:
                return why
        else:
            if not isinstance(node.value, int) or node.op not in _JUMPS:
                return f"{node.field} {node.op} {node.value!r} is not a number's comparison"
            if node.field == "pid":
                return f"{node.field} is not known to the program's code"
            where = TID if node.field == "tid" else source(node.field)
            if isinstance(where, str):
                return where
            found[node.field] = where
    return Check(root, tuple(sorted(found.items(), key=lambda kv: kv[0])))


def counting_prologue(at: int, counter: int, block: int, check: Check) -> bytes:
    """The counting code for a trampoline at `at`: the counter at `counter`
    goes up only when `check` holds (the counter block at `block` holds the
    tid's TLS flag and the count of hits whose name could not be read)."""
    a = _Asm()
    frame = _enter(a)
    _emit_check(a, check, "pass", frame, block, COUNTER_TLS, block + COUNTER_UNNAMED)
    a.label("pass")
    a(_locked_inc(counter))
    _leave(a)
    return a.encode(at)


def guard(check: Check, block: int, flag: int, unnamed: int,
          no: str = "done") -> Callable[[_Asm, int], None]:
    """`check` as a part of other code (keyed.py's and timing.py's
    `guard`): a hit it fails goes to `no`, one it keeps goes on; `flag`:
    where in the block at `block` the tid's TLS flag is; `unnamed`: the
    address of the count of hits whose name could not be read."""
    def emit(a: _Asm, frame: int) -> None:
        _emit_check(a, check, "kept", frame, block, flag, unnamed, no)
        a.label("kept")
    return emit


_NAME = 16  # the frame's name: 16 bytes, then whether they were read,
_WORD = 24  # then the rename word as the hit found it (CommCache)
_NAME_BYTES = COMM_BYTES + 16


def _emit_check(a: _Asm, check: Check, yes: str, frame: int, block: int, flag: int,
                unnamed: int, no: str = "done") -> None:
    """Branch to `yes` when `check` holds, else to `no`. With a name
    test, the thread's name is asked for once per hit, at the first test
    that needs it, into the frame; a hit whose name cannot be read (a
    seccomp filter fails the call) is decided neither way: it bumps the
    count at `unnamed` and goes to `no`."""
    i = Instruction
    a.seal = check.seal
    sources, labels = dict(check.sources), count()
    if not _names_comm(check.root):
        _emit(a, check.root, yes, no, sources, frame, block, labels, flag)
        return
    held, dropped, lost = a.fresh("named"), a.fresh("unnamed_no"), a.fresh("unnamed")
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, -_NAME_BYTES)),
      i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RSP, _NAME), 0))
    tables: dict[int, int] = {}
    if check.cache is not None:
        # The word before any name is read: a rename that ends after the
        # read moves it after its copy, so a verdict kept under it is redone.
        a(i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, check.cache.word),
          i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RAX)),
          i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RSP, _WORD), R.RAX))
        tables = {id(n): t for n, t in zip(comm_tests(check.root), check.cache.tables)}
    _emit(a, check.root, held, dropped, sources, frame + _NAME_BYTES, block, labels, flag,
          lost, tables)
    a.label(lost)
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, _NAME_BYTES)), _locked_inc(unnamed))
    a.jump(Code.JMP_REL32_64, no)
    a.label(dropped)
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, _NAME_BYTES)))
    a.jump(Code.JMP_REL32_64, no)
    a.label(held)
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, _NAME_BYTES)))
    a.jump(Code.JMP_REL32_64, yes)


def _emit(a: _Asm, node: Node, yes: str, no: str, sources: dict[str, Source], frame: int,
          block: int, labels: Any, flag: int, lost: str = "",
          tables: dict[int, int] | None = None) -> None:
    """Branch to `yes` when `node` holds, else to `no` (to `lost` when a
    name test cannot read the name: `_emit_check`'s frame; `tables`: the
    verdict table of each name test, by id, if kept)."""
    i = Instruction
    if isinstance(node, Not):
        _emit(a, node.operand, no, yes, sources, frame, block, labels, flag, lost, tables)
        return
    if isinstance(node, Logic):
        operands = sorted(node.operands, key=_names_comm)  # the system calls last
        for n, operand in enumerate(operands):
            if n == len(operands) - 1:
                _emit(a, operand, yes, no, sources, frame, block, labels, flag, lost, tables)
                continue
            nxt = f"l{next(labels)}"
            if node.op == "&&":
                _emit(a, operand, nxt, no, sources, frame, block, labels, flag, lost, tables)
            else:
                _emit(a, operand, yes, nxt, sources, frame, block, labels, flag, lost, tables)
            a.label(nxt)
        return
    assert isinstance(node, Compare)
    if node.field == "comm":
        assert isinstance(node.value, str)
        table = (tables or {}).get(id(node))
        if table is None:
            _comm_equals(a, node.value, lost)
        else:
            _kept_comm_equals(a, node.value, lost, table, block, flag)
        a.jump(Code.JE_REL32_64 if node.op == "==" else Code.JNE_REL32_64, yes)
        a.jump(Code.JMP_REL32_64, no)
        return
    assert isinstance(node.value, int)
    src = sources[node.field]
    load(a, src, R.RSI, frame, block, flag)
    a(i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, node.value & _U64))
    a(i.create_reg_reg(Code.TEST_RM64_R64, R.RSI, R.RAX) if node.op == "&"
      else i.create_reg_reg(Code.CMP_R64_RM64, R.RSI, R.RAX))
    signed_jump, unsigned_jump = _JUMPS[node.op]
    a.jump(signed_jump if src.signed else unsigned_jump, yes)
    a.jump(Code.JMP_REL32_64, no)


def seccomp_refusal(check: Check | None, tids: Iterable[int]) -> str | None:
    """Why `check` (None: code keyed by the thread's name) must not run in
    threads `tids` (each in a ptrace stop of ours): it asks for the
    thread's name and a thread's seccomp state would not let that call
    come back; else None. A filter installed later is not seen
    (docs/filters.md)."""
    if check is not None and not _names_comm(check.root):
        return None
    for tid in tids:
        why = seccomp.refusal_anywhere(tid, NR_PRCTL, (PR_GET_NAME,))
        if why is not None:
            return f"thread {tid}: {why}"
    return None


def prologue_size(check: Check) -> int:
    return len(counting_prologue(0x10000000, 0x10100000, 0x10100000, check))


def _comm_why_not(node: Compare) -> str | None:
    if node.op not in ("==", "!=") or not isinstance(node.value, str):
        return (f"comm {node.op} {node.value!r}: only comm == and != a name are tested in "
                "the program (use --comm NAME or comm == \"NAME\")")
    if len(os.fsencode(node.value)) >= COMM_BYTES or "\0" in node.value:
        return (f"comm == {node.value!r}: a thread's name is at most {COMM_BYTES - 1} bytes "
                "(the kernel cuts longer ones: name its first 15)")
    return None


def _names_comm(node: Node) -> bool:
    """Whether testing `node` makes a system call (sorts after those that do not)."""
    if isinstance(node, Compare):
        return node.field == "comm"
    if isinstance(node, Not):
        return _names_comm(node.operand)
    return any(_names_comm(n) for n in node.operands)


def _comm_equals(a: _Asm, name: str, lost: str, extra: int = 0) -> None:
    """ZF = the thread's name is `name`: the name in `_emit_check`'s frame
    (at rsp + `extra`), asked of the kernel the first time (to `lost` if
    the call fails), compared 8 bytes at a time. Clobbers rax, rcx, rdi,
    rsi (every fetcharg is read from where _enter saved it); r11 kept."""
    i = Instruction
    want = os.fsencode(name).ljust(COMM_BYTES, b"\0")
    held, differ = a.fresh("comm_held"), a.fresh("comm_differs")
    a(i.create_mem_i32(Code.CMP_RM64_IMM32, _mem(R.RSP, extra + _NAME), 0))
    a.jump(Code.JNE_REL32_64, held)
    a(i.create_reg(Code.PUSH_R64, R.R11))
    comm_into(a, R.RSP, extra + 8)
    a(i.create_reg(Code.POP_R64, R.R11),
      i.create_reg_reg(Code.TEST_RM32_R32, R.EAX, R.EAX))
    a.jump(Code.JNE_REL32_64, lost)  # no name (a seccomp filter failed the call)
    a(i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RSP, extra + _NAME), 1))
    a.label(held)
    for half in (0, 8):
        a(i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX,
                           int.from_bytes(want[half:half + 8], "little")),
          i.create_reg_mem(Code.CMP_R64_RM64, R.RAX, _mem(R.RSP, extra + half)))
        if half == 0:
            a.jump(Code.JNE_REL32_64, differ)
    a.label(differ)


def _kept_comm_equals(a: _Asm, name: str, lost: str, table: int, block: int,
                      flag: int) -> None:
    """`_comm_equals` through the thread's kept verdict: a slot of `table`
    (by tid) holds tid << 32 | generation (31 bits) << 1 | verdict; it
    answers while no rename is pending and the generation is the one in
    the frame's word (read before any name, `_emit_check`). Else the name
    is asked and compared, and the verdict kept under that generation.
    While a rename is pending, nothing is kept; nor once the tracer set the
    byte after the tid flag (NO_KEPT_VERDICTS: the family has processes in
    two pid namespaces, whose tids may be the same). Same clobbers."""
    i = Instruction
    asked, miss, done, dropped = (a.fresh(n) for n in ("comm_asked", "comm_miss",
                                                       "comm_kept", "comm_lost"))
    a(i.create_mem_i32(Code.CMP_RM32_IMM32, _mem(R.RSP, _WORD), 0))
    a.jump(Code.JNE_REL32_64, asked)  # a rename under way: ask, keep nothing
    a(i.create_mem_i32(Code.CMP_RM8_IMM8, _mem(R.RIP, block + flag + NO_KEPT_VERDICTS), 0))
    a.jump(Code.JNE_REL32_64, asked)  # a family across pid namespaces: tids are not unique
    _tid(a, block, flag)  # esi (clobbers rax, rcx)
    a(i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSP, _WORD)),
      i.create_reg_i32(Code.SHR_RM64_IMM8, R.RAX, 32),
      i.create_reg_i32(Code.AND_RM32_IMM32, R.EAX, 0x7FFFFFFF),
      i.create_reg_reg(Code.MOV_R32_RM32, R.EDI, R.ESI),
      i.create_reg_i32(Code.AND_RM32_IMM32, R.EDI, COMM_SLOTS - 1),
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RSI, 31),
      i.create_reg_reg(Code.OR_R64_RM64, R.RSI, R.RAX),  # the key: tid, generation
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RDI, 3),
      i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, table),
      i.create_reg_reg(Code.ADD_R64_RM64, R.RDI, R.RAX),  # the slot's address
      i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RDI)),
      i.create_reg_reg(Code.MOV_R64_RM64, R.RCX, R.RAX),
      i.create_reg_i32(Code.SHR_RM64_IMM8, R.RCX, 1),
      i.create_reg_reg(Code.CMP_R64_RM64, R.RCX, R.RSI))
    a.jump(Code.JNE_REL32_64, miss)
    a(i.create_reg_i32(Code.AND_RM32_IMM32, R.EAX, 1),
      i.create_reg_i32(Code.CMP_RM32_IMM8, R.EAX, 1))  # ZF = the kept verdict
    a.jump(Code.JMP_REL32_64, done)
    a.label(miss)
    a(i.create_reg(Code.PUSH_R64, R.RSI), i.create_reg(Code.PUSH_R64, R.RDI))
    _comm_equals(a, name, dropped, 16)
    a(i.create_reg(Code.POP_R64, R.RDI), i.create_reg(Code.POP_R64, R.RSI),
      i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, 0),  # (the flags kept)
      i.create_reg(Code.SETE_RM8, R.AL),
      i.create_reg_i32(Code.SHL_RM64_IMM8, R.RSI, 1),
      i.create_reg_reg(Code.OR_R64_RM64, R.RSI, R.RAX),
      i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RDI), R.RSI),
      i.create_reg_i32(Code.CMP_RM32_IMM8, R.EAX, 1))
    a.jump(Code.JMP_REL32_64, done)
    a.label(dropped)
    a(i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, 16)))
    a.jump(Code.JMP_REL32_64, lost)
    a.label(asked)
    _comm_equals(a, name, lost)
    a.label(done)
