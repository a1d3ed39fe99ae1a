"""The kernel's own events beside the probes' hits (`trace --kernel`), for either engine.

decode.py names what `--kernel` asks for and turns raw tracepoint records
into `KernelEvent`s; source.py opens the perf events for the traced
threads only (the kernel filters: one event per task and CPU, inherited by
the threads and children it makes) and reads their rings.
"""
