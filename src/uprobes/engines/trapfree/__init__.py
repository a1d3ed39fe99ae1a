"""The trap-free engine: probes that cost the program no stop.

A jump patch (jumppatch.py) replaces the instructions at a probe with a
`jmp` to a trampoline (trampoline.py) that counts the hit in a shared
counter or, for `trace`, copies the probe's registers and stack words into
a ring the program shares with us (recording.py: what a probe records and
the code that records it; reader.py: the rings read back into hits). sharedmem.py maps memory
both the tracee and we see; layout.py owns every binary format the
generated code and our readers share.

The ptrace engine drives it (it owns the stopped threads the patches are
placed through); this package imports nothing of engines.ptrace nor of
engines.kernel.
"""
