"""`uprobes agent`: probes kept in place, their counts and latencies served
to the systems a fleet already runs (a Prometheus `/metrics` endpoint).

config.py reads what to probe (command line or TOML), probes.py makes it a
Session whose handlers count into metrics.py, prometheus.py serves the
metrics, runner.py keeps it running and reloads it on SIGHUP.
"""
