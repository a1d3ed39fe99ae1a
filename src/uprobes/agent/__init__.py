"""`uprobes agent`: probes kept in place, what they measure served to the
systems a fleet already runs: a Prometheus `/metrics` endpoint, OTLP/HTTP
(spans and metrics), Pyroscope (folded stacks).

config.py reads what to probe (command line or TOML), probes.py makes it a
Session whose handlers count into metrics.py, processes.py learns what each
process runs as it starts, runner.py keeps the session running and reloads
it on SIGHUP; prometheus.py, otlp.py and pyroscope.py are the sinks.
"""
