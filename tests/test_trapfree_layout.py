"""The trap-free engine's shared binary formats (engines/trapfree/layout.py)
against the machine code that writes them: the recording prologue, decoded
by iced-x86, addresses the ring's header words and a slot's fields at
layout's offsets, and the reader's record format unpacks the same fields."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable

import pytest
from iced_x86 import Code, Decoder, Instruction, OpKind, Register

from uprobes.engines.trapfree import layout
from uprobes.engines.trapfree.keyed import COMM, Source, comm_name
from uprobes.engines.trapfree.recording import Recipe, Waits, prologue, shape_for
from uprobes.engines.trapfree.timing import TimingBlock
from uprobes.engines.trapfree.trampoline import counting_prologue

AT = 0x7F00_0000_0000
RING = AT + 0x10_0000
WAITS = Waits(stale=1 << 33, give_up=1 << 34, skew=4096)
RECIPES = [
    Recipe(("rdi",), None),
    Recipe(("rdi", "rsi", "rdx", "rcx", "r8", "r9", "rax", "rsp"), (0, 32)),  # MAX_WORDS
    Recipe(("rip", "rax"), None, ret=True),
]


def _decode(code: bytes, at: int) -> list[Instruction]:
    return list(Decoder(64, code, ip=at))


def _memory_operands(insns: list[Instruction]) -> list[Instruction]:
    return [i for i in insns
            if any(i.op_kind(n) == OpKind.MEMORY for n in range(i.op_count))]


@pytest.mark.parametrize("recipe", RECIPES, ids=["one-reg", "regs-and-stack", "ret"])
@pytest.mark.parametrize("tls_tid", [True, False])
@pytest.mark.parametrize("shape", [layout.LONG, layout.SHORT], ids=["long", "short"])
def test_recording_code_uses_the_ring_layout(recipe: Recipe, tls_tid: bool,
                                             shape: layout.RingShape) -> None:
    # (the short ring wherever the record fits)
    assert shape_for([recipe]) == (layout.SHORT if recipe.words <= 4 else layout.LONG)
    assert shape_for([recipe, *RECIPES]) == layout.LONG
    if recipe.words > shape.words:
        return
    insns = _decode(prologue(AT, RING, recipe, 7, tls_tid, WAITS, shape), AT)
    assert not any(i.code == Code.INVALID for i in insns)
    memory = _memory_operands(insns)

    # The header words and the slots' start, RIP-relative: iced gives the absolute address.
    rip_relative = {i.memory_displacement - RING for i in memory if i.memory_base == Register.RIP}
    # (placed before the tid was seen at the thread pointer: the RING_TLS flag says when it is)
    assert rip_relative == {layout.HEAD, layout.TAIL, layout.LOST, layout.STALLED,
                            layout.WAITERS, layout.HEARTBEAT, layout.DATA_OFFSET,
                            layout.COMMITTED, *(() if tls_tid else (layout.RING_TLS,))}
    # The commit is counted by a locked increment, after the sequence word's store.
    counted = [n for n, i in enumerate(insns) if i.code == Code.INC_RM64
               and i.memory_displacement == RING + layout.COMMITTED]
    seq_store = [n for n, i in enumerate(insns) if i.memory_base == Register.RCX
                 and i.op0_kind == OpKind.MEMORY and i.memory_displacement == layout.SLOT_SEQ]
    assert len(counted) == 1 and insns[counted[0]].has_lock_prefix
    assert seq_store == [counted[0] - 1]

    # A slot's fields: every store through rcx (the slot's address).
    slot_stores = sorted(i.memory_displacement for i in memory
                         if i.memory_base == Register.RCX and i.op0_kind == OpKind.MEMORY)
    assert slot_stores == sorted([layout.SLOT_SEQ, layout.SLOT_TSC, layout.SLOT_TID,
                                  layout.SLOT_PROBE,
                                  *(layout.SLOT_VALUES + 8 * n for n in range(recipe.words))])
    assert max(slot_stores) + 8 <= shape.slot_bytes

    # The slot arithmetic: room while head - tail < slots; index & (slots-1) << shift.
    immediates = {(i.code, i.immediate(1)) for i in insns
                  if i.op_count == 2 and i.op0_kind == OpKind.REGISTER and i.op0_register
                  == Register.RCX and i.op1_kind in (OpKind.IMMEDIATE8, OpKind.IMMEDIATE32TO64)}
    assert (Code.CMP_RM64_IMM32, shape.slots) in immediates
    assert (Code.AND_RM64_IMM32, shape.slots - 1) in immediates
    assert (Code.SHL_RM64_IMM8, shape.shift) in immediates
    assert 1 << shape.shift == shape.slot_bytes
    assert layout.DATA_OFFSET + shape.slots * shape.slot_bytes == layout.RING_BYTES
    assert layout.SHAPES[shape.slot_bytes] is shape


def test_the_reader_unpacks_the_fields_the_code_writes() -> None:
    slot = bytearray(layout.SLOT_BYTES)
    fields = {layout.SLOT_SEQ: 11, layout.SLOT_TSC: 22, layout.SLOT_PROBE: 5}
    for off, value in fields.items():
        struct.pack_into("<Q", slot, off, value)
    struct.pack_into("<II", slot, layout.SLOT_TID, 4242, 3 << layout.CPU_BITS | 9)
    for n in range(layout.MAX_WORDS):
        struct.pack_into("<Q", slot, layout.SLOT_VALUES + 8 * n, 100 + n)

    assert layout.RECORD.size == layout.SLOT_BYTES and layout.LONG.record is layout.RECORD
    rec = layout.RECORD.unpack(slot)
    short = layout.SHORT.record
    assert short.size == layout.SHORT.slot_bytes
    assert short.unpack(slot[:short.size]) == rec[:layout.REC_VALUES + layout.SHORT.words]
    assert rec[layout.REC_SEQ] == 11 and rec[layout.REC_TSC] == 22
    assert rec[layout.REC_TID] == 4242
    aux = rec[layout.REC_AUX]
    assert aux & layout.CPU_MASK == 9 and aux >> layout.CPU_BITS == 3
    assert rec[layout.REC_PROBE] == 5 and rec[layout.REC_PROBE_HIGH] == 0
    assert list(rec[layout.REC_VALUES:]) == [100 + n for n in range(layout.MAX_WORDS)]


def test_ring_header_words_sit_before_the_slots_on_their_own_cache_lines() -> None:
    words = [layout.HEAD, layout.TAIL, layout.LOST, layout.STALLED, layout.WAITERS,
             layout.COMMITTED, layout.HEARTBEAT, layout.RING_TLS, layout.SLOT_SIZE]
    assert len({w // 64 for w in words}) == len(words)
    assert max(words) + 8 <= layout.DATA_OFFSET
    assert layout.RING_BYTES == layout.DATA_OFFSET + layout.SLOTS * layout.SLOT_BYTES


def test_counting_code_increments_the_counter_it_is_given() -> None:
    counter = AT + 0x2000 + 3 * layout.COUNTER_STRIDE
    insns = _decode(counting_prologue(AT, counter), AT)
    incs = [i for i in insns if i.code == Code.INC_RM64]
    assert len(incs) == 1 and incs[0].has_lock_prefix
    assert incs[0].memory_base == Register.RIP and incs[0].memory_displacement == counter
    assert layout.COUNTER_BLOCK_BYTES % layout.COUNTER_STRIDE == 0


def test_timing_code_uses_the_timing_layout() -> None:
    """The entry's and the return's code (timing.py) address the block's
    header words RIP-relative, and a thread's row through rdi at layout's
    offsets; the bucket arithmetic is layout.hist_bucket's."""
    from uprobes.engines.trapfree.timing import entry_code, return_code
    block = AT + 0x100_0000
    header = {layout.TIMING_NOROW, layout.TIMING_DEEP, layout.TIMING_UNPAIRED,
              layout.TIMING_TLS, layout.TIMING_ABANDONED, layout.TIMING_ROWS_OFFSET}
    func = 5
    for code, row_fields in (
            (entry_code(AT, block), {layout.ROW_OWNER, layout.ROW_CLAIMED, layout.ROW_DEPTH,
                                     layout.ROW_STACK - layout.ENTRY_BYTES}),
            (return_code(AT, block, func), {layout.ROW_OWNER, layout.ROW_CLAIMED,
                                            layout.ROW_DEPTH,
                                            layout.ROW_HISTS + func * layout.HIST_BYTES})):
        insns = _decode(code, AT)
        assert not any(i.code == Code.INVALID for i in insns)
        memory = _memory_operands(insns)
        rip_relative = {i.memory_displacement - block for i in memory
                        if i.memory_base == Register.RIP}
        assert rip_relative <= header and layout.TIMING_ROWS_OFFSET in rip_relative
        through_row = {i.memory_displacement for i in memory if i.memory_base == Register.RDI}
        assert row_fields <= through_row, (row_fields, through_row)
        muls = {i.immediate(2) for i in insns if i.code == Code.IMUL_R64_RM64_IMM32}
        assert muls == {layout.ROW_BYTES}
    assert layout.TIMING_ABANDONED + 8 <= layout.TIMING_ROWS_OFFSET
    assert layout.ROW_HISTS == layout.ROW_STACK + layout.STACK_DEPTH * layout.ENTRY_BYTES
    assert layout.hist_bucket(layout.HIST_MAX_TICKS) == layout.HIST_BUCKETS - 1
    for ticks in (0, 31, 32, 33, 1000, 123_456_789, layout.HIST_MAX_TICKS):
        lo, hi = layout.hist_bounds(layout.hist_bucket(ticks))
        assert lo <= ticks <= hi and hi - lo <= max(1, lo >> layout.HIST_SUB_BITS)


def test_keyed_code_uses_the_table_layout() -> None:
    from uprobes.engines.trapfree.keyed import Source, prologue
    block, table = AT + 0x100_0000, 3
    base = layout.KEYED_TABLES_OFFSET + table * layout.TABLE_BYTES
    insns = _decode(prologue(AT, block, table, Source("rdi"), Source("rsi", size=4)), AT)
    assert not any(i.code == Code.INVALID for i in insns)
    memory = _memory_operands(insns)
    rip_relative = {i.memory_displacement - block for i in memory
                    if i.memory_base == Register.RIP}
    assert rip_relative == {base + layout.TABLE_OVERFLOW, base + layout.TABLE_ENTRIES}
    fields = {i.memory_displacement for i in memory if i.memory_base == Register.RDI}
    assert fields == {layout.KEY_STATE, layout.KEY_KEY, layout.KEY_COUNT, layout.KEY_SUM,
                      layout.KEY_MIN, layout.KEY_MAX, layout.KEY_KEY2}
    assert layout.KEY_KEY2 + 8 <= layout.KEY_ENTRY_BYTES


def test_keyed_code_and_reader_agree_when_run() -> None:
    """The keyed code run in this process (key in rdi, a signed 32-bit value
    in esi with junk above it): the reader finds each key's count, sum, min
    and max as computed here."""
    import ctypes
    import mmap
    import random

    from uprobes.engines.trapfree.keyed import KeyedBlock, Source, prologue
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, page + layout.KEYED_BYTES, prot=7)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    code = prologue(base, base + page, 2, Source("rdi"), Source("rsi", size=4, signed=True))
    buf[:len(code) + 1] = code + b"\xc3"
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint64)(base)
    want: dict[int, list[int]] = {}
    rng = random.Random(7)
    for _ in range(5000):
        key, v = rng.randrange(40), rng.randrange(-1000, 1000)
        fn(key, (v & 0xFFFFFFFF) | 0xDEAD << 32)
        w = want.setdefault(key, [0, 0, v, v])
        w[0], w[1], w[2], w[3] = w[0] + 1, w[1] + v, min(w[2], v), max(w[3], v)
    del fn
    got, overflow = KeyedBlock(memoryview(buf)[page:], base + page).read(2, True)  # type: ignore[arg-type]
    assert overflow == 0
    assert {k: [a.count, a.sum, a.min, a.max] for k, a in got.items()} == want


def test_the_commit_check_expects_consecutive_sequence_words() -> None:
    """ring._counting (the sequence words of n committed slots, by one big-integer
    expression) equals the words counted one by one, wherever the run starts."""
    from array import array

    from uprobes.engines.trapfree.ring import _counting

    for first, n in ((1, 1), (1, layout.SLOTS), (123_456_789, 4096), ((1 << 63) - 10, 10),
                     ((1 << 64) - 5, 5), (7, 3)):
        assert _counting(first, n) == array("Q", range(first, first + n)).tobytes()


def _keyed_timer_here(func: int, key_source: Source | None = None
                      ) -> tuple[mmap.mmap, Callable[[int], None], TimingBlock]:
    """A null function timed with a key (`latency --by a=%di:s32`): the
    timing entry with the key loaded from rdi, the keyed return, `ret`; run
    in this process. (the mapping, the function, the block's reader)."""
    import ctypes

    from uprobes.engines.trapfree.keyed import timing_key
    from uprobes.engines.trapfree.timing import entry_code, return_code
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, page + layout.TIMING_BYTES, prot=7)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    block = base + page
    key = timing_key(key_source or Source("rdi", size=4, signed=True), block)
    code = entry_code(base, block, key)
    code += return_code(base + len(code), block, func, keyed=True) + b"\xc3"
    buf[:len(code)] = code
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint64)(base)
    return buf, fn, TimingBlock(buf, block, page)


def test_keyed_timing_code_and_reader_agree_when_run() -> None:
    """Calls keyed by a signed 32-bit rdi (junk above it) land in the
    histogram of their (function, key), each call once; the table's layout
    is the reader's."""
    import random
    assert (layout.KH_STATE, layout.KH_FUNC, layout.KH_KEY) == (0, 8, 16)
    assert layout.KH_HIST >= layout.KH_KEY + 8 and layout.KH_BYTES % 64 == 0
    buf, fn, reader = _keyed_timer_here(func=7)
    want: dict[int, int] = {}
    rng = random.Random(3)
    for _ in range(4000):
        v = rng.randrange(-20, 20)
        fn((v & 0xFFFFFFFF) | 0xBEEF << 32)
        want[v] = want.get(v, 0) + 1
    got = reader.keyed()
    assert {k - (1 << 64) if k >= 1 << 63 else k: sum(b) for (f, k), b in got.items()
            if f == 7} == want
    assert {f for f, _ in got} == {7}
    assert reader.missed().unkeyed == 0
    del fn
    buf.close()


def test_keyed_timing_says_how_many_calls_it_could_not_key() -> None:
    """More keys than the table has places: every call is in a keyed
    histogram or in the count of calls not keyed, none lost, none twice."""
    buf, fn, reader = _keyed_timer_here(func=0)
    calls = 3 * layout.KEYED_HISTS
    for n in range(calls):
        fn(n)
    kept = sum(sum(b) for b in reader.keyed().values())
    unkeyed = reader.missed().unkeyed
    assert unkeyed > 0 and kept + unkeyed == calls
    del fn
    buf.close()


def test_timing_keyed_by_the_name_at_each_call() -> None:
    """Calls keyed by the thread's name (`latency --by comm`): a thread of
    ours renames itself between calls; each call is under the name it had."""
    import ctypes
    import threading
    buf, fn, reader = _keyed_timer_here(func=3, key_source=COMM)
    libc = ctypes.CDLL(None, use_errno=True)
    names = [b"first", b"second-name-15b", b"first"]

    def calls(call: Callable[[int], None] = fn) -> None:
        for n, name in enumerate(names):
            assert libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0) == 0  # PR_SET_NAME
            for _ in range(10 * (n + 1)):
                call(0)
    t = threading.Thread(target=calls)
    t.start()
    t.join()
    got = {comm_name(k): sum(b) for (f, k), b in reader.keyed().items()}
    assert got == {"first": 40, "second-name-15b": 20}
    del fn
    buf.close()
