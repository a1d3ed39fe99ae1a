"""Thin layers over the kernel interfaces the engines stand on, one module each.

libc (raw calls, errno -> KernelError), tracefs (+ event_format), perf
(perf_event_open, mmap rings), pmu (the `uprobe` PMU), procfs (/proc/PID),
features (what this kernel offers, for `uprobes doctor`).
"""
