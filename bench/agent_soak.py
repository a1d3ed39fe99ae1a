"""The agent under a steady load while its OTLP backend goes away and comes back.

    sudo .venv/bin/python -m bench.agent_soak [--seconds 600] [--rate 10000] [--flap 60]

A program calls a function RATE times a second for SECONDS (its entry and
return probed: a count per probe, a latency histogram, a span per call);
the agent pushes to a local OTLP receiver that answers 503 (away) and 200
(back) by turns every FLAP seconds, and serves /metrics, which this bench
reads every second. Asserted at the end (exit status 1 and the reason if
not):

- every hit counted or counted as dropped: the entry and return counts
  plus the records the kernel dropped equal twice the calls the program
  made (it prints its exact count);
- probing never waits for the backend: hits are counted through every
  phase the backend is away;
- memory stays flat: in the second half of the run the agent's RSS never
  exceeds the most it had in the first half (at least one away-and-back
  cycle, which fills the span queue, the series and the allocator's arenas
  once) by more than 10%.

The agent runs with `--duration` (the load's time and SETTLE seconds more)
and the counts are read from the last /metrics page it prints as it ends:
the kernel says how many records it dropped at the end of a run exactly
(hits counted in the kernel less records read), while a run goes on only
as the drop records it writes into the rings.

Printed: calls, counted, dropped by reason, spans the receiver took, RSS
at the reference point and its maximum after, the agent's CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.otlp_receiver import Receiver

SOURCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "agent_load.c"


def build(out: Path) -> Path:
    exe = out / "agent_load"
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(exe), str(SOURCE)],
                   check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SETTLE_S = 15


def scrape(port: int) -> dict[str, float]:
    """uprobes_hits_total per probe and uprobes_dropped_total per reason, now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return parse(r.read().decode())


def parse(text: str) -> dict[str, float]:
    """uprobes_hits_total per probe and uprobes_dropped_total per reason on a page."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "uprobes_hits_total":
                key = s.labels["probe"]
            elif s.name in ("uprobes_dropped_total", "uprobes_series_overflow_total"):
                key = s.name + ":" + (s.labels.get("reason") or s.labels.get("metric", ""))
            else:
                continue
            out[key] = out.get(key, 0) + s.value
    return out


@dataclass
class Soak:
    calls: int = 0
    counted: dict[str, float] = field(default_factory=dict)
    rss: list[tuple[float, int]] = field(default_factory=list)
    away_gains: list[float] = field(default_factory=list)
    spans: int = 0
    refused: int = 0
    cpu: float = 0.0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def run(seconds: float, rate: int, flap: float, out: Path, max_growth: float = 0.10) -> Soak:
    exe = build(out)
    port = free_port()
    result = Soak()
    env = dict(os.environ, OTEL_METRIC_EXPORT_INTERVAL="1000", OTEL_EXPORTER_OTLP_TIMEOUT="2")
    with Receiver() as receiver:
        agent = subprocess.Popen(
            [sys.executable, "-m", "uprobes", "agent", "--prometheus", f"127.0.0.1:{port}",
             "--otlp", receiver.url, "--duration", str(seconds + SETTLE_S),
             f"{exe}:hit", f"r {exe}:hit"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        load = None
        try:
            assert agent.stderr is not None
            said = ""
            while "probe lines in place" not in said:
                line = agent.stderr.readline()
                if not line:
                    raise SystemExit(f"the agent ended: {said}")
                said += line
            load = subprocess.Popen([str(exe), str(rate), str(seconds)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert load.stdout is not None and load.stdin is not None
            assert load.stdout.readline().strip() == "ready"
            load.stdin.write("go\n")
            load.stdin.flush()
            start = time.monotonic()
            cpu0 = cpu_s(agent.pid)
            away_since: float | None = None
            counted_then = 0.0
            while load.poll() is None:
                time.sleep(1)
                now = time.monotonic() - start
                result.rss.append((now, rss_kib(agent.pid)))
                counts = scrape(port)
                total = sum(v for k, v in counts.items() if k.startswith("uprobes/hit"))
                phase_away = int(now // flap) % 2 == 1
                if phase_away and receiver.up:
                    receiver.up, away_since, counted_then = False, now, total
                elif not phase_away and not receiver.up:
                    receiver.up = True
                    if away_since is not None:
                        result.away_gains.append(total - counted_then)
            result.seconds = time.monotonic() - start
            result.cpu = cpu_s(agent.pid) - cpu0
            assert load.stdout is not None
            done = load.stdout.read().split()
            result.calls = int(done[done.index("done") + 1])
            receiver.up = True
            page, err = agent.communicate(timeout=SETTLE_S + 120)  # it ends by --duration
            result.counted = parse(page)
        finally:
            if load is not None and load.poll() is None:
                load.kill()
                load.wait()
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.communicate()
        if agent.returncode != 0:
            result.failures.append(f"the agent exited {agent.returncode}")
        result.spans = sum(1 for _ in receiver.spans())
        result.refused = receiver.refused
    _judge(result, flap, max_growth)
    return result


def _accounted(counts: dict[str, float]) -> float:
    return (counts.get("uprobes/hit", 0) + counts.get("uprobes/hit__return", 0)
            + counts.get("uprobes_dropped_total:ring_full", 0))


def _judge(r: Soak, flap: float, max_growth: float) -> None:
    accounted = _accounted(r.counted)
    if accounted != 2 * r.calls:
        r.failures.append(f"{2 * r.calls:,} hits made, {accounted:,.0f} counted or dropped")
    if not r.away_gains or min(r.away_gains) <= 0:
        r.failures.append(f"hits counted while the backend was away: {r.away_gains}")
    cycle, after = _rss(r, flap)
    if cycle and after:
        if max(after) > max(cycle) * (1 + max_growth):
            r.failures.append(f"RSS grew from {max(cycle)} KiB to {max(after)} KiB "
                              f"(over {max_growth:.0%})")
    else:
        r.failures.append("the soak was shorter than three away-and-back phases")


def _rss(r: Soak, flap: float) -> tuple[list[int], list[int]]:
    """RSS samples in the first half of the run (at least one away-and-back
    cycle: the span queue, the series and the allocator's arenas filled
    once), and in the second half."""
    half = max(r.seconds / 2, 3 * flap)
    return [kib for t, kib in r.rss if t < half], [kib for t, kib in r.rss if t >= half]


def report(r: Soak, flap: float) -> str:
    cycle, after = _rss(r, flap)
    dropped = {k.split(":", 1)[1]: int(v) for k, v in r.counted.items()
               if k.startswith("uprobes_dropped_total:")}
    lines = [
        f"calls {r.calls:,} in {r.seconds:.0f} s ({r.calls / max(r.seconds, 1):,.0f}/s)",
        f"counted entry {r.counted.get('uprobes/hit', 0):,.0f} return "
        f"{r.counted.get('uprobes/hit__return', 0):,.0f} dropped {dropped}",
        f"spans received {r.spans:,}; pushes refused while away {r.refused:,}",
        f"hits counted in each away phase {[int(g) for g in r.away_gains]}",
        f"RSS max in the first half {max(cycle) if cycle else 0} KiB, in the second "
        f"{max(after) if after else 0} KiB (every 10 s: {[kib for t, kib in r.rss][::10]}); "
        f"agent CPU {r.cpu:.1f} s "
        f"({100 * r.cpu / max(r.seconds, 1):.0f}% of a core)",
    ]
    lines.append("FAILED: " + "; ".join(r.failures) if r.failures else "ok")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--rate", type=int, default=10000)
    p.add_argument("--flap", type=float, default=60)
    p.add_argument("--max-growth", type=float, default=0.10,
                   help="the RSS growth from the first half to the second that fails the "
                        "soak (a fraction; default 0.10)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        result = run(args.seconds, args.rate, args.flap, Path(out), args.max_growth)
    print(report(result, args.flap), flush=True)
    raise SystemExit(1 if result.failures else 0)


if __name__ == "__main__":
    main()
