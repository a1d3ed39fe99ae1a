"""Other tools on the bench workload: bpftrace, `perf probe` + `perf stat`, frida.

For each: a per-hit run (the workload once under the tool: what the tool
counted and the workload's own loop time, as a bench.measure.Outcome) and an
attach timer (place N probes on libc functions the tool's way, then remove
them: seconds each way).  A tool that is missing raises Skip saying so; the
test suite never needs any of them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.measure import Outcome, Skip, run_checked
from bench.workload import Workload, loop_ns
from uprobes.model.probe import ResolvedProbe


def require(executable: str) -> None:
    if shutil.which(executable) is None:
        raise Skip(f"{executable} is not installed")


def _frida() -> Any:
    try:
        import frida  # type: ignore[import-not-found]
    except ImportError:
        raise Skip("the frida package is not installed (pip install -e '.[bench]')") from None
    return frida


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# bpftrace ----------------------------------------------------------------

def bpftrace_run(w: Workload, function: str, calls: int) -> Outcome:
    """`bpftrace -e 'uprobe:EXE:FUNCTION { @ = count(); }' -c WORKLOAD`."""
    require("bpftrace")
    program = f"uprobe:{w.exe}:{function} {{ @ = count(); }}"
    proc = run_checked(["bpftrace", "-e", program, "-c", " ".join(w.argv(calls, function))])
    found = re.search(r"^@: (\d+)$", proc.stdout, re.M)
    return Outcome(int(found[1]) if found else 0, loop_ns=loop_ns(proc.stdout))


def _bpftrace_ready(probes: Sequence[ResolvedProbe]) -> tuple[float, float]:
    """Seconds from start to BEGIN (which bpftrace fires once every probe is
    attached) and from BEGIN to exit, for a program probing `probes`."""
    body = "".join(f"uprobe:{p.path}:{p.symbol},\n" for p in probes).rstrip(",\n")
    program = 'BEGIN { printf("ready %lld\\n", nsecs); exit(); }\n'
    if body:
        program += body + " { @ = count(); }\n"
    with tempfile.NamedTemporaryFile("w", suffix=".bt") as script:
        script.write(program)
        script.flush()
        # bpftrace refuses more than 512 probes unless told (its own safety limit).
        env = dict(os.environ, BPFTRACE_MAX_PROBES=str(max(512, 2 * len(probes))))
        start = _now_ns()
        proc = subprocess.run(["bpftrace", script.name], capture_output=True, text=True,
                              env=env, timeout=900)
        end = _now_ns()
    if proc.returncode != 0:
        raise RuntimeError(f"bpftrace: exit {proc.returncode}: "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    found = re.search(r"^ready (\d+)$", proc.stdout, re.M)
    if not found:
        raise RuntimeError(f"bpftrace printed no ready line: {proc.stdout[-300:]}")
    ready = int(found[1])
    return (ready - start) / 1e9, (end - ready) / 1e9


def bpftrace_attach(probes: Sequence[ResolvedProbe]) -> tuple[int, float, float]:
    """(placed, attach s, detach s); bpftrace's own start-up (a program with
    no uprobe) is subtracted."""
    require("bpftrace")
    base_up, base_down = _bpftrace_ready([])
    up, down = _bpftrace_ready(probes)
    return len(probes), max(0.0, up - base_up), max(0.0, down - base_down)


# perf probe + perf stat --------------------------------------------------

_PERF_BATCH = 100   # perf probe takes at most 128 events per command


@contextmanager
def perf_probes(path: str, link_addrs: Sequence[int]) -> Iterator[list[str]]:
    """`perf probe -x PATH -a GROUP:pI=0xADDR` for each address (by address:
    the workload's functions are assembly, with no DWARF for perf to find them
    by name); yields the event names, deletes them on every exit path."""
    require("perf")
    group = f"ubench{os.getpid()}"
    events = [f"{group}:p{i}" for i in range(len(link_addrs))]
    try:
        for first in range(0, len(link_addrs), _PERF_BATCH):
            adds = []
            for i in range(first, min(first + _PERF_BATCH, len(link_addrs))):
                adds += ["-a", f"{events[i]}={link_addrs[i]:#x}"]
            run_checked(["perf", "probe", "-q", "-x", path, *adds], timeout=300)
        yield events
    finally:
        subprocess.run(["perf", "probe", "-q", "-d", f"{group}:*"], capture_output=True,
                       timeout=300)


def perf_stat_run(event: str, w: Workload, function: str, calls: int) -> Outcome:
    """`perf stat -e EVENT -- WORKLOAD`: the count perf reports."""
    proc = run_checked(["perf", "stat", "-x,", "-e", event, "--", *w.argv(calls, function)])
    found = re.search(rf"^(\d+),[^,]*,{re.escape(event)},", proc.stderr, re.M)
    return Outcome(int(found[1]) if found else 0, loop_ns=loop_ns(proc.stdout))


def perf_attach(probes: Sequence[ResolvedProbe]) -> tuple[int, float, float]:
    """Seconds to create the events with `perf probe` and to delete them
    (perf stat then enables them per run, as our `count` does at attach)."""
    require("perf")
    addrs = [p.link_addr for p in probes if p.link_addr is not None]
    start = time.perf_counter()
    with perf_probes(probes[0].path, addrs) as events:
        up = time.perf_counter() - start
        start = time.perf_counter()
    return len(events), up, time.perf_counter() - start


# frida --------------------------------------------------------------------

# One JavaScript callback per hit (Interceptor.attach), counting; at exit()
# the count is sent and the process held until the bench has it.
_FRIDA_COUNT = """
let n = 0;
Interceptor.attach(ptr('%s'), { onEnter() { n++; } });
Interceptor.attach(Module.getGlobalExportByName('exit'), {
  onEnter() { send(n); recv('ack', () => {}).wait(); }
});
"""

# Frida refuses some functions ("unable to intercept"): those are counted out.
_FRIDA_ATTACH = """
const libc = Process.getModuleByName('%s');
let n = 0, placed = 0;
for (const off of [%s]) {
  try { Interceptor.attach(libc.base.add(off), { onEnter() { n++; } }); placed++; }
  catch (e) {}
}
send(placed);
"""


def frida_run(w: Workload, function: str, calls: int, source: str = _FRIDA_COUNT) -> Outcome:
    """The workload started held (BENCH_WAIT), frida attached with an
    Interceptor on the function (`source`: the script, the function's
    address for its `%s`, sending the count at exit), then released."""
    frida = _frida()
    proc = subprocess.Popen(w.argv(calls, function), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, BENCH_WAIT="1"))
    assert proc.stdin is not None and proc.stdout is not None
    try:
        word, addr = proc.stdout.readline().split()
        session = frida.attach(proc.pid)
        script = session.create_script(source % addr)
        counted: list[int] = []
        got = threading.Event()

        def on_message(message: dict[str, Any], data: object) -> None:
            if message.get("type") == "send":
                counted.append(int(message["payload"]))
                script.post({"type": "ack"})
                got.set()
            elif message.get("type") == "error":
                got.set()
                raise RuntimeError(message.get("description"))

        script.on("message", on_message)
        script.load()
        proc.stdin.write("go\n")
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait(timeout=600)
        got.wait(timeout=10)
        return Outcome(counted[0] if counted else 0, loop_ns=loop_ns(out))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def frida_attach(probes: Sequence[ResolvedProbe]) -> tuple[int, float, float]:
    """Interceptors on N libc functions in a sleeping process: seconds for
    the script to load (attach) and unload (detach), frida's own attach to
    the process and an empty script's load subtracted."""
    frida = _frida()
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        time.sleep(0.05)   # let it exec
        libc = Path(probes[0].path).name
        session = frida.attach(sleeper.pid)
        try:
            times = []
            for batch in ([], [p.link_addr for p in probes if p.link_addr is not None]):
                script = session.create_script(
                    _FRIDA_ATTACH % (libc, ",".join(str(a) for a in batch)))
                said: list[dict[str, Any]] = []
                script.on("message", lambda message, data: said.append(message))  # noqa: B023
                start = time.perf_counter()
                try:
                    script.load()
                except frida.TransportError as e:
                    time.sleep(0.2)
                    raise RuntimeError(f"frida: {e} while hooking {len(batch)} functions; "
                                       f"the target's status: {sleeper.poll()}") from None
                up = time.perf_counter() - start
                for _ in range(100):
                    if said:
                        break
                    time.sleep(0.01)
                if not said or said[0].get("type") != "send":
                    raise RuntimeError(f"frida: {said[0] if said else 'no answer'}")
                start = time.perf_counter()
                script.unload()
                times.append((int(said[0]["payload"]), up, time.perf_counter() - start))
        finally:
            session.detach()
    finally:
        sleeper.kill()
        sleeper.wait()
    (_, base_up, base_down), (n, up, down) = times
    return n, max(0.0, up - base_up), max(0.0, down - base_down)
