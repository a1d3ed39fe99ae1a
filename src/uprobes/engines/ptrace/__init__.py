"""The ptrace engine: the uprobes mechanism itself, in user space.

`PtraceTracer` (tracer.py) has the kernel engine's interface. The parts:
tasks.py (threads and address spaces), breakpoints.py (int3 sites per
address space), xol.py (the out-of-line area injected into a tracee),
relocate.py (displaced instructions), fetch.py (argument values),
retprobes.py (return instances), rendezvous.py (libraries loaded later),
orphan.py and rettable.py (a kill -9 of uprobes), sharedmem.py (memory
mapped by a tracee and by us).
"""
