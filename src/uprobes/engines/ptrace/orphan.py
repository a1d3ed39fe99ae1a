"""Orphaned int3s: the traced program survives a `kill -9` of uprobes.

When uprobes dies by SIGKILL the kernel detaches its tracees with our int3s
still in their text; untraced, the next thread to reach one would die of
SIGTRAP. Two things prevent it:

- **In each traced process, a SIGTRAP handler of ours** (machine code we
  write into an "orphan area" that an injected `mmap` maps next to the
  first XOL area, installed by an injected `rt_sigaction`). While the
  tracer lives it changes nothing: ptrace stops every SIGTRAP at its
  delivery and the tracer suppresses ours. Once the tracer is gone, our
  int3 reaches the handler, which finds the trap address (the ucontext's
  rip - 1) in a hash table in the same area and sets rip to that probe's
  slot (relocate.py gives every probe runnable slot code), so the program
  runs on as if there were no probe. A SIGTRAP that is not ours (si_code
  not SI_KERNEL, as from raise() or kill; or an int3 not in the table) is
  what it would be untraced: the handler restores SIG_DFL and queues the
  same signal with the same siginfo to its own thread, which the default
  action then takes when the handler returns (a core, the same status).
  A SI_KERNEL SIGTRAP whose rip - 1 is neither in the table nor an int3 is
  the stop of a tracer that died between moving rip (an emulated
  instruction, a return) and resuming: the work is done, the handler
  returns (the tracer peeks at stops without consuming them, so such a
  stop still carries its SIGTRAP: see ptrace.peek_any). So does a
  dead tracer's single-step stop (at an exec, after each remote call, a
  stepped slot), whose SIGTRAP is TRAP_BRKPT or TRAP_TRACE: the kernel
  cleared the step's TF before the signal frame was saved, so with no TF
  there the handler returns and the thread runs on; a TF in the frame is
  the program's own stepping, which gets what it would untraced. A program that
  handles or ignores SIGTRAP itself keeps its disposition: no handler is
  installed, one note says so, and only the reaper protects it.
- **A reaper** (uprobes.engines.reaper: a watcher process on a pipe, orphan_reaper.py): the
  tracer tells it every int3 as it places it (pid, address, original byte)
  and which processes come and go; when the tracer dies it writes the
  original bytes back through /proc/PID/mem (a one-byte write: a thread
  executing there sees the int3, hence the handler and the slot, or the
  original byte), after checking the process is the same one (its start
  time, our orphan area still mapped: no exec meanwhile) and that our int3
  is still there. USDT semaphores we raised are lowered the same way.

- **Returns hijacked by the trampoline** (`--uretprobe`, or a function
  whose exits cannot be found): each trampoline is in the table with slot
  0; a trap there makes the handler look the thread's real return address
  up in the process's return table (rettable.py, mapped with the area
  where such probes exist) and resume there.

- **Injected system calls** (xol.remote_syscall): a thread whose tracer
  dies inside one resumes with the call's registers. Once the area is
  mapped, calls run at its own `syscall`, followed by a landing that loads
  the registers the tracer saved in the area before the call (xol.LandedSyscall).

Not covered: a thread that blocks SIGTRAP (the kernel then resets the
handler to SIG_DFL for an int3 or a single-step: glibc blocks every signal
around the clone of pthread_create), and the two `mmap`s that map a
process's XOL and orphan areas (before the landing exists).
"""

from __future__ import annotations

import functools
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register

from uprobes.engines import reaper
from uprobes.engines.ptrace import rettable
from uprobes.engines.tracee.xol import LANDING_REGS, LANDING_SIZE, LandedSyscall, remote_syscall
from uprobes.errors import UprobesError
from uprobes.sys import ptrace

if TYPE_CHECKING:
    from uprobes.engines.ptrace.breakpoints import Site
    from uprobes.engines.ptrace.tasks import AddressSpace, Thread

# The orphan area: handler code, the sigaction to install, then the table.
ACT_OFF = 0x800          # struct kernel_sigaction {handler, flags, restorer, mask}
SIG_DFL_OFF = 0x840      # 32 zero bytes: the SIG_DFL action the handler restores
RETURNS_OFF = 0x860      # the return table's address (rettable.py), 0: none
NAME_OFF = 0x880         # the return table's memfd name
LANDING_OFF = 0x900      # the registers a thread leaves an injected call with (xol.py)
TABLE_OFF = 0x1000
TABLE_BITS = 15          # 32,768 entries of (trap address, slot address): 512 KiB
TABLE_ENTRIES = 1 << TABLE_BITS
TABLE_MAX = TABLE_ENTRIES // 2  # kept at most half full: short probe runs
AREA_SIZE = TABLE_OFF + 16 * TABLE_ENTRIES  # untouched pages cost no memory
_HASH = 0x9E3779B97F4A7C15  # Fibonacci hashing: (addr * _HASH) >> (64 - TABLE_BITS)
_NOP_BYTE = 0x90

_SI_KERNEL = 0x80
_SA_SIGINFO, _SA_RESTART, _SA_RESTORER = 0x4, 0x10000000, 0x04000000
_UC_RIP = 168            # offsetof(ucontext_t, uc_mcontext.rip) on x86-64
_UC_RSP = 160            # offsetof(ucontext_t, uc_mcontext.rsp)
_UC_EFLAGS = 176         # offsetof(ucontext_t, uc_mcontext.eflags)
_EFLAGS_TF = 0x100
_TRAP_BRKPT, _TRAP_TRACE = 1, 2  # a SIGTRAP's si_code after a ptrace single-step
_SI_CODE = 8             # offsetof(siginfo_t, si_code)
_NR_RT_SIGRETURN, _NR_RT_SIGACTION, _NR_GETPID, _NR_GETTID = 15, 13, 39, 186
_NR_RT_TGSIGQUEUEINFO, _NR_MMAP = 297, 9
_PROT_RX, _MAP_PRIVATE_ANON, _MAP_FIXED_NOREPLACE = 0x1 | 0x4, 0x02 | 0x20, 0x100000
_SIGTRAP = int(signal.SIGTRAP)
_ENTRY = struct.Struct("<QQ")


def table_index(trap_addr: int) -> int:
    """Where the handler starts looking for `trap_addr` (linear probing on)."""
    return ((trap_addr * _HASH) & (2**64 - 1)) >> (64 - TABLE_BITS)


@functools.cache
def handler_code() -> tuple[bytes, int, int]:
    """The SIGTRAP handler and its sa_restorer, position-independent (the
    table and the SIG_DFL action are found rip-relative, at the start of the
    area), then the `syscall` of injected calls and its landing: (code,
    offset of the restorer, offset of the `syscall`). The handler is called
    as handler(sig=rdi, info=rsi, uc=rdx) on the kernel's signal frame, all
    signals blocked (sa_mask); every register it changes is restored by
    rt_sigreturn from the frame, except rip in the ucontext, which is the
    point.

    While uprobes lives, an injected call stops right after its `syscall`
    (a single-step) and the tracer gives the thread its registers back.
    A thread whose tracer died inside the call runs on from there instead,
    with the call's registers: the landing loads the registers saved at
    LANDING_OFF (xol.LandedSyscall) and jumps to the saved rip. The flags
    go through the thread's own stack, below its red zone, as a signal
    frame would."""
    base = 0
    r, m = Register, MemoryOperand
    saved = {name: base + LANDING_OFF + 8 * i for i, name in enumerate(LANDING_REGS)}
    gprs = {name: getattr(r, name.upper()) for name in LANDING_REGS
            if name not in ("rsp", "rip", "eflags")}
    I = Instruction  # noqa: E741
    prog: list[Instruction | str | tuple[str, str]] = [
        # An int3 gives SIGTRAP with si_code SI_KERNEL; raise(), kill() do not.
        I.create_mem_i32(Code.CMP_RM32_IMM32, m(r.RSI, displ=_SI_CODE), _SI_KERNEL),
        ("jne", "stepped"),
        I.create_reg_mem(Code.MOV_R64_RM64, r.R8, m(r.RDX, displ=_UC_RIP)),
        I.create_reg_mem(Code.LEA_R64_M, r.R9, m(r.R8, displ=-1)),  # trap addr
        I.create_reg_reg(Code.MOV_R64_RM64, r.RAX, r.R9),
        I.create_reg_u64(Code.MOV_R64_IMM64, r.RCX, _HASH),
        I.create_reg_reg(Code.IMUL_R64_RM64, r.RAX, r.RCX),
        I.create_reg_i32(Code.SHR_RM64_IMM8, r.RAX, 64 - TABLE_BITS),
        I.create_reg_mem(Code.LEA_R64_M, r.R10, m(r.RIP, displ=base + TABLE_OFF)),
        # At most every entry once (the program can write the table, if not as data).
        I.create_reg_u32(Code.MOV_R32_IMM32, r.R12D, TABLE_ENTRIES),
        "probe",  # rax: index; an entry is (trap address, slot address), 0: empty
        I.create_reg_reg(Code.MOV_R64_RM64, r.RCX, r.RAX),
        I.create_reg_i32(Code.SHL_RM64_IMM8, r.RCX, 4),
        I.create_reg_mem(Code.MOV_R64_RM64, r.R11, m(r.R10, r.RCX)),
        I.create_reg_reg(Code.CMP_RM64_R64, r.R11, r.R9),
        ("je", "found"),
        I.create_reg_reg(Code.TEST_RM64_R64, r.R11, r.R11),
        ("je", "missing"),
        I.create_reg_i32(Code.SUB_RM32_IMM8, r.R12D, 1),
        ("je", "foreign"),
        I.create_reg_i32(Code.ADD_RM32_IMM8, r.EAX, 1),
        I.create_reg_i32(Code.AND_RM32_IMM32, r.EAX, TABLE_ENTRIES - 1),
        ("jmp", "probe"),
        "found",  # ours: resume in the probe's slot
        I.create_reg_mem(Code.MOV_R64_RM64, r.R11, m(r.R10, r.RCX, displ=8)),
        I.create_reg_reg(Code.TEST_RM64_R64, r.R11, r.R11),
        ("je", "returned"),
        I.create_mem_reg(Code.MOV_RM64_R64, m(r.RDX, displ=_UC_RIP), r.R11),
        I.create(Code.RETNQ),
        "returned",  # slot 0: a trampoline; the real return address from the return table
        I.create_reg_mem(Code.MOV_R64_RM64, r.R9, m(r.RIP, displ=base + RETURNS_OFF)),
        I.create_reg_reg(Code.TEST_RM64_R64, r.R9, r.R9),
        ("je", "foreign"),
        I.create_reg_u32(Code.MOV_R32_IMM32, r.EAX, _NR_GETTID),
        I.create(Code.SYSCALL),  # rax: tid; rdx, rsi, rdi kept
        I.create_reg_mem(Code.MOV_R64_RM64, r.R10, m(r.RDX, displ=_UC_RSP)),
        I.create_reg_i32(Code.SUB_RM64_IMM8, r.R10, 8),  # where the return address was
        I.create_reg_mem(Code.MOV_R64_RM64, r.R8, m(r.R9)),  # entries ever used
        # ... as the program may have written it: never more than the table holds.
        I.create_reg_u32(Code.MOV_R32_IMM32, r.R11D, rettable.ENTRIES),
        I.create_reg_reg(Code.CMP_R64_RM64, r.R8, r.R11),
        I.create_reg_reg(Code.CMOVA_R64_RM64, r.R8, r.R11),
        I.create_reg_i32(Code.ADD_RM64_IMM8, r.R9, rettable.HEADER),
        I.create_reg_u64(Code.MOV_R64_IMM64, r.R12, 2**64 - 1),  # the lowest sp so far
        I.create_reg_reg(Code.XOR_R32_RM32, r.R13D, r.R13D),  # its return address
        "scan",  # of this thread's entries with sp >= r10 (lower: stale), the lowest
        I.create_reg_reg(Code.TEST_RM64_R64, r.R8, r.R8),
        ("je", "scanned"),
        I.create_mem_reg(Code.CMP_RM64_R64, m(r.R9), r.RAX),
        ("jne", "next"),
        I.create_reg_mem(Code.MOV_R64_RM64, r.RBX, m(r.R9, displ=8)),
        I.create_reg_reg(Code.CMP_RM64_R64, r.RBX, r.R10),
        ("jb", "next"),
        I.create_reg_reg(Code.CMP_RM64_R64, r.RBX, r.R12),
        ("jae", "next"),
        I.create_reg_reg(Code.MOV_R64_RM64, r.R12, r.RBX),
        I.create_reg_mem(Code.MOV_R64_RM64, r.R13, m(r.R9, displ=16)),
        "next",
        I.create_reg_i32(Code.ADD_RM64_IMM8, r.R9, rettable.ENTRY_SIZE),
        I.create_reg_i32(Code.SUB_RM64_IMM8, r.R8, 1),
        ("jmp", "scan"),
        "scanned",
        I.create_reg_reg(Code.TEST_RM64_R64, r.R13, r.R13),
        ("je", "foreign"),  # no entry: it dies of SIGTRAP, as before
        I.create_mem_reg(Code.MOV_RM64_R64, m(r.RDX, displ=_UC_RIP), r.R13),
        I.create(Code.RETNQ),
        "missing",  # rip on a page's first byte: rip - 1 may be unmapped; a dead tracer's stop
        I.create_reg_i32(Code.TEST_RM32_IMM32, r.R8D, 0xFFF),
        ("je", "done"),
        I.create_mem_i32(Code.CMP_RM8_IMM8, m(r.R9), 0xCC),
        ("je", "foreign"),  # a real int3, not ours
        "done",  # a dead tracer's stop: it moved rip and did the work
        I.create(Code.RETNQ),
        "stepped",  # a single-step's report (TRAP_BRKPT, TRAP_TRACE) of a dead tracer?
        I.create_mem_i32(Code.CMP_RM32_IMM32, m(r.RSI, displ=_SI_CODE), _TRAP_TRACE),
        ("ja", "foreign"),
        I.create_mem_i32(Code.CMP_RM32_IMM32, m(r.RSI, displ=_SI_CODE), _TRAP_BRKPT),
        ("jb", "foreign"),
        # The kernel cleared a tracer's TF before saving the flags; a TF of the
        # program's own is still there: its steps are its own business.
        I.create_mem_i32(Code.TEST_RM32_IMM32, m(r.RDX, displ=_UC_EFLAGS), _EFLAGS_TF),
        ("je", "done"),
        "foreign",  # as untraced: SIG_DFL, then the same signal and siginfo again
        I.create_reg_reg(Code.MOV_R64_RM64, r.R12, r.RSI),
        I.create_reg_reg(Code.MOV_R32_RM32, r.R13D, r.EDI),
        I.create_reg_u32(Code.MOV_R32_IMM32, r.EAX, _NR_RT_SIGACTION),
        I.create_reg_mem(Code.LEA_R64_M, r.RSI, m(r.RIP, displ=base + SIG_DFL_OFF)),
        I.create_reg_reg(Code.XOR_R32_RM32, r.EDX, r.EDX),
        I.create_reg_u32(Code.MOV_R32_IMM32, r.R10D, 8),
        I.create(Code.SYSCALL),
        I.create_reg_u32(Code.MOV_R32_IMM32, r.EAX, _NR_GETPID),
        I.create(Code.SYSCALL),
        I.create_reg_reg(Code.MOV_R64_RM64, r.R14, r.RAX),
        I.create_reg_u32(Code.MOV_R32_IMM32, r.EAX, _NR_GETTID),
        I.create(Code.SYSCALL),
        I.create_reg_reg(Code.MOV_R64_RM64, r.RSI, r.RAX),
        I.create_reg_reg(Code.MOV_R64_RM64, r.RDI, r.R14),
        I.create_reg_reg(Code.MOV_R32_RM32, r.EDX, r.R13D),
        I.create_reg_reg(Code.MOV_R64_RM64, r.R10, r.R12),
        I.create_reg_u32(Code.MOV_R32_IMM32, r.EAX, _NR_RT_TGSIGQUEUEINFO),
        I.create(Code.SYSCALL),
        I.create(Code.RETNQ),  # to the restorer; the signal comes when it unblocks
        "restorer",
        I.create_reg_u32(Code.MOV_R32_IMM32, r.EAX, _NR_RT_SIGRETURN),
        I.create(Code.SYSCALL),
        "inject",  # an injected call's `syscall` (the byte before it is not an int3)
        I.create(Code.SYSCALL),
        # Reached only by a thread whose tracer died in the call: its own registers.
        I.create_reg_mem(Code.MOV_R64_RM64, r.RSP, m(r.RIP, displ=saved["rsp"])),
        I.create_reg_mem(Code.LEA_R64_M, r.RSP, m(r.RSP, displ=-128)),
        I.create_mem(Code.PUSH_RM64, m(r.RIP, displ=saved["eflags"])),
        I.create(Code.POPFQ),
        I.create_reg_mem(Code.LEA_R64_M, r.RSP, m(r.RSP, displ=128)),  # lea keeps the flags
        *[I.create_reg_mem(Code.MOV_R64_RM64, reg, m(r.RIP, displ=saved[name]))
          for name, reg in gprs.items()],
        I.create_mem(Code.JMP_RM64, m(r.RIP, displ=saved["rip"])),
    ]
    branches = {"jne": Code.JNE_REL32_64, "je": Code.JE_REL32_64, "jmp": Code.JMP_REL32_64,
                "jb": Code.JB_REL32_64, "jae": Code.JAE_REL32_64, "ja": Code.JA_REL32_64}
    labels: dict[str, int] = {}
    for final in (False, True):  # sizes do not depend on targets: rel32 forms only
        code = bytearray()
        enc = Encoder(64)
        for item in prog:
            here = base + len(code)
            if isinstance(item, str):
                labels[item] = here
                continue
            if isinstance(item, tuple):
                target = labels[item[1]] if final else here
                item = Instruction.create_branch(branches[item[0]], target)
            enc.encode(item, here)
            code += enc.take_buffer()
    assert len(code) <= LANDING_OFF - base and LANDING_OFF + LANDING_SIZE <= TABLE_OFF
    return bytes(code), labels["restorer"] - base, labels["inject"] - base


@dataclass
class OrphanTable:
    """The tracer's copy of one address space's table (which entries are taken)."""

    start: int                              # the orphan area, 0: none (no handler)
    taken: dict[int, int] = field(default_factory=dict)  # index -> trap address

    def slot_for(self, trap_addr: int) -> int | None:
        """The index to write `trap_addr` at; None if it is there or the table is full."""
        if len(self.taken) >= TABLE_MAX:
            return None
        i = table_index(trap_addr)
        while i in self.taken:
            if self.taken[i] == trap_addr:
                return None
            i = (i + 1) % TABLE_ENTRIES
        return i


class OrphanGuard:
    """The tracer's side: sets the handler up in each process, fills its
    table, and keeps the reaper's records current."""

    def __init__(self, note: Callable[[str], object], watch: reaper.Watch | None = None) -> None:
        self._note = note
        self._tables: dict[int, OrphanTable] = {}  # id(AddressSpace) -> its table
        # Its own watcher, or one shared with other tracers (`open_orphan_watch`).
        self._shared = watch is not None
        self._watch = watch or open_watch()
        self._pids: set[int] = set()  # the processes it has records of
        self._dead = False
        self._full_noted = False

    # ---------------------------------------------------------- the reaper

    def _send(self, line: str) -> None:
        if not self._dead and not self._watch.send(line + "\n"):
            self._dead = True

    def close(self) -> None:
        """After a clean detach (every int3 removed): nothing for the reaper.
        A shared watcher forgets this tracer's processes only: the others'
        records are other tracers'."""
        if self._dead:
            return
        if self._shared:
            if self._pids:
                self._send("\n".join(f"F {pid}" for pid in sorted(self._pids)))
        elif self._watch.started:
            self._send("C")
        self._pids.clear()

    # ---------------------------------------------------------- processes

    def setup(self, t: Thread, regs: ptrace.UserRegs, syscall_addr: int,
              returns: bool = False) -> None:
        """Map the orphan area in `t`'s (stopped) process and install the
        handler; called once per address space, with its first XOL area.
        `returns`: return probes may hijack return addresses there: a
        return table too (`mm.ret_table`)."""
        mm = t.mm
        start = 0
        try:
            own = _disposition(mm.pid)
            if own is not None:
                self._note(f"process {mm.pid} {own} SIGTRAP itself: a kill -9 of uprobes is "
                           "made safe there by the reaper alone (no handler of ours)")
            else:
                held: list[int] = []
                got = self._map(t, regs, syscall_addr, held)
                if got > 0:
                    code, restorer, inject = handler_code()
                    mm.mem.write(got, code)
                    mm.mem.write(got + ACT_OFF, struct.pack(
                        "<QQQQ", got, _SA_SIGINFO | _SA_RESTART | _SA_RESTORER,
                        got + restorer, 2**64 - 1))
                    # From now on every injected call lands safely (a kill -9 in it).
                    syscall_addr = mm.syscall_addr = LandedSyscall(got + inject,
                                                                   got + LANDING_OFF)
                    if remote_syscall(t.tid, regs, syscall_addr, _NR_RT_SIGACTION,
                                      (_SIGTRAP, got + ACT_OFF, 0, 8), held) == 0:
                        start = got
                        if returns:
                            self._returns(t, regs, syscall_addr, got, held)
                t.pending.extend(held)
        except UprobesError as e:
            self._note(f"process {mm.pid}: no SIGTRAP handler for a kill -9 of uprobes: {e}")
        self._tables[id(mm)] = OrphanTable(start)
        self._pids.add(mm.pid)
        self._send(f"P {mm.pid} {start_time(mm.pid)} {start:x}")

    def _returns(self, t: Thread, regs: ptrace.UserRegs, syscall_addr: int, area: int,
                 held: list[int]) -> None:
        """The process's return table, its address where the handler finds it."""
        mm = t.mm
        try:
            mm.mem.write(area + NAME_OFF, rettable.NAME)
            table = rettable.create(t.tid, regs, mm.pid, syscall_addr, area + NAME_OFF, area,
                                    held, self._note)
            mm.mem.write(area + RETURNS_OFF, struct.pack("<Q", table.runtime_addr))
        except UprobesError as e:
            self._note(f"process {mm.pid}: no return table ({e}): a kill -9 of uprobes while "
                       "a return probe's trampoline is pending there kills it")
            return
        mm.ret_table = table

    def trampoline(self, mm: AddressSpace, addr: int) -> None:
        """A return trampoline (an XOL area's): in the table with slot 0,
        which sends the handler to the return table."""
        table = self._tables.get(id(mm))
        if table is None or not table.start:
            return
        i = table.slot_for(addr)
        if i is not None:
            mm.mem.write(table.start + TABLE_OFF + 16 * i, _ENTRY.pack(addr, 0))
            table.taken[i] = addr

    @staticmethod
    def _map(t: Thread, regs: ptrace.UserRegs, syscall_addr: int, held: list[int]) -> int:
        """Map the area right below the first XOL area (in the gap the engine
        already uses, so where the program's own later mmaps go is unchanged:
        the dynamic linker puts libraries top-down from mmap_base), else
        anywhere. Its address, or a negative errno."""
        below = t.mm.areas[0].start - AREA_SIZE if t.mm.areas else 0
        if below >= 0x10000:
            got = remote_syscall(t.tid, regs, syscall_addr, _NR_MMAP, (
                below, AREA_SIZE, _PROT_RX, _MAP_PRIVATE_ANON | _MAP_FIXED_NOREPLACE, -1, 0),
                held)
            if got == below:
                return got
        return remote_syscall(t.tid, regs, syscall_addr, _NR_MMAP,
                              (0, AREA_SIZE, _PROT_RX, _MAP_PRIVATE_ANON, -1, 0), held)

    def guard(self, mm: AddressSpace, site: Site) -> None:
        """Before `site`'s int3 is written: its table entry and its record."""
        table = self._tables.get(id(mm))
        if not self._entry(mm, site.runtime_addr, site.original[0], site.slot_addr) \
                or table is None:
            return
        # A tracer that dies after pointing rip at the slot, before resuming,
        # leaves a SIGTRAP at rip = slot: "trap at slot - 1" resumes there.
        j = table.slot_for(site.slot_addr - 1)
        if j is not None:
            mm.mem.write(table.start + TABLE_OFF + 16 * j,
                         _ENTRY.pack(site.slot_addr - 1, site.slot_addr))
            table.taken[j] = site.slot_addr - 1

    def guard_trap(self, mm: AddressSpace, addr: int) -> None:
        """An int3 in a jump's code (trapfree/pyguard.py) before the jump can
        lead to it: orphaned, the handler resumes right after it, and the
        reaper makes it a nop."""
        self._entry(mm, addr, _NOP_BYTE, addr + 1)

    def _entry(self, mm: AddressSpace, trap: int, original: int, resume: int) -> bool:
        """The reaper's record of our int3 at `trap` (the byte it goes back
        to) and the handler's table entry (where it resumes); whether the
        entry went in."""
        table = self._tables.get(id(mm))
        if table is None:
            return False
        self._send(f"B {mm.pid} {trap:x} {original:x}")
        if not table.start:
            return False
        i = table.slot_for(trap)
        if i is None:
            if len(table.taken) >= TABLE_MAX and not self._full_noted:
                self._full_noted = True
                self._note(f"more than {TABLE_MAX} probes in process {mm.pid}: the rest are "
                           "made safe against a kill -9 of uprobes by the reaper alone")
            return False
        mm.mem.write(table.start + TABLE_OFF + 16 * i, _ENTRY.pack(trap, resume))
        table.taken[i] = trap
        return True

    def semaphore(self, mm: AddressSpace, addr: int) -> None:
        """A USDT semaphore raised by one: the reaper lowers it."""
        if id(mm) in self._tables:
            self._send(f"S {mm.pid} {addr:x}")

    def uninstall(self, t: Thread, held: list[int]) -> None:
        """A clean detach (every int3 already gone): give SIGTRAP back its
        default action in `t`'s (stopped) process, as it was before we came,
        if our handler is still the one installed (a `sigaction` of the
        program's own since then stays). Signals that arrive during the two
        injected calls go to `held`. A failure leaves the handler, which acts
        as SIG_DFL for every SIGTRAP that is not ours."""
        mm = t.mm
        table = self._tables.get(id(mm))
        if table is None or not table.start or mm.syscall_addr is None:
            return
        try:
            regs = ptrace.getregs(t.tid, ptrace.UserRegs())
            # The area is not writable: the installed action is read back to
            # the thread's stack, below its red zone (free, as for a signal frame).
            old = (regs.rsp - 128 - 32) & ~15
            if remote_syscall(t.tid, regs, mm.syscall_addr, _NR_RT_SIGACTION,
                              (_SIGTRAP, 0, old, 8), held) != 0:
                return
            handler, _, restorer = struct.unpack("<QQQ", mm.mem.read(old, 24))
            # Ours, or ours reset to SIG_DFL by the kernel (a SIGTRAP forced on a
            # thread that blocked it keeps our flags and restorer): either way
            # SIG_DFL goes back whole.
            if handler not in (table.start, 0) or restorer != table.start + handler_code()[1]:
                return
            remote_syscall(t.tid, regs, mm.syscall_addr, _NR_RT_SIGACTION,
                           (_SIGTRAP, table.start + SIG_DFL_OFF, 0, 8), held)
        except UprobesError:
            pass

    def forked(self, parent: AddressSpace, child: AddressSpace) -> None:
        """A fork child: it inherited the area, the handler and every int3."""
        table = self._tables.get(id(parent))
        if table is None:
            return
        self._tables[id(child)] = OrphanTable(table.start, dict(table.taken))
        self._pids.add(child.pid)
        lines = [f"P {child.pid} {start_time(child.pid)} {table.start:x}"]
        lines += [f"B {child.pid} {s.runtime_addr:x} {s.original[0]:x}"
                  for s in child.sites.values()]
        lines += [f"B {child.pid} {a:x} {_NOP_BYTE:x}" for a in child.guard_traps]
        lines += [f"S {child.pid} {a:x}" for a in child.semaphores]
        self._send("\n".join(lines))

    def released(self, mm: AddressSpace) -> None:
        """`mm` is gone (its process exited or exec'd), unless still shared (vfork)."""
        if mm.users <= 0 and self._tables.pop(id(mm), None) is not None:
            self._pids.discard(mm.pid)
            self._send(f"F {mm.pid}")


def open_watch() -> reaper.Watch:
    """A reaper for orphaned int3s (orphan_reaper.py), started on its first record."""
    return reaper.Watch("uprobes.engines.ptrace.orphan_reaper")


def _disposition(pid: int) -> str | None:
    """Whether process `pid` catches or ignores SIGTRAP ("catches"/"ignores"), else None."""
    bit = 1 << (_SIGTRAP - 1)
    try:
        with open(f"/proc/{pid}/status", errors="surrogateescape") as f:  # Name: bytes
            fields = dict(line.split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None
    if int(fields.get("SigCgt", "0"), 16) & bit:
        return "catches"
    if int(fields.get("SigIgn", "0"), 16) & bit:
        return "ignores"
    return None


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: tells a pid's process from a later one's."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        return int(text[text.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0
