"""The agent's folded stacks, pushed to a Pyroscope-compatible /ingest that
a local receiver serves: the fixture's calls counted on their one path."""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agent_support import CALLS_PER_ROUND, Agent, Caller
from conftest import Compiler, wait_until


class Ingest:
    """POST /ingest?name=..&format=folded with `path count` lines: kept."""

    def __init__(self) -> None:
        self.pushes: list[tuple[dict[str, str], str]] = []
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if url.path != "/ingest":
                    self.send_response(404)
                    self.end_headers()
                    return
                query = dict(urllib.parse.parse_qsl(url.query))
                ingest.pushes.append((query, body.decode()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def counts(self, name: str) -> dict[str, int]:
        """Folded path -> count, summed over every push named `name`."""
        out: dict[str, int] = {}
        for query, body in list(self.pushes):
            if query.get("name") != name:
                continue
            for line in body.splitlines():
                path, _, n = line.rpartition(" ")
                out[path] = out.get(path, 0) + int(n)
        return out


@pytest.fixture
def ingest() -> Iterator[Ingest]:
    receiver = Ingest()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def test_folded_stacks_reach_pyroscope_ingest(ingest: Ingest, tracefs: Path,
                                              compile_c: Compiler) -> None:
    exe = compile_c("agent_calls.c")
    agent = Agent("--pyroscope", ingest.url, "--pyroscope-interval", "0.5",
                  f"{exe}:handle", f"r {exe}:handle")
    name = "uprobes.hits{probe=uprobes/handle}"
    try:
        agent.ready()
        caller = Caller(exe)
        caller.round()
        wait_until(lambda: sum(ingest.counts(name).values()) >= CALLS_PER_ROUND,
                   "the stacks at /ingest", 60)
        caller.end()
        status, err = agent.stop()
    finally:
        agent.kill()
    assert status == 0, err
    counts = ingest.counts(name)
    assert sum(counts.values()) == CALLS_PER_ROUND
    (path, n), = counts.items()  # every call from one site: one path
    frames = path.split(";")
    assert frames[0] == caller.comm and frames[-2:] == ["main", "handle"], path
    query = next(q for q, _ in ingest.pushes if q["name"] == name)
    assert query["format"] == "folded"
    assert int(query["from"]) < int(query["until"])
    # the return line asked for no stacks
    assert not any("handle__return" in q["name"] for q, _ in ingest.pushes)
