"""bpf(2): maps, programs and their instructions, the few that uprobes needs.

What 6.18.44 here (integrity lockdown, CONFIG_KPROBES unset) allows, as
checked for docs/filters.md: tracepoint programs attached to a tracepoint's
perf event (PERF_EVENT_IOC_SET_BPF; a second perf event of the same
tracepoint gets EEXIST, and one program runs on every CPU), array maps made
with BPF_F_MMAPABLE that a process maps and reads without a system call
(inherited by a fork child, like any shared mapping), and atomic adds to a
map value. Not allowed: `bpf_probe_write_user` (the verifier refuses the
helper under lockdown), fentry/fexit programs (EPERM), kprobes (no PMU).
A refused program's error carries the last lines of the verifier's log.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Sequence

from uprobes.errors import KernelError
from uprobes.sys import perf
from uprobes.sys.libc import ioctl, kernel_errors, syscall

# Commands (include/uapi/linux/bpf.h enum bpf_cmd).
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD = 0, 2, 3, 5
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY = 1, 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_F_MMAPABLE = 1 << 10
PASS = 1
"""What a tracepoint program returns to leave the event to perf: 0 drops the
hit for every perf event of that tracepoint (trace_call_bpf), another
tool's counter of it included."""
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)

# Helpers by number (the kernel's FUNC_MAPPER order).
HELPER_MAP_LOOKUP_ELEM = 1
HELPER_MAP_UPDATE_ELEM = 2
HELPER_MAP_DELETE_ELEM = 3
HELPER_GET_CURRENT_PID_TGID = 14

_ATTR_BYTES = 144  # up to attach_btf_id and beyond; the kernel wants the rest zero
_LOG_BYTES = 1 << 16
_TRIES = 20  # loads a signal interrupts (EAGAIN) before giving up
_HINTS = {errno.EPERM: "loading BPF programs needs root (CAP_BPF and CAP_PERFMON)",
          errno.EACCES: "the verifier refused the program"}


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One `struct bpf_insn`: opcode, registers (dst low nibble), offset, immediate."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov_imm(dst: int, imm: int) -> bytes:
    return insn(0xB7, dst, imm=imm)                  # BPF_ALU64 | BPF_MOV | BPF_K


def mov_reg(dst: int, src: int) -> bytes:
    return insn(0xBF, dst, src)                      # BPF_ALU64 | BPF_MOV | BPF_X


def add_imm(dst: int, imm: int) -> bytes:
    return insn(0x07, dst, imm=imm)                  # BPF_ALU64 | BPF_ADD | BPF_K


def rsh_imm(dst: int, imm: int) -> bytes:
    return insn(0x77, dst, imm=imm)                  # BPF_ALU64 | BPF_RSH | BPF_K


def store_u32(base: int, off: int, src: int) -> bytes:
    return insn(0x63, base, src, off)                # BPF_STX | BPF_MEM | BPF_W


def store_u64(base: int, off: int, src: int) -> bytes:
    return insn(0x7B, base, src, off)                # BPF_STX | BPF_MEM | BPF_DW


def store_imm_u64(base: int, off: int, imm: int) -> bytes:
    return insn(0x7A, base, off=off, imm=imm)        # BPF_ST | BPF_MEM | BPF_DW


def load_u32(dst: int, base: int, off: int) -> bytes:
    return insn(0x61, dst, base, off)                # BPF_LDX | BPF_MEM | BPF_W


def atomic_add_u64(base: int, off: int, src: int) -> bytes:
    return insn(0xDB, base, src, off, imm=0x00)      # BPF_STX | BPF_ATOMIC | BPF_DW, BPF_ADD


def jump_if_zero(reg: int, skip: int) -> bytes:
    return insn(0x15, reg, off=skip)                 # BPF_JMP | BPF_JEQ | BPF_K, imm 0


def jump_if_not_zero(reg: int, skip: int) -> bytes:
    return insn(0x55, reg, off=skip)                 # BPF_JMP | BPF_JNE | BPF_K, imm 0


def jump_if_not_equal(reg: int, imm: int, skip: int) -> bytes:
    return insn(0x55, reg, off=skip, imm=imm)        # BPF_JMP | BPF_JNE | BPF_K


def jump_if_above(reg: int, imm: int, skip: int) -> bytes:
    return insn(0x25, reg, off=skip, imm=imm)        # BPF_JMP | BPF_JGT | BPF_K (unsigned)


def load_imm64(dst: int, value: int) -> bytes:
    """dst = a 64-bit constant: two slots."""
    value &= (1 << 64) - 1
    low, high = value & 0xFFFFFFFF, value >> 32
    return insn(0x18, dst, imm=low - (1 << 32) if low >> 31 else low) + \
        insn(0, imm=high - (1 << 32) if high >> 31 else high)


def call(helper: int) -> bytes:
    return insn(0x85, imm=helper)


def exit_() -> bytes:
    return insn(0x95)


def load_map_fd(dst: int, map_fd: int) -> bytes:
    """The map itself (BPF_PSEUDO_MAP_FD), for a helper's map argument: two slots."""
    return insn(0x18, dst, 1, imm=map_fd) + insn(0)


def load_map_value(dst: int, map_fd: int, offset: int) -> bytes:
    """A pointer `offset` bytes into the value of a one-entry array map
    (BPF_PSEUDO_MAP_VALUE): two slots."""
    return insn(0x18, dst, 2, imm=map_fd) + insn(0, imm=offset)


def _bpf(cmd: int, attr: bytearray, what: str) -> int:
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    return syscall("bpf", cmd, ctypes.addressof(buf), len(attr), what=what, hints=_HINTS)


class BpfMap:
    """A map, owned: its fd (and mapping, if any) closed on close()."""

    def __init__(self, kind: int, key_size: int, value_size: int, entries: int,
                 flags: int = 0) -> None:
        attr = bytearray(_ATTR_BYTES)
        struct.pack_into("<IIIII", attr, 0, kind, key_size, value_size, entries, flags)
        self.key_size, self.value_size = key_size, value_size
        self.fd = _bpf(BPF_MAP_CREATE, attr, f"creating a BPF map (type {kind})")
        self.memory: mmap.mmap | None = None
        if flags & BPF_F_MMAPABLE:
            with kernel_errors("mapping a BPF array map"):
                self.memory = mmap.mmap(self.fd, max(value_size * entries, mmap.PAGESIZE),
                                        mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def shared_words(cls, words: int) -> BpfMap:
        """A one-entry array of `words` u64s that this process maps: programs
        address it directly (load_map_value), readers through `memory`."""
        return cls(BPF_MAP_TYPE_ARRAY, 4, 8 * words, 1, BPF_F_MMAPABLE)

    def word(self, index: int) -> int:
        assert self.memory is not None
        return int(struct.unpack_from("<Q", self.memory, 8 * index)[0])

    def _elem(self, cmd: int, key: bytes, value: bytes | None, what: str) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value or b"", self.value_size)
        attr = bytearray(_ATTR_BYTES)
        struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, ctypes.addressof(k),
                         ctypes.addressof(v) if value is not None else 0, 0)
        _bpf(cmd, attr, what)

    def update(self, key: bytes, value: bytes) -> None:
        self._elem(BPF_MAP_UPDATE_ELEM, key, value, "updating a BPF map")

    def delete(self, key: bytes) -> bool:
        """Remove `key`; False if it was not there."""
        try:
            self._elem(BPF_MAP_DELETE_ELEM, key, None, "deleting from a BPF map")
        except KernelError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with kernel_errors("closing a BPF map"):
                os.close(fd)


class Program:
    """A loaded program, owned; refusals name the verifier's complaint."""

    def __init__(self, kind: int, code: Sequence[bytes], name: str) -> None:
        joined = b"".join(code)
        text = ctypes.create_string_buffer(joined, len(joined))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(_LOG_BYTES)
        attr = bytearray(_ATTR_BYTES)
        struct.pack_into("<IIQQ", attr, 0, kind, len(joined) // 8, ctypes.addressof(text),
                         ctypes.addressof(license_))
        struct.pack_into("16s", attr, 48, name.encode()[:15])
        what = f"loading BPF program {name}"
        for _ in range(_TRIES):
            try:
                self.fd = _bpf(BPF_PROG_LOAD, attr, what)
                break
            except KernelError as e:
                # EAGAIN: a signal came during the verifier's run (our interval
                # timers): it gave up, and runs again. Any other refusal runs
                # again with the verifier's log on, for its complaint.
                if e.errno == errno.EAGAIN:
                    continue
                if struct.unpack_from("<I", attr, 24)[0]:
                    said = [line for line in log.value.decode(errors="replace").splitlines()
                            if line and not line.startswith("processed ")]
                    if said:
                        raise KernelError(f"{e}: the verifier says: {said[-1]}",
                                          e.errno) from None
                    raise
                struct.pack_into("<IIQ", attr, 24, 1, _LOG_BYTES, ctypes.addressof(log))
        else:
            raise KernelError(f"{what}: interrupted {_TRIES} times", errno.EAGAIN)
        self.name = name

    def attach_to_tracepoint(self, event_id: int) -> perf.PerfEvent:
        """Run this program at every hit of tracepoint `event_id`, on every
        CPU and task, while the returned (enabled) perf event is open."""
        attr = perf.tracepoint_attr(event_id, clockid=None, sample_type=0)
        event = perf.PerfEvent.open(attr, pid=-1, cpu=perf.online_cpus()[0],
                                    what=f"tracepoint {event_id} for BPF {self.name}")
        try:
            ioctl(event.fd, PERF_EVENT_IOC_SET_BPF, self.fd,
                  what=f"attaching BPF {self.name} to tracepoint {event_id}")
            event.enable()
        except KernelError:
            event.close()
            raise
        return event

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with kernel_errors(f"closing BPF program {self.name}"):
                os.close(fd)
