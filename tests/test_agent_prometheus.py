"""The agent scraped by a real Prometheus server (Debian's `prometheus`,
started here on a loopback port with its own config and storage): PromQL
through its HTTP API gives the fixture's known number of calls, and the
histogram quantile that the agent's buckets give."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import CALLS_PER_ROUND, Agent, Caller, free_port, pick, wait_for_count
from conftest import Compiler, need, wait_until

ROUNDS = 2
QUANTILE = 0.5
DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-uprobes-agent.json"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Prometheus server on a free loopback port (its config file is to be
    written by the test: (port, config path)); stopped afterwards."""
    need(shutil.which("prometheus") is not None,
         "Debian's prometheus package is needed (./bootstrap test installs it)")
    yield free_port(), tmp_path / "prometheus.yml"


def _start_prometheus(port: int, config: Path, storage: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={storage}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(up, "Prometheus to be ready", 90)
    return proc


def _results(port: int, promql: str) -> list[dict[str, object]]:
    """An instant query's results (the server must have taken the query)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=30) as r:
        answer = json.load(r)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def _query(port: int, promql: str) -> float | None:
    """The value of an instant query's single result, None if it has none."""
    result = _results(port, promql)
    if not result:
        return None
    assert len(result) == 1, result
    return float(str(result[0]["value"][1]))  # type: ignore[index]


def _dashboard_queries() -> list[str]:
    """The PromQL of every panel of the Grafana dashboard, its variables
    given the values that select everything."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    return [e.replace("$instance", ".*").replace("$probe", ".*")
            .replace("$__rate_interval", "1m") for e in exprs]


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile() as PromQL defines it, over (upper bound,
    cumulative count) pairs sorted by bound: linear within the bucket the
    rank falls in; the first bucket starts at 0."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    raise AssertionError("rank past the last bucket")


def test_prometheus_scrapes_the_agent_count_and_quantile(
        prometheus: tuple[int, Path], tracefs: Path, compile_c: Compiler,
        tmp_path: Path) -> None:
    exe = compile_c("agent_calls.c")
    prom_port, prom_config = prometheus
    port = free_port()
    prom_config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: uprobes\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    agent = Agent("--prometheus", f"127.0.0.1:{port}", f"{exe}:handle", f"r {exe}:handle")
    server = None
    try:
        agent.ready()
        server = _start_prometheus(prom_port, prom_config, tmp_path / "data")
        caller = Caller(exe)
        for _ in range(ROUNDS):
            caller.round()
        calls = ROUNDS * CALLS_PER_ROUND
        who = f'probe="uprobes/handle",executable="{exe}"'
        got = wait_for_count(agent, port, "uprobes_call_duration_seconds_count", calls,
                             probe="uprobes/handle", executable=str(exe))
        counted: list[float | None] = [None]

        def scraped() -> bool:
            counted[0] = _query(prom_port, f"sum(uprobes_hits_total{{{who}}})")
            return counted[0] == calls

        wait_until(scraped, f"Prometheus to count {calls} calls", 90)
        quantile = _query(prom_port, f"histogram_quantile({QUANTILE}, sum by (le) "
                                     f"(uprobes_call_duration_seconds_bucket{{{who}}}))")
        # Every panel of the dashboard in docs/ is a query the server takes and
        # that finds the agent's series (rate() needs two scrapes: wait for them).
        empty: list[str] = []

        def panels_answer() -> bool:
            empty[:] = [q for q in _dashboard_queries() if not _results(prom_port, q)]
            return not empty

        wait_until(panels_answer, f"every dashboard panel to find series ({empty})", 90)
        caller.end()
    finally:
        if server is not None:
            server.terminate()
            server.communicate(timeout=60)
        status, err = agent.stop()
    assert status == 0, err
    buckets = sorted((float(dict(lb)["le"]), v) for lb, v in pick(
        got, "uprobes_call_duration_seconds_bucket", probe="uprobes/handle",
        executable=str(exe)).items())
    assert buckets[-1][1] == calls
    assert quantile is not None
    assert quantile == pytest.approx(_quantile(QUANTILE, buckets), rel=1e-9)
    assert quantile >= 0.0025 / 2  # each call sleeps 2.5 ms: its bucket starts at 2.1 ms
