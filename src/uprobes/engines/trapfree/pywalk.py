"""Python frames copied by a recording probe's code: `stacks --python` with no stop.

A probe that copies the stack (recording.py) can also copy what the tracer
reads to name the hitting thread's Python frames (unwind/cpython/reader.py),
so `--python` needs no int3 either. After the stack copy its code:

    calls PyGILState_GetThisThreadState()   ; the thread's own state (a
                                            ; pthread key CPython keeps per
                                            ; thread, GIL held or not), or 0
    follows the thread state to its current frame (3.11, 3.12: cframe ->
      current_frame; 3.13: current_frame), 8 bytes a hop
    copies each frame's header (the layout's frame_size bytes) by
      `previous`, up to `frames` of them
    copies each one's code object's fingerprint (reader.fingerprint: its
      first line, file, qualified name and line table) by one call with
      an iovec per code object (once, however many frames run it: a
      recursion's share one)
    copies, from each fingerprint copied, the head of its qualified name's
      and its file's str objects (`NAME` bytes from their length: length,
      hash, state, then the text, of any kind) by one call with an iovec
      per str (once): what the reader tells the code object by (its
      fingerprint holds addresses, which a replacement can share), and
      names it by once it is gone

Every copy is a process_vm_readv(2) of the program's own process (named by
getpid: glibc's cached tid is the parent's in a child of a raw fork): the
program's memory is untrusted, and a pointer to nothing gives a short copy,
never a fault. (The stack copy before it makes no system call: it is
bounded by the thread's stack, stackbounds.py; these pointers have no such
bound.) The two calls are judged against every thread's seccomp filters at
placement, and each is guarded at the hit by the seccomp word
(sandboxes.py: its `Seal`): once a traced process has entered seccomp()
or prctl(PR_SET_SECCOMP), the walk makes no more system calls; it leaves
the record without Python frames (a thread state of 0) and counts the hit
at `Seal.sealed` (the tracer says how many, after the run).
The function called only reads
a pthread key (no lock, no allocation: CPython's faulthandler calls it from
a signal handler); a probe in it, or in what it runs (its branches
followed through PLT stubs to the definitions they bind: reach.py), keeps
the int3 path. Offsets come from the interpreter's layout
(resolve/pylayout.py), as for the int3 path's reads.

The Python area, in the slot's copy area after the stack copy (`at`):

    +0   the thread state (0: none, no Python frames)
    +8   frame headers copied
    +16  bytes of fingerprints copied (the call's result: < 0, none)
    +24  the current frame's address
    +32  one word: each hop's read
    +40  bytes of names copied (the call's result: < 0, none)
    +48  `frames` frame headers, `header` bytes each
    then 2 * `frames` iovecs (the fingerprints' sources, then the names'),
    then up to `frames` fingerprints of `fp_len` bytes (each code object's
    once, in the order its frames are met), then the window, whose
    bytes the names take once the frames are copied: `NAME` bytes of each
    str named (each frame's qualified name, then its file), each str once,
    in the order met, the first `frames` of them

The reader (reader.py's `python` of a site) gives these to
`PythonStacks.recorded`, which names them as the int3 path names the
frames it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand
from iced_x86 import Register as R

from uprobes.engines.trapfree.layout import SECCOMP_OPEN
from uprobes.resolve.pylayout import Layout
from uprobes.unwind.cpython.reader import MAX_PY_FRAMES, StrHead, fingerprint

NR_PROCESS_VM_READV = 310
NR_GETPID = 39
PTHREAD_SELF = 0x10
"""%fs:0x10: the thread's pthread_self (x86-64 glibc's TCB header, `self`)."""
HEADER = 48  # the area's words before the frames
NAME = 128
"""Bytes copied of each frame's qualified name and of its file, from the
str's `length` field: 3.11's ASCII text starts 32 bytes in (96 characters
copied), its other kinds' 56 (72 bytes: 72, 36 or 18 characters); 3.12's
and 3.13's 24 (104) and 40 (88). A piece costs the kernel a page pin
whatever its size, so a hit costs about what 64 bytes cost. The area has
room for `frames` strs (each copied once: most frames share their file),
the bytes two 64-byte heads a frame took: a stack naming more distinct
strs than it has frames copies the first `frames` of them."""
WINDOW = 2048
"""Bytes of the program's memory read at once below a frame (in its page):
its callers' frames sit there, side by side in the thread's data stack, so
most hops cost no system call."""
CALLED = "PyGILState_GetThisThreadState"
"""The function the walk's code calls: a probe in the code it runs (found
by following its branches, PLT stubs and the dynamic linker included:
reach.py) keeps the int3 path."""
_SAVED = (R.RCX, R.RDX, R.RSI, R.RDI, R.R8, R.R9, R.R10, R.R11, R.RBX, R.RBP,
          R.R12, R.R13, R.R14, R.R15)


def _up8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class PyWalk:
    """What one process's walk copies: `func` the run-time address of
    PyGILState_GetThisThreadState, `hops` the offsets from a thread state
    to its current frame, a frame's `header` bytes (its `previous` and
    code object at `previous` and `code`), each code object's fingerprint
    (`fp_at`, `fp_len` bytes), at most `frames` frames, into the slot's
    copy area from `at`."""

    func: int
    hops: tuple[int, ...]
    header: int
    previous: int
    code: int
    fp_at: int
    fp_len: int
    frames: int
    at: int
    current: int = 0
    """3.11: the run-time address of `_PyRuntime.gilstate.tstate_current`,
    the state holding the GIL (0: later versions)."""
    thread_id: int = 0
    """3.11: the offset of a thread state's `thread_id` (its thread's pthread_self)."""
    qualname: int = 0
    filename: int = 0
    """Where a fingerprint holds its code object's qualified name and file (pointers)."""
    str_length: int = 0
    """The offset of a str's `length`: where a name's copy starts."""
    strs: StrHead = StrHead()
    """Where a name's copy holds its str's state and text."""

    @cached_property
    def stride(self) -> int:
        return _up8(self.header)

    @cached_property
    def iovs(self) -> int:
        return self.at + HEADER + self.frames * self.stride

    @cached_property
    def fps(self) -> int:
        return self.iovs + 32 * self.frames

    @cached_property
    def window(self) -> int:
        """Where the window of the program's memory is kept (WINDOW bytes),
        and then the names."""
        return self.fps + self.frames * self.fp_len

    @cached_property
    def names(self) -> int:
        return self.window

    @cached_property
    def end(self) -> int:
        return self.window + max(WINDOW, NAME * self.frames)


def py_walk(func: int, lay: Layout, copy: int, room: int, runtime: int) -> PyWalk | None:
    """The walk for an interpreter of layout `lay` whose
    PyGILState_GetThisThreadState is at `func` and `_PyRuntime` at
    `runtime`, after a stack copy of `copy` bytes in a copy area of `room`;
    None: not a frame fits."""
    fp_lo, fp_hi = fingerprint(lay)
    header, fp_len = lay.frame_size, fp_hi - fp_lo
    at = _up8(copy)
    per = _up8(header) + 32 + fp_len
    left = room - at - HEADER
    frames = min(MAX_PY_FRAMES * 2, left // per)
    # The names share the window's bytes, and take more once they outgrow it.
    while frames > 0 and frames * per + max(WINDOW, NAME * frames) > left:
        frames -= 1
    if frames < 1:
        return None
    tc = lay.fields.get("runtime_tstate_current")
    return PyWalk(func, lay.current_frame_hops(), header, lay.frame_previous, lay.frame_code,
                  fp_lo, fp_len, frames, at, 0 if tc is None else runtime + tc,
                  lay.fields.get("tstate_thread_id", 0), lay.code_qualname - fp_lo,
                  lay.code_filename - fp_lo, lay.str_length, StrHead.of(lay))


@dataclass(frozen=True)
class Copied:
    """A record's Python area, as the reader takes it."""

    first: int
    blobs: list[bytes]
    heads: list[bytes | None]
    names: list[tuple[bytes, bytes] | None]
    """Each frame's qualified name and file as copied (`NAME` bytes each,
    from the str's `length`; None: not copied)."""


def copied(walk: PyWalk, area: bytes) -> Copied | None:
    """The frames a record's copy area holds (None: the thread had none)."""
    base = walk.at
    if len(area) < walk.end:
        return None
    word = [int.from_bytes(area[base + 8 * k:base + 8 * k + 8], "little", signed=True)
            for k in range(6)]
    tstate, n, fp_bytes, first, _, name_bytes = word
    if not tstate or not first:
        return None
    n = max(0, min(n, walk.frames))
    at, stride = base + HEADER, walk.stride
    blobs = [area[at + stride * k:at + stride * k + walk.header] for k in range(n)]
    # The fingerprints as the code copied them: each code object's once,
    # in the order met.
    codes: dict[int, int] = {}
    heads: list[bytes | None] = []
    for blob in blobs:
        k = codes.setdefault(int.from_bytes(blob[walk.code:walk.code + 8], "little"), len(codes))
        lo = walk.fps + walk.fp_len * k
        heads.append(area[lo:lo + walk.fp_len] if fp_bytes >= walk.fp_len * (k + 1) else None)
    # The names as the code copied them: each str once, in the order met.
    slots: dict[int, int] = {}
    names: list[tuple[bytes, bytes] | None] = []
    for head in heads:
        if head is None:
            names.append(None)
            continue
        got = []
        for field in (walk.qualname, walk.filename):
            src = (int.from_bytes(head[field:field + 8], "little") + walk.str_length) \
                & ((1 << 64) - 1)
            k = slots.setdefault(src, len(slots))
            got.append(area[walk.names + NAME * k:walk.names + NAME * (k + 1)]
                       if name_bytes >= NAME * (k + 1) and k < walk.frames else None)
        names.append((got[0], got[1]) if got[0] is not None and got[1] is not None else None)
    return Copied(first & ((1 << 64) - 1), blobs, heads, names)


def copied_key(walk: PyWalk, area: bytes) -> bytes:
    """What of a record's Python area its frames are made of: the header,
    the frames copied, their fingerprints and names (equal bytes, equal
    frames)."""
    base = walk.at
    n = max(0, min(int.from_bytes(area[base + 8:base + 16], "little", signed=True),
                   walk.frames))
    fp_bytes = int.from_bytes(area[base + 16:base + 24], "little", signed=True)
    key = [area[base:base + HEADER + walk.stride * n],
           area[walk.fps:walk.fps + max(0, min(fp_bytes, walk.fp_len * n))]]
    copied = int.from_bytes(area[base + 40:base + 48], "little", signed=True) // NAME
    # Of each name, its length, state, text and NUL, not what follows the str.
    for k in range(max(0, min(copied, 2 * n))):
        name = area[walk.names + NAME * k:walk.names + NAME * (k + 1)]
        span = walk.strs.span(name)
        key += [name[:8], name[walk.strs.state:walk.strs.state + 4]]
        if span is not None:
            length, lo, width = span
            key.append(name[lo:lo + min(length + 1, NAME) * width])
    return b"".join(key)


@dataclass(frozen=True)
class Seal:
    """Where the walk's guard is, in the program: `word` the seccomp word
    (sandboxes.py: SECCOMP_OPEN while no traced process has entered a call that
    may install a filter), `sealed` a counter of the hits it kept from the
    walk's system calls."""

    word: int
    sealed: int


def _mem(base: Any, displ: int = 0) -> MemoryOperand:
    return MemoryOperand(base, displ=displ)


def _readv(local: Any, remote: Any, n: int) -> list[Instruction]:
    """process_vm_readv(r12d, {local, n}, 1, {remote, n}, 1, 0); rax: its result."""
    i = Instruction
    return [
        i.create_i32(Code.PUSHQ_IMM32, n), i.create_reg(Code.PUSH_R64, remote),
        i.create_i32(Code.PUSHQ_IMM32, n), i.create_reg(Code.PUSH_R64, local),
        i.create_reg_reg(Code.MOV_R32_RM32, R.EDI, R.R12D),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.RSP),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1),
        i.create_reg_mem(Code.LEA_R64_M, R.R10, _mem(R.RSP, 16)),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.R8D, 1),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.R9D, 0),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, NR_PROCESS_VM_READV),
        i.create(Code.SYSCALL),
        i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, 32)),
    ]


def _gather(walk: PyWalk, n: Any, per: int, into: int, result: int) -> list[Instruction]:
    """process_vm_readv(r12d, {rbx + into, n * per}, 1, the `n` iovecs, n, 0),
    its result to rbx + `result`."""
    i = Instruction
    return [
        i.create_reg_reg(Code.MOV_R64_RM64, R.R8, n),
        i.create_reg_reg_i32(Code.IMUL_R64_RM64_IMM32, R.RAX, R.R8, per),
        i.create_reg(Code.PUSH_R64, R.RAX),
        i.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RBX, into - walk.at)),
        i.create_reg(Code.PUSH_R64, R.RAX),
        i.create_reg_reg(Code.MOV_R32_RM32, R.EDI, R.R12D),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RSI, R.RSP),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 1),
        i.create_reg_mem(Code.LEA_R64_M, R.R10, _mem(R.RBX, walk.iovs - walk.at)),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.R9D, 0),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, NR_PROCESS_VM_READV),
        i.create(Code.SYSCALL),
        i.create_reg_mem(Code.LEA_R64_M, R.RSP, _mem(R.RSP, 16)),
        i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RBX, result), R.RAX),
    ]


def walk_block(walk: PyWalk, copy_offset: int, seal: Seal | None = None) -> list[Instruction]:
    """The walk's code for the slot at rcx (its copy area at `copy_offset`),
    as `db` instructions: its branches are its own and it reads nothing
    relative to rip, so its bytes go anywhere. Every register it changes is
    put back but rax. With `seal`, each system call is made only while the
    seccomp word is SECCOMP_OPEN."""
    i = Instruction
    area = copy_offset + walk.at
    code: list[Instruction | None] = [i.create_reg(Code.PUSH_R64, r) for r in _SAVED]
    jumps: list[tuple[int, Any, str]] = []
    extra: dict[str, int] = {}

    def branch(kind: Any, label: str) -> None:
        jumps.append((len(code), kind, label))
        code.append(None)

    def guard() -> None:  # (clobbers rax; the stack as at the start)
        if seal is not None:
            code.extend([i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, seal.word),
                         i.create_mem_i32(Code.CMP_RM64_IMM8, _mem(R.RAX), SECCOMP_OPEN)])
            branch(Code.JNE_REL32_64, "sealed")
    code += [
        i.create_reg_mem(Code.LEA_R64_M, R.RBX, _mem(R.RCX, area)),
        i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RBX, 0), 0),
        i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RBX, 8), 0),
        i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RBX, 16), -1),
        i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RBX, 24), 0),
        i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RBX, 40), -1),
        # The call, on a 16-byte aligned stack.
        i.create_reg_reg(Code.MOV_R64_RM64, R.RBP, R.RSP),
        i.create_reg_i32(Code.AND_RM64_IMM8, R.RSP, -16),
        i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, walk.func),
        i.create_reg(Code.CALL_RM64, R.RAX),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RSP, R.RBP),
        i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RBX, 0), R.RAX),
        i.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX),
    ]
    branch(Code.JE_REL32_64, "done")
    code.append(i.create_reg_reg(Code.MOV_R64_RM64, R.R13, R.RAX))
    guard()
    code += [
        i.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, NR_GETPID),
        i.create(Code.SYSCALL),
        i.create_reg_reg(Code.MOV_R32_RM32, R.R12D, R.EAX),
        i.create_reg_mem(Code.LEA_R64_M, R.R15, _mem(R.RBX, 32)),
    ]
    if walk.current:
        # 3.11: a subinterpreter's code runs on another state of the thread
        # than the GILState one (the thread's first): the state holding the
        # GIL is the one running, when its thread is this one.
        code += [
            i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, walk.current),
            i.create_reg_mem(Code.MOV_R64_RM64, R.RBP, _mem(R.RAX)),
            i.create_reg_reg(Code.TEST_RM64_R64, R.RBP, R.RBP),
        ]
        branch(Code.JE_REL32_64, "mine")
        code.append(i.create_reg_mem(Code.LEA_R64_M, R.R14, _mem(R.RBP, walk.thread_id)))
        guard()
        code += [*_readv(R.R15, R.R14, 8),
                 i.create_reg_i32(Code.CMP_RM64_IMM8, R.RAX, 8)]
        branch(Code.JNE_REL32_64, "mine")
        code += [i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RBX, 32)),
                 i.create_reg_mem(Code.CMP_R64_RM64, R.RAX,
                                  MemoryOperand(R.NONE, displ=PTHREAD_SELF, seg=R.FS))]
        branch(Code.JNE_REL32_64, "mine")
        code += [i.create_reg_reg(Code.MOV_R64_RM64, R.R13, R.RBP),
                 i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RBX, 0), R.R13)]
    mine = len(code)
    for hop in walk.hops:
        guard()
        code += [i.create_reg_mem(Code.LEA_R64_M, R.R14, _mem(R.R13, hop)),
                 *_readv(R.R15, R.R14, 8),
                 i.create_reg_i32(Code.CMP_RM64_IMM8, R.RAX, 8)]
        branch(Code.JNE_REL32_64, "done")
        code += [i.create_reg_mem(Code.MOV_R64_RM64, R.R13, _mem(R.RBX, 32)),
                 i.create_reg_reg(Code.TEST_RM64_R64, R.R13, R.R13)]
        branch(Code.JE_REL32_64, "done")
    code += [
        i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RBX, 24), R.R13),
        i.create_reg_reg(Code.XOR_R32_RM32, R.R14D, R.R14D),
        i.create_reg_mem(Code.LEA_R64_M, R.R15, _mem(R.RBX, HEADER)),
    ]
    # rbp: where the window starts in the program (none yet: past any frame).
    code += [i.create_reg_i32(Code.MOV_RM64_IMM32, R.RBP, -1), i.create(Code.CLD)]
    loop = len(code)
    code += [
        i.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.R13),
        i.create_reg_reg(Code.SUB_R64_RM64, R.RAX, R.RBP),
        i.create_reg_i32(Code.CMP_RM64_IMM32, R.RAX, WINDOW - walk.header),
    ]
    branch(Code.JA_REL32_64, "miss")
    hit = len(code)  # the header from the window: rep movsb
    code += [
        i.create_reg_mem(Code.LEA_R64_M, R.RSI, MemoryOperand(
            base=R.RBX, index=R.RAX, scale=1, displ=walk.window - walk.at, displ_size=8)),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RDI, R.R15),
        i.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, walk.header),
        i.create_rep_movsb(64),
    ]
    branch(Code.JMP_REL32_64, "got")
    # A new window: the WINDOW bytes that end at the header's end, or from
    # the frame's page (a mapped address's page is mapped), one read.
    miss = len(code)
    guard()
    code += [
        i.create_reg_mem(Code.LEA_R64_M, R.RBP, _mem(R.R13, walk.header - WINDOW)),
        i.create_reg_reg(Code.MOV_R64_RM64, R.RDX, R.R13),
        i.create_reg_i32(Code.AND_RM64_IMM32, R.RDX, -4096),
        i.create_reg_reg(Code.CMP_R64_RM64, R.RBP, R.RDX),
        i.create_reg_reg(Code.CMOVB_R64_RM64, R.RBP, R.RDX),
        i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RBX, walk.window - walk.at)),
        *_readv(R.RSI, R.RBP, WINDOW),
        i.create_reg_i32(Code.CMP_RM64_IMM32, R.RAX, WINDOW),
    ]
    branch(Code.JNE_REL32_64, "direct")
    code += [
        i.create_reg_reg(Code.MOV_R64_RM64, R.RAX, R.R13),
        i.create_reg_reg(Code.SUB_R64_RM64, R.RAX, R.RBP),
    ]
    jumps.append((len(code), Code.JMP_REL32_64, "hit"))
    code.append(None)
    # The window ran into unmapped memory (the header crosses into the next
    # page): no window; the header alone.
    direct = len(code)
    guard()
    code += [i.create_reg_i32(Code.MOV_RM64_IMM32, R.RBP, -1),
             *_readv(R.R15, R.R13, walk.header),
             i.create_reg_i32(Code.CMP_RM64_IMM32, R.RAX, walk.header)]
    branch(Code.JNE_REL32_64, "fps")
    got = len(code)
    code += [
        i.create_reg(Code.INC_RM64, R.R14),
        i.create_mem_reg(Code.MOV_RM64_R64, _mem(R.RBX, 8), R.R14),
        i.create_reg_mem(Code.MOV_R64_RM64, R.R13, _mem(R.R15, walk.previous)),
        i.create_reg_mem(Code.LEA_R64_M, R.R15, _mem(R.R15, walk.stride)),
        i.create_reg_reg(Code.TEST_RM64_R64, R.R13, R.R13),
    ]
    branch(Code.JE_REL32_64, "fps")
    code.append(i.create_reg_i32(Code.CMP_RM64_IMM32, R.R14, walk.frames))
    jumps.append((len(code), Code.JB_REL32_64, "loop"))
    code.append(None)
    fps = len(code)
    code.append(i.create_reg_reg(Code.TEST_RM64_R64, R.R14, R.R14))
    branch(Code.JE_REL32_64, "done")
    # The fingerprints' iovecs: {code object + fp_at, fp_len} for each code
    # object once, in the order first met (an iovec costs the kernel a page
    # pin: a recursion's frames share theirs); rdx counts them.
    code += [
        i.create_reg_reg(Code.XOR_R32_RM32, R.ECX, R.ECX),
        i.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX),
        i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RBX, HEADER)),
        i.create_reg_mem(Code.LEA_R64_M, R.R11, _mem(R.RBX, walk.iovs - walk.at)),
    ]
    iov = len(code)
    code += [
        i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI, walk.code)),
        i.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RAX, walk.fp_at)),
        i.create_reg_reg(Code.XOR_R32_RM32, R.R9D, R.R9D),
    ]
    extra["search_code"] = len(code)  # iovecs [0, rdx): one from rax already?
    code.append(i.create_reg_reg(Code.CMP_R64_RM64, R.R9, R.RDX))
    branch(Code.JAE_REL32_64, "add_code")
    code += [
        i.create_reg_mem(Code.LEA_R64_M, R.R10, MemoryOperand(R.R9, R.R9, 1)),
        i.create_reg_mem(Code.CMP_R64_RM64, R.RAX, MemoryOperand(R.R11, R.R10, 8)),
    ]
    branch(Code.JE_REL32_64, "skip_code")
    code.append(i.create_reg(Code.INC_RM64, R.R9))
    branch(Code.JMP_REL32_64, "search_code")
    extra["add_code"] = len(code)
    code += [
        i.create_reg_mem(Code.LEA_R64_M, R.R10, MemoryOperand(R.RDX, R.RDX, 1)),
        i.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(R.R11, R.R10, 8), R.RAX),
        i.create_mem_i32(Code.MOV_RM64_IMM32, MemoryOperand(R.R11, R.R10, 8, 8, 1),
                         walk.fp_len),
        i.create_reg(Code.INC_RM64, R.RDX),
    ]
    extra["skip_code"] = len(code)
    code += [
        i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RSI, walk.stride)),
        i.create_reg(Code.INC_RM64, R.RCX),
        i.create_reg_reg(Code.CMP_R64_RM64, R.RCX, R.R14),
    ]
    jumps.append((len(code), Code.JB_REL32_64, "iov"))
    code.append(None)
    guard()
    code += _gather(walk, R.RDX, walk.fp_len, walk.fps, 16)
    # From here r14 counts the fingerprints (r8 keeps it over the call).
    code.append(i.create_reg_reg(Code.MOV_R64_RM64, R.R14, R.R8))
    # The names' iovecs, from the fingerprints copied whole (rax bytes):
    # {str + str_length, NAME} for each frame's qualname, then its filename,
    # each str once (an iovec costs the kernel a page pin: most frames
    # share their file, a recursion its name), in the order first met.
    code.append(i.create_reg_reg(Code.TEST_RM64_R64, R.RAX, R.RAX))
    branch(Code.JLE_REL32_64, "done")
    code += [
        i.create_reg_reg(Code.MOV_R64_RM64, R.R8, R.RAX),
        i.create_reg_reg(Code.XOR_R32_RM32, R.ECX, R.ECX),
        i.create_reg_reg(Code.XOR_R32_RM32, R.EDX, R.EDX),
        i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RBX, walk.fps - walk.at)),
        i.create_reg_mem(Code.LEA_R64_M, R.R11, _mem(R.RBX, walk.iovs - walk.at)),
    ]
    names = len(code)
    code.append(i.create_reg_i32(Code.CMP_RM64_IMM32, R.R8, walk.fp_len))
    branch(Code.JB_REL32_64, "named")
    for field in ("qualname", "filename"):
        code += [
            i.create_reg_mem(Code.MOV_R64_RM64, R.RAX, _mem(R.RSI, getattr(walk, field))),
            i.create_reg_mem(Code.LEA_R64_M, R.RAX, _mem(R.RAX, walk.str_length)),
            i.create_reg_reg(Code.XOR_R32_RM32, R.R9D, R.R9D),
        ]
        extra[f"search_{field}"] = len(code)  # iovecs [0, rdx): one from rax already?
        code.append(i.create_reg_reg(Code.CMP_R64_RM64, R.R9, R.RDX))
        branch(Code.JAE_REL32_64, f"add_{field}")
        code += [
            i.create_reg_mem(Code.LEA_R64_M, R.R10, MemoryOperand(R.R9, R.R9, 1)),
            i.create_reg_mem(Code.CMP_R64_RM64, R.RAX, MemoryOperand(R.R11, R.R10, 8)),
        ]
        branch(Code.JE_REL32_64, f"skip_{field}")
        code.append(i.create_reg(Code.INC_RM64, R.R9))
        branch(Code.JMP_REL32_64, f"search_{field}")
        extra[f"add_{field}"] = len(code)  # (room for `frames` strs: more are not copied)
        code.append(i.create_reg_i32(Code.CMP_RM64_IMM32, R.RDX, walk.frames))
        branch(Code.JAE_REL32_64, f"skip_{field}")
        code += [
            i.create_reg_mem(Code.LEA_R64_M, R.R10, MemoryOperand(R.RDX, R.RDX, 1)),
            i.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(R.R11, R.R10, 8), R.RAX),
            i.create_mem_i32(Code.MOV_RM64_IMM32, MemoryOperand(R.R11, R.R10, 8, 8, 1), NAME),
            i.create_reg(Code.INC_RM64, R.RDX),
        ]
        extra[f"skip_{field}"] = len(code)
    code += [
        i.create_reg_mem(Code.LEA_R64_M, R.RSI, _mem(R.RSI, walk.fp_len)),
        i.create_reg_i32(Code.SUB_RM64_IMM32, R.R8, walk.fp_len),
        i.create_reg(Code.INC_RM64, R.RCX),
        i.create_reg_reg(Code.CMP_R64_RM64, R.RCX, R.R14),
    ]
    jumps.append((len(code), Code.JB_REL32_64, "names"))
    code.append(None)
    named = len(code)
    code.append(i.create_reg_reg(Code.TEST_RM64_R64, R.RDX, R.RDX))
    branch(Code.JE_REL32_64, "done")
    guard()
    code += _gather(walk, R.RDX, NAME, walk.names, 40)
    sealed = len(code)
    if seal is not None:  # a traced process may have a new filter: no frames, counted
        jumps.append((len(code), Code.JMP_REL32_64, "done"))
        code.append(None)
        sealed = len(code)
        counted = i.create_mem(Code.INC_RM64, _mem(R.RAX))
        counted.has_lock_prefix = True
        code += [i.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, seal.sealed), counted,
                 i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RBX, 0), 0),
                 i.create_mem_i32(Code.MOV_RM64_IMM32, _mem(R.RBX, 8), 0)]
    done = len(code)
    code += [i.create_reg(Code.POP_R64, r) for r in reversed(_SAVED)]
    labels = {"done": done, "mine": mine, "fps": fps, "loop": loop, "iov": iov, "hit": hit,
              "miss": miss, "direct": direct, "got": got, "names": names, "named": named,
              "sealed": sealed, **extra}
    for at, kind, name in jumps:
        code[at] = i.create_branch(kind, 1 + labels[name])
    final: list[Instruction] = []
    for n, insn in enumerate(code):
        assert insn is not None
        insn.ip = 1 + n  # ips as labels
        final.append(insn)
    enc = BlockEncoder(64)
    enc.add_many(final)
    raw = bytes(enc.encode(0x1000))
    return [i.create_declare_byte(raw[k:k + 16]) for k in range(0, len(raw), 16)]


__all__ = ["CALLED", "Copied", "PyWalk", "Seal", "copied", "copied_key", "py_walk", "walk_block"]
