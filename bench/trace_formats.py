"""How fast each trace file format writes, hit by hit, and how big it gets.

    python -m bench.trace_formats [--calls N]

Feeds N calls (an entry and a return each, paired into a slice) straight
into the renderer, no engine: what the format itself costs per hit on
top of reading the rings. Prints hits/s and bytes/hit for the native
Perfetto trace and the Chrome JSON.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

from uprobes.lang.ast import FetchType
from uprobes.model.event import Hit, ProbeInfo
from uprobes.render.chrome_json import ChromeJsonRenderer
from uprobes.render.perfetto import PerfettoRenderer


def _hits(calls: int, entry: ProbeInfo, ret: ProbeInfo) -> list[Hit]:
    hits: list[Hit] = []
    for i in range(calls):
        hits.append((1000 + 2 * i, 7, 7, 0, entry.name, "bench", 0x1000, None, (i,)))
        hits.append((1001 + 2 * i, 7, 7, 0, ret.name, "bench", 0x2000, 0x1000, (i,)))
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50_000)
    calls = parser.parse_args().calls
    entry = ProbeInfo("uprobes/f", "p", (("n", FetchType("s64")),))
    ret = ProbeInfo("uprobes/f__return", "r", (("v", FetchType("s64")),))
    infos = {entry.name: entry, ret.name: ret}
    hits = _hits(calls, entry, ret)

    def perfetto() -> Callable[[], int]:
        out = io.BytesIO()
        r = PerfettoRenderer(out, infos, {entry.name})
        r.hits(hits)
        r.summary(len(hits), 0)
        return lambda: len(out.getvalue())

    def chrome() -> Callable[[], int]:
        out = io.StringIO()
        r = ChromeJsonRenderer(out, infos, {entry.name})
        r.hits(hits)
        r.summary(len(hits), 0)
        return lambda: len(out.getvalue().encode())

    print(f"{'format':<12} {'hits/s':>10} {'bytes/hit':>10}")
    for name, run in (("perfetto", perfetto), ("chrome-json", chrome)):
        start = time.perf_counter()
        size = run()
        elapsed = time.perf_counter() - start
        print(f"{name:<12} {len(hits) / elapsed:>10.0f} {size() / len(hits):>10.1f}")


if __name__ == "__main__":
    main()
