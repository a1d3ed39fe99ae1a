"""Measurements, not tests: each module is runnable (`python -m bench.NAME --help`).

workload.py builds the shared workload (a loop calling one noinline function
N times) and measure.py turns timed runs into per-hit figures; engines' and
tools' benches build on both.
"""
