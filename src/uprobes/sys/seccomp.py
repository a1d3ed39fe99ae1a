"""What a thread's seccomp filters would do with a system call, before we make
it run one (an injected call, xol.remote_syscall).

The kernel runs every filter of the thread on the call and acts on the
result of highest precedence (the smallest action as a signed 32-bit number:
KILL_PROCESS, KILL_THREAD, TRAP, ERRNO, USER_NOTIF, TRACE, LOG, ALLOW;
kernel/seccomp.c seccomp_run_filters). The filters are read with
PTRACE_SECCOMP_GET_FILTER (root, the thread in a ptrace stop of ours) and
run here on the very call: number, arguments and instruction pointer. A
call is safe when it comes back with a result the caller sees: ALLOW, LOG,
ERRNO, or TRACE (an error too: we do not ask for seccomp stops, so the
kernel fails the call with ENOSYS). KILL ends the thread or process, TRAP
sends it SIGSYS and USER_NOTIF hands the call to a supervisor: those are
refused, and so is any call in strict mode (only read, write, exit and
sigreturn pass) and any filter we cannot read (not root, or no
CONFIG_CHECKPOINT_RESTORE): we never guess that a filter lets a call through.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Sequence

from uprobes.errors import KernelError, UprobesError
from uprobes.sys import procfs, ptrace

AUDIT_ARCH_X86_64 = 0xC000003E

RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
_ACTION_FULL = 0xFFFF0000
_SAFE = frozenset({RET_ERRNO, RET_TRACE, RET_LOG, RET_ALLOW})
_SUCCEEDS = frozenset({RET_LOG, RET_ALLOW})  # the call does what it was asked
_WHAT = {RET_KILL_PROCESS: "kill the process", RET_KILL_THREAD: "kill the thread",
         RET_TRAP: "send it SIGSYS", RET_USER_NOTIF: "hand the call to its supervisor"}
_NAMES = {3: "close", 9: "mmap", 13: "rt_sigaction", 39: "getpid", 157: "prctl", 186: "gettid",
          310: "process_vm_readv", 319: "memfd_create"}  # x86-64 numbers

_MAX_FILTERS = 64  # past this many, the stack is not one a program installs on purpose
_MAX_INSNS = 4096  # BPF_MAXINSNS: the kernel refuses longer filters

Insn = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


def mode(tid: int) -> int:
    """The thread's seccomp mode (/proc/TID/status): 0 none, 1 strict, 2
    filters; -1 if it cannot be read."""
    try:
        return procfs.status(tid).seccomp
    except UprobesError:
        return -1


def filters(tid: int) -> list[list[Insn]] | str:
    """The thread's filters, the most recently installed first; or why they
    cannot be read. The thread must be in a ptrace stop of ours."""
    out: list[list[Insn]] = []
    try:
        for index in range(_MAX_FILTERS + 1):
            try:
                count = ptrace.seccomp_filter(tid, index)
            except KernelError as e:
                if e.errno == errno.ENOENT and out:  # past the oldest filter
                    return out
                raise
            if not 0 < count <= _MAX_INSNS:
                return "its seccomp filter cannot be read (a filter of unexpected size)"
            buf = (_SockFilter * count)()
            if ptrace.seccomp_filter(tid, index, ctypes.addressof(buf)) != count:
                return "its seccomp filter changed while it was read"
            out.append([(i.code, i.jt, i.jf, i.k) for i in buf])
    except KernelError as e:
        return f"its seccomp filter cannot be read ({_why(e.errno or 0)})"
    return "it has more seccomp filters than uprobes reads"


def _why(err: int) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return "needs CAP_SYS_ADMIN"
    if err == errno.EIO:
        return "the kernel lacks CONFIG_CHECKPOINT_RESTORE"
    return os.strerror(err)


def _alu(op: int, a: int, b: int) -> int | None:
    """BPF_ALU `op` on the accumulator; None for an operation seccomp refuses
    or a division by zero (which ends the filter with 0, a kill)."""
    if op in (0x30, 0x90) and b == 0:
        return None
    if op == 0x00:
        return a + b
    if op == 0x10:
        return a - b
    if op == 0x20:
        return a * b
    if op == 0x30:
        return a // b
    if op == 0x40:
        return a | b
    if op == 0x50:
        return a & b
    if op == 0x60:
        return a << (b & 31)
    if op == 0x70:
        return a >> (b & 31)
    if op == 0x80:
        return -a
    if op == 0x90:
        return a % b
    if op == 0xA0:
        return a ^ b
    return None


def seccomp_data(nr: int, args: Sequence[int], instruction_pointer: int) -> bytes:
    """struct seccomp_data as the kernel builds it for the call."""
    words = [a & (2**64 - 1) for a in args] + [0] * (6 - len(args))
    return struct.pack("<iIQ6Q", nr, AUDIT_ARCH_X86_64, instruction_pointer, *words)


def run(prog: Sequence[Insn], data: bytes, loaded: set[int] | None = None) -> int:
    """Run one classic BPF seccomp filter on `data` (seccomp_data): its
    return value. The instructions are the ones the kernel's seccomp_check_filter
    accepts; anything else, or a jump out of the program, counts as a kill.
    `loaded` gets the offsets of the words of `data` the run read."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    mask = 0xFFFFFFFF
    while 0 <= pc < len(prog):
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode_ = code & 0xE0
            if mode_ == 0x20 and code & 0x18 == 0x00 and k % 4 == 0 and k + 4 <= len(data):
                a = struct.unpack_from("<I", data, k)[0]  # BPF_W | BPF_ABS
                if loaded is not None:
                    loaded.add(k)
            elif mode_ == 0x80:  # BPF_LEN
                a = len(data)
            elif mode_ == 0x00:  # BPF_IMM
                a = k
            elif mode_ == 0x60 and k < 16:  # BPF_MEM
                a = mem[k]
            else:
                return RET_KILL_THREAD
        elif cls == 0x01:  # LDX
            mode_ = code & 0xE0
            if mode_ == 0x80:
                x = len(data)
            elif mode_ == 0x00:
                x = k
            elif mode_ == 0x60 and k < 16:
                x = mem[k]
            else:
                return RET_KILL_THREAD
        elif cls == 0x02 and k < 16:  # ST
            mem[k] = a
        elif cls == 0x03 and k < 16:  # STX
            mem[k] = x
        elif cls == 0x04:  # ALU
            got = _alu(code & 0xF0, a, x if code & 0x08 else k)
            if got is None:
                return RET_KILL_THREAD
            a = got & mask
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            b = x if code & 0x08 else k
            if op == 0x00:  # BPF_JA
                pc += k
                continue
            taken = {0x10: a == b, 0x20: a > b, 0x30: a >= b, 0x40: bool(a & b)}.get(op)
            if taken is None:
                return RET_KILL_THREAD
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return (a if code & 0x18 == 0x10 else k) & mask
        elif cls == 0x07:  # MISC
            if code & 0xF8 == 0x00:
                x = a  # TAX
            elif code & 0xF8 == 0x80:
                a = x  # TXA
            else:
                return RET_KILL_THREAD
        else:
            return RET_KILL_THREAD
    return RET_KILL_THREAD


def _signed(action: int) -> int:
    action &= _ACTION_FULL
    return action - 2**32 if action >= 2**31 else action


def action(progs: Sequence[Sequence[Insn]], data: bytes) -> int:
    """The action (its 16 top bits) the kernel takes: the filters' result of
    highest precedence."""
    return min((run(p, data) & _ACTION_FULL for p in progs), key=_signed, default=RET_ALLOW)


def action_anywhere(progs: Sequence[Sequence[Insn]], nr: int, args: Sequence[int]
                    ) -> int | None:
    """`action` on call `nr(*args)` whatever its other arguments and its
    address; None when the filters' answer may depend on them."""
    data = seccomp_data(nr, args, 0)
    known = {0, 4} | {16 + 8 * n + half for n in range(len(args)) for half in (0, 4)}
    loaded: set[int] = set()
    act = min((run(p, data, loaded) & _ACTION_FULL for p in progs), key=_signed,
              default=RET_ALLOW)
    return act if loaded <= known else None


def refusal_anywhere(tid: int, nr: int, args: Sequence[int], *,
                     must_succeed: bool = False) -> str | None:
    """As `refusal`, for a call made from code not placed yet, whose
    arguments past `args` are whatever the registers hold then: the filters
    are run once, and their answer holds only if they read nothing but the
    number, the architecture and `args` (a filter's run is a function of
    the words it reads). `must_succeed`: a call whose failure would go
    unseen (ERRNO, TRACE) is refused too: only ALLOW and LOG pass."""
    return _refusal(tid, nr, "", lambda progs: action_anywhere(progs, nr, args),
                    _SUCCEEDS if must_succeed else _SAFE)


def refusal(tid: int, nr: int, args: Sequence[int], instruction_pointer: int,
            what: str = "an injected") -> str | None:
    """Why thread `tid` (in a ptrace stop of ours) must not run system call
    `nr(*args)` from `instruction_pointer` (the address after its `syscall`),
    or None when its seccomp state lets the call return. `what` says whose
    call it is, for the reason's words."""
    return _refusal(tid, nr, what + " ",
                    lambda progs: action(progs, seccomp_data(nr, args, instruction_pointer)))


def _refusal(tid: int, nr: int, how: str,
             act_of: Callable[[list[list[Insn]]], int | None],
             safe: frozenset[int] = _SAFE) -> str | None:
    """Why `tid` must not make call `nr` (`how`: whose call, "an injected ", or ""),
    `act_of` its filters' action on it (None: not known)."""
    name = _NAMES.get(nr, f"system call {nr}")
    m = mode(tid)
    if m == 0:
        return None
    if m == 1:
        return f"it runs in seccomp strict mode, which kills it for {name}()"
    progs = filters(tid)
    if isinstance(progs, str):
        return progs + f"; {how or 'a '}{name}() could kill it"
    act = act_of(progs)
    if act is None:
        return f"its seccomp filter looks at more of a {name}() call than uprobes can know"
    if act in safe:
        return None
    if act in _SAFE:
        return f"its seccomp filter would fail {how}{name}() (act {act:#x})"
    return f"its seccomp filter would {_WHAT.get(act, f'act {act:#x}')} on {how}{name}()"
