"""The agent's own CPU while it keeps many probes and is scraped now and then.

    sudo .venv/bin/python -m bench.agent_idle [--probes 1000] [--seconds 120]
                                              [--scrape 15] [--rate 10000]

The goal (issue 14): exporting the counts of 1,000 probes every 15 s costs
the agent under 1% of a core. A generated program has PROBES functions and
calls them in turn, RATE calls a second; the agent (`--counts-only`: the
kernel counts each probe's hits) probes every one of them system-wide and
serves /metrics, which this bench reads every SCRAPE seconds, as a
Prometheus would, for SECONDS once the probes are in place. The agent's CPU
is its process's user+system time over that window, from /proc; the hits
cost the program that makes them, in the kernel. The same is measured
without `--counts-only` (every hit an event the agent labels in Python)
for comparison, unless `--only-counts`.

Printed: per mode, probes placed and how long placing took, the scrapes
and their series, the calls made, and the agent's CPU share.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_READY_S = 600.0


def program(out: Path, n: int) -> Path:
    """A program with functions f0..f{n-1}, calling them in turn RATE times a
    second (argv[1]) until killed."""
    src = out / "many.c"
    lines = ["#include <stdlib.h>", "#include <time.h>", "static volatile long sink;"]
    lines += [f"__attribute__((noinline)) void f{i}(void) {{ sink += {i}; }}" for i in range(n)]
    table = ", ".join(f"f{i}" for i in range(n))
    lines += [f"static void (*const fns[{n}])(void) = {{ {table} }};",
              "int main(int argc, char **argv) {",
              "  long rate = atol(argv[1]); struct timespec t0, now;",
              "  clock_gettime(CLOCK_MONOTONIC, &t0);",
              "  for (long i = 0;; i++) {",
              f"    fns[i % {n}]();",
              "    if (i % 100 == 0) for (;;) { clock_gettime(CLOCK_MONOTONIC, &now);",
              "      double s = (now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9;",
              "      if (i < s * rate) break; struct timespec nap = {0, 1000000};",
              "      nanosleep(&nap, NULL); }",
              "  }", "}"]
    src.write_text("\n".join(lines) + "\n")
    exe = out / "many"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True)
    return exe


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


def measure(exe: Path, probes: int, seconds: float, every: float, counts_only: bool) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    mode = ["--counts-only"] if counts_only else []
    start = time.monotonic()
    agent = subprocess.Popen([sys.executable, "-m", "uprobes", "agent", *mode, "--prometheus",
                              f"127.0.0.1:{port}", f"{exe}:f[0-9]*"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stderr is not None
        deadline = time.monotonic() + _READY_S
        while time.monotonic() < deadline:
            line = agent.stderr.readline()
            if not line or "probe lines in place" in line:
                break
        if agent.poll() is not None:
            raise SystemExit(f"the agent ended: {agent.stderr.read()[-500:]}")
        placed = time.monotonic() - start
        t0, c0 = time.monotonic(), cpu_seconds(agent.pid)
        scrapes = series = 0
        while time.monotonic() - t0 < seconds:
            time.sleep(min(every, max(0.0, seconds - (time.monotonic() - t0))))
            series = scrape(url).count("uprobes_hits_total{")
            scrapes += 1
        t1, c1 = time.monotonic(), cpu_seconds(agent.pid)
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=120)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    share = 100 * (c1 - c0) / (t1 - t0)
    return (f"{'counts-only' if counts_only else 'events':11}: {probes} probes placed in "
            f"{placed:.1f} s; {scrapes} scrapes of {series} series over {t1 - t0:.0f} s; the "
            f"agent's CPU {c1 - c0:.2f} s = {share:.2f}% of a core")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--scrape", type=float, default=15.0)
    p.add_argument("--rate", type=int, default=10000, help="calls a second, all functions")
    p.add_argument("--only-counts", action="store_true", help="skip the events mode")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="uprobes-agent-idle-") as tmp:
        exe = program(Path(tmp), args.probes)
        load = subprocess.Popen([str(exe), str(args.rate)])
        try:
            for counts_only in (True,) if args.only_counts else (True, False):
                print(measure(exe, args.probes, args.seconds, args.scrape, counts_only),
                      flush=True)
        finally:
            load.kill()
            load.wait()
    print(f"(the program called its {args.probes} functions {args.rate} times a second)")


if __name__ == "__main__":
    main()
