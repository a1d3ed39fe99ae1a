"""The ptrace engine: the uprobes mechanism itself, in user space.

`PtraceTracer` (tracer.py) is a `Tracer` and a `Counter` (engines/base.py),
made of attach.py, loop.py, lifecycle.py and teardown.py (state.py: what they
share). The parts it uses: tasks.py (threads and address spaces), breakpoints.py (int3 sites per
address space), retprobes.py (return instances), rendezvous.py (libraries
loaded later), orphan.py and rettable.py (a kill -9 of uprobes). What it
shares with the trap-free engine it drives (engines/trapfree/) lives in
engines/tracee/ (out-of-line areas, relocation, argument fetching).
"""
