"""What the agent's tests share: an agent run as users run it, its /metrics
read and parsed, and the fixture whose calls it counts."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import read_fd_until, wait_until

CALLS_PER_ROUND = 20  # tests/fixtures/agent_calls.c: ROUNDS
KINDS = 5
NAP_S = 0.0025

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> Series:
    """(sample name, labels) -> value of every sample on a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def pick(series: Series, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return {lb: v for (n, lb), v in series.items() if n == name and want <= lb}


class Agent:
    """`uprobes agent ARGS...` in a process of its own, as a service runs it."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "uprobes", "agent", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cwd)
        self.err = ""

    def wait_said(self, text: str, timeout: float = 90) -> str:
        """What the agent wrote to stderr until it said `text` (it must)."""
        assert self.proc.stderr is not None
        got = read_fd_until(self.proc.stderr.fileno(), text, timeout)
        self.err += got
        assert text in got, f"the agent never said {text!r}: {self.err}"
        return got

    def ready(self) -> None:
        self.wait_said("probe lines in place")

    def metrics(self, port: int) -> Series:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            return parse_metrics(r.read().decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> tuple[int, str]:
        """Send `sig` and wait for the end: (exit status, all it wrote to stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        self.err += err.decode(errors="replace")
        return self.proc.returncode, self.err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=60)


class Caller:
    """The fixture: rounds of handle(kind) calls, on request."""

    def __init__(self, exe: Path) -> None:
        self.exe = exe
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.calls = 0

    @property
    def comm(self) -> str:
        return self.exe.name[:15]

    def round(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.calls += CALLS_PER_ROUND
        assert self.proc.stdout.readline().strip() == f"done {self.calls}"

    def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def wait_for_count(agent: Agent, port: int, name: str, total: float, timeout: float = 60,
                   **labels: str) -> Series:
    """/metrics once the samples `name` with `labels` add up to `total`
    (records reach the agent a moment after the hits)."""
    seen: list[Series] = []

    def arrived() -> bool:
        seen[:] = [agent.metrics(port)]
        return sum(pick(seen[0], name, **labels).values()) >= total

    wait_until(arrived, f"{total} in {name}{labels}", timeout)
    return seen[0]


def our_groups(pid: int) -> list[str]:
    """Tracefs groups the agent of `pid` still has."""
    for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        events = Path(root, "uprobe_events")
        if events.exists():
            return [line for line in events.read_text().splitlines()
                    if f"uprobes_{pid}/" in line]
    return []


