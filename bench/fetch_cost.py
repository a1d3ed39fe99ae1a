"""Cost of ArgFetcher.fetch per hit, on a live process (no tracing involved).

    nice -n -20 .venv/bin/python bench/fetch_cost.py [ROUNDS]

For a few typical probe lines: microseconds of CPU per fetch (process time,
user + system, best of 5 rounds: the machine's other load does not count)
and the /proc/PID/mem reads one fetch makes. The ptrace engine pays this on every
hit that has fetchargs, on top of the trap itself.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from uprobes.commands.resolve import parse_specs
from uprobes.engines.tracee.fetch import ArgFetcher, FetchContext
from uprobes.resolve.resolver import Resolver
from uprobes.sys.procmem import ProcessMemory
from uprobes.sys.ptrace import UserRegs

SOURCE = r"""
#include <stdio.h>
struct kv { const char *key; long value; int flags; unsigned char tag[4]; };
__attribute__((noinline)) long put(struct kv *kv, long n) { return kv->value + n; }
int main(void) {
    struct kv kv = { "alpha-key", 42, 0x1234, { 1, 2, 3, 4 } };
    long stack[8] = { 11, 22, 33, 44, 55, 66, 77, 88 };
    printf("%p %p\n", (void *)&kv, (void *)stack);
    fflush(stdout);
    char buf[8];
    fgets(buf, sizeof buf, stdin);
    return (int)put(&kv, stack[0]);
}
"""

LINES = {
    "none": "",
    "2 registers": "a=%di:x64 n=%si:s64",
    "$arg1..$arg6": "a1=$arg1 a2=$arg2 a3=$arg3 a4=$arg4 a5=$arg5 a6=$arg6",
    "1 deref": "v=+8(%di):s64",
    "4 derefs + array": "v=+8(%di):s64 f=+16(%di):b4@4/32 t=+20(%di):u8[4] s=$stack1",
    "1 string": "k=+0(+0(%di)):string",
    "kv (string + value)": "k=+0(+0(%di)):string v=+8(%di):s64",
    "3 strings + $comm": "k=+0(+0(%di)):string k2=+0(+0(%di)):string k3=+1(+0(%di)):string "
                         "c=$comm",
}


class CountingMemory:
    def __init__(self, mem: ProcessMemory) -> None:
        self.mem, self.reads = mem, 0

    def read_upto(self, runtime_addr: int, n: int) -> bytes:
        self.reads += 1
        return self.mem.read_upto(runtime_addr, n)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp, "kv")
        src = Path(tmp, "kv.c")
        src.write_text(SOURCE)
        subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True)
        proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        kv_addr, stack_addr = (int(x, 16) for x in proc.stdout.readline().split())
        regs = UserRegs()
        regs.rdi, regs.rsi, regs.rsp = kv_addr, 7, stack_addr
        ctx = FetchContext(comm="kv", file_base=0)
        print(f"{'probe args':24} {'us/fetch':>9} {'reads':>6}  values")
        try:
            with ProcessMemory(proc.pid) as mem:
                best = min(timeit.repeat(lambda: mem.read_upto(kv_addr, 8), number=rounds,
                                         repeat=5, timer=time.process_time))
                print(f"{'(one 8-byte read)':24} {best / rounds * 1e6:9.2f} {1:6}")
                for label, args in LINES.items():
                    probe = Resolver().resolve_all(parse_specs([f"{exe}:put {args}"]))[0]
                    fetcher = ArgFetcher(probe)
                    counting = CountingMemory(mem)
                    values = fetcher.fetch(regs, counting, ctx)
                    best = min(timeit.repeat(lambda fetcher=fetcher: fetcher.fetch(regs, mem, ctx),
                                             number=rounds, repeat=5, timer=time.process_time))
                    print(f"{label:24} {best / rounds * 1e6:9.2f} {counting.reads:6}  "
                          f"{values}")
        finally:
            proc.kill()
            proc.communicate()


if __name__ == "__main__":
    main()
