"""x86-64 instruction facts a probe needs, by linear decoding with iced-x86.

The kernel does not check that a uprobe offset starts an instruction (only
kprobes have that check): an int3 written into the middle of one corrupts the
program.  So an offset inside a function is checked by decoding from the
function's first byte.  The same decode finds a function's `ret`s, where a
return probe can sit without touching the stack (a uretprobe swaps the return
address and breaks C++ unwinding, Go and coroutines).
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Decoder, FlowControl, Formatter, FormatterSyntax, Instruction, Mnemonic

from uprobes.elf._guard import guard
from uprobes.elf.image import ElfImage
from uprobes.elf.symread import Symbol
from uprobes.errors import ResolveError

MAX_INSN_LEN = 15
_formatter = Formatter(FormatterSyntax.GAS)


@dataclass(frozen=True)
class DecodedInsn:
    """One decoded instruction at a file offset."""

    file_offset: int
    link_addr: int
    raw: bytes
    text: str
    instruction: Instruction

    @property
    def length(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class ReturnSites:
    """A function's `ret` instructions, or None with the reason they cannot all be found."""

    file_offsets: tuple[int, ...] | None
    reason: str | None = None


def _function_bytes(image: ElfImage, symbol: Symbol) -> tuple[int, bytes]:
    start = image.link_to_file_offset(symbol.link_addr)
    if not image.is_executable_file_offset(start):
        raise ResolveError(f"{image.path}: {symbol.display_name} at {symbol.link_addr:#x} is not "
                           "in an executable segment")
    return start, image.read_file(start, symbol.size)


def _decoder(data: bytes, link_addr: int) -> Decoder:
    return Decoder(64, data, ip=link_addr)


def _describe(insn: Instruction) -> str:
    return _formatter.format(insn)


def check_boundary(image: ElfImage, symbol: Symbol, file_offset: int) -> None:
    """Raise `ResolveError` unless `file_offset` starts an instruction of `symbol`.

    Decodes linearly from the symbol's first byte; a zero-size symbol is
    decoded up to the target.
    """
    start = image.link_to_file_offset(symbol.link_addr)
    where = f"{image.path}: offset {file_offset:#x}"
    if file_offset == start:
        return
    if file_offset < start or (symbol.size and file_offset >= start + symbol.size):
        raise ResolveError(f"{where} is outside {symbol.display_name} "
                           f"[{start:#x}, {start + symbol.size:#x})")
    if not image.is_executable_file_offset(start):
        raise ResolveError(f"{image.path}: {symbol.display_name} at {symbol.link_addr:#x} is not "
                           "in an executable segment")
    data = image.read_file(start, file_offset - start + MAX_INSN_LEN)
    with guard(image.path, "cannot decode"):
        for insn in _decoder(data, symbol.link_addr):
            here = start + insn.ip - symbol.link_addr
            if insn.is_invalid:
                raise ResolveError(f"{where}: the bytes at {here:#x} in {symbol.display_name} "
                                   "do not decode as x86-64 code, so the boundary is unknown")
            if here + insn.len > file_offset:
                if here == file_offset:
                    return
                raise ResolveError(
                    f"{where} is inside an instruction: {symbol.display_name}+{here - start:#x} "
                    f"at {here:#x} is {insn.len} bytes ({_describe(insn)}); "
                    f"the nearest boundaries are {here:#x} and {here + insn.len:#x}")
    raise ResolveError(f"{where}: decoding {symbol.display_name} stopped before reaching it")


def decode_at(image: ElfImage, file_offset: int) -> DecodedInsn:
    """The instruction starting at `file_offset` (which must be in an executable segment)."""
    if not image.is_executable_file_offset(file_offset):
        raise ResolveError(f"{image.path}: file offset {file_offset:#x} is not in an "
                           "executable segment")
    link_addr = image.file_to_link_addr(file_offset)
    data = image.read_file(file_offset, MAX_INSN_LEN)
    with guard(image.path, "cannot decode"):
        insn = next(iter(_decoder(data, link_addr)), None)
    if insn is None or insn.is_invalid:
        raise ResolveError(f"{image.path}: the bytes at file offset {file_offset:#x} do not "
                           "decode as an x86-64 instruction")
    return DecodedInsn(file_offset, link_addr, data[: insn.len], _describe(insn), insn)


def find_return_sites(image: ElfImage, symbol: Symbol) -> ReturnSites:
    """Every `ret` in `symbol`, or None with why not every exit can be found.

    Gives up (file_offsets None) on a jump that leaves the function (a tail
    call: the callee's `ret` returns for us), an indirect jump (its targets,
    a switch table or a tail call, are unknown), a far return, bytes that
    do not decode, or a symbol without a size.  A function with no exit at
    all (it never returns) gives an empty tuple.
    """
    name = symbol.display_name
    if symbol.size == 0:
        return ReturnSites(None, f"{name} has no size in the symbol table")
    start, data = _function_bytes(image, symbol)
    lo, hi = symbol.link_addr, symbol.link_addr + symbol.size
    rets: list[int] = []
    with guard(image.path, "cannot decode"):
        for insn in _decoder(data, lo):
            at = f"{name}+{insn.ip - lo:#x}"
            if insn.is_invalid:
                return ReturnSites(None, f"{at}: bytes that do not decode as x86-64 code")
            if insn.ip + insn.len > hi:
                return ReturnSites(None, f"{at}: the last instruction runs past the symbol's end")
            flow = insn.flow_control
            if flow == FlowControl.RETURN:
                if insn.mnemonic != Mnemonic.RET:
                    return ReturnSites(None, f"{at}: {_describe(insn)} is not a near ret")
                rets.append(start + insn.ip - lo)
            elif flow in (FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH):
                target = insn.near_branch_target
                if not lo <= target < hi:
                    return ReturnSites(None, f"{at}: tail call ({_describe(insn)}) to "
                                             f"{target:#x}, outside the function")
            elif flow == FlowControl.INDIRECT_BRANCH:
                return ReturnSites(None, f"{at}: indirect jump ({_describe(insn)}) whose "
                                         "targets cannot be followed")
            elif flow == FlowControl.XBEGIN_XABORT_XEND:
                return ReturnSites(None, f"{at}: transactional code ({_describe(insn)})")
    return ReturnSites(tuple(rets), None if rets else f"{name} has no ret (it never returns)")


def return_sites(image: ElfImage, symbol: Symbol) -> list[int] | None:
    """The file offsets of `symbol`'s `ret`s, or None if not every exit can be found."""
    found = find_return_sites(image, symbol)
    return None if found.file_offsets is None else list(found.file_offsets)
