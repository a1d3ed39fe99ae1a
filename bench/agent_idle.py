"""The agent's own CPU while it keeps many probes and is scraped now and then.

    sudo .venv/bin/python -m bench.agent_idle [--probes 1000] [--seconds 120]
                                              [--scrape 15] [--rate 10000]
                                              [--mode counts|events|ptrace] [--processes 1]

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

`--mode ptrace` measures the second goal: 100,000 calls a second of one
function timed by latency probes (an entry and a return line) costs the
agent under 5% of a core. The agent runs `-e ptrace`: the calls are timed
inside the program (the ptrace engine's trap-free timing), and the agent
follows the program's processes, half of `--processes` started before it
and half after (found by the kernel's process events). Its CPU there is its
own and its orphan watchers' (its child processes); the calls it counted
between the first and the last scrape, per second, are checked against
RATE, and the programs' own CPU share is printed too. The window starts
3 s after every process is followed: an attach's one-off costs (its orphan
watcher's start-up, about 0.2 s of CPU) are not in it.
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
_SETTLE_S = 3.0


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


def _end(agent: subprocess.Popen[str]) -> None:
    """SIGTERM, as a service manager stops it; killed if it takes too long."""
    agent.terminate()
    try:
        agent.wait(timeout=120)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


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
        _end(agent)
    share = 100 * (c1 - c0) / (t1 - t0)
    return (f"{'counts-only' if counts_only else 'events':11}: {probes} probes placed in "
            f"{placed:.1f} s; {scrapes} scrapes of {series} series over {t1 - t0:.0f} s; the "
            f"agent's CPU {c1 - c0:.2f} s = {share:.2f}% of a core")


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (its orphan watchers)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _timed(page: str) -> float:
    """The calls of f0 counted on a /metrics page, all processes."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
               if line.startswith("uprobes_call_duration_seconds_count{"))


def _followed(page: str) -> int:
    for line in page.splitlines():
        if line.startswith("uprobes_followed_processes "):
            return int(float(line.split()[1]))
    return 0


def measure_ptrace(exe: Path, rate: int, processes: int, seconds: float, every: float) -> str:
    """The agent on the ptrace engine timing f0 in `processes` programs, each
    calling it `rate` times a second."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    before = processes - processes // 2
    loads = [subprocess.Popen([str(exe), str(rate)]) for _ in range(before)]
    agent = subprocess.Popen([sys.executable, "-m", "uprobes", "agent", "-e", "ptrace",
                              "--prometheus", f"127.0.0.1:{port}", f"{exe}:f0", f"r {exe}:f0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stderr is not None
        line = agent.stderr.readline()
        if "probe lines in place" not in line:
            raise SystemExit(f"the agent ended: {line}{agent.stderr.read()[-500:]}")
        loads += [subprocess.Popen([str(exe), str(rate)]) for _ in range(processes - before)]
        deadline = time.monotonic() + _READY_S
        while _followed(scrape(url)) < processes:
            if time.monotonic() > deadline:
                raise SystemExit("the agent did not follow every process")
            time.sleep(0.1)
        time.sleep(_SETTLE_S)  # each attach's one-off costs (its watcher's start) done
        watchers = _children(agent.pid)
        t0, c0 = time.monotonic(), cpu_seconds(agent.pid)
        w0 = sum(cpu_seconds(w) for w in watchers)
        p0 = sum(cpu_seconds(p.pid) for p in loads)
        first = _timed(scrape(url))
        scrapes, page = 1, ""
        while time.monotonic() - t0 < seconds:
            time.sleep(min(every, max(0.0, seconds - (time.monotonic() - t0))))
            page = scrape(url)
            scrapes += 1
        t1, c1 = time.monotonic(), cpu_seconds(agent.pid)
        w1 = sum(cpu_seconds(w) for w in watchers)
        p1 = sum(cpu_seconds(p.pid) for p in loads)
        last = _timed(page)
    finally:
        _end(agent)
        for p in loads:
            p.kill()
            p.wait()
    elapsed = t1 - t0
    cpu = (c1 - c0) + (w1 - w0)
    timed = 100 * (last - first) / elapsed / (rate * processes)
    series = page.count("uprobes_call_duration_seconds_count{")
    return (f"ptrace     : {processes} processes, {rate * processes} calls/s timed {timed:.1f}%; "
            f"{scrapes} scrapes of {series} series over {elapsed:.0f} s; the agent's CPU "
            f"{cpu:.2f} s = {100 * cpu / elapsed:.2f}% of a core (watchers {w1 - w0:.2f} s); "
            f"the programs' {100 * (p1 - p0) / elapsed:.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--scrape", type=float, default=15.0)
    p.add_argument("--rate", type=int, default=10000, help="calls a second, all functions")
    p.add_argument("--only-counts", action="store_true", help="skip the events mode")
    p.add_argument("--mode", choices=("counts", "events", "ptrace"),
                   help="one mode only (ptrace: latency probes timed in the programs, "
                        "--rate calls a second in each of --processes)")
    p.add_argument("--processes", type=int, default=1,
                   help="with --mode ptrace: programs calling f0 (half started after the agent)")
    args = p.parse_args()
    if args.mode == "ptrace":
        with tempfile.TemporaryDirectory(prefix="uprobes-agent-idle-") as tmp:
            exe = program(Path(tmp), 1)
            print(measure_ptrace(exe, args.rate, args.processes, args.seconds, args.scrape),
                  flush=True)
        return
    modes = {"counts": (True,), "events": (False,)}.get(args.mode or "", (True, False))
    if args.only_counts:
        modes = (True,)
    with tempfile.TemporaryDirectory(prefix="uprobes-agent-idle-") as tmp:
        exe = program(Path(tmp), args.probes)
        load = subprocess.Popen([str(exe), str(args.rate)])
        try:
            for counts_only in modes:
                print(measure(exe, args.probes, args.seconds, args.scrape, counts_only),
                      flush=True)
        finally:
            load.kill()
            load.wait()
    print(f"(the program called its {args.probes} functions {args.rate} times a second)")


if __name__ == "__main__":
    main()
