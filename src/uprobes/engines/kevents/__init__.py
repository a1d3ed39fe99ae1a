"""The kernel's own events beside the probes' hits (`trace --kernel`), for either engine.

decode.py names what `--kernel` asks for and how each tracepoint's raw
record decodes; records.py walks what a ring hands over into rows
(`model.kevent.KernelRow`); source.py opens the perf events for the traced
threads only (the kernel filters: one event per task and CPU, inherited by
the threads and children it makes) and reads their rings.
"""
