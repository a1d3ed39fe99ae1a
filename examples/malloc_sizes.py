"""Which sizes does `ls` ask malloc for? uprobes' Python API, on the kernel's uprobes.

Run as root: .venv/bin/python examples/malloc_sizes.py
"""

import collections

import uprobes

sizes: collections.Counter[int] = collections.Counter()
failed = 0

s = uprobes.Session()


@s.probe("libc:malloc size=%di:u64", comm="ls")
def on_malloc(ev: uprobes.Event) -> None:
    sizes[ev.args["size"]] += 1


@s.probe("r libc:malloc ptr=$retval:x64", comm="ls")
def on_return(ev: uprobes.Event) -> None:
    global failed
    failed += ev.args["ptr"] == 0


status = s.spawn(["ls", "-l", "/usr"])
for size, n in sizes.most_common(5):
    print(f"{size:>8} bytes x {n}")
print(f"ls exited {status}: {sum(sizes.values())} malloc calls, {failed} failed, "
      f"{s.events} events, {s.lost} lost")
