"""The kernel engine: the kernel's own uprobes, through tracefs and perf_event."""
