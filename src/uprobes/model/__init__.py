"""What every layer above the language shares: resolved probes (model/probe.py),
the events an engine gives (event.py), the registry of probes and consumers
(model/registry.py) and the filters of hits by task and condition (filters.py)."""
