"""`count -e ptrace --if/--tid`: the filter compiled into the counting code
(engines/trapfree/filtercode.py), no record per hit; counts against what
the fixture's calls (timed.c `keys N K`: tiny(i % K) for i < N) must give."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import Compiler, wait_until

from uprobes.sys.perf import online_cpus, open_counting

UPROBES = [sys.executable, "-m", "uprobes"]
COUNTER_NOTE = "1 of 1 probes trap-free (a jump to an in-process counter, no stop per hit)"


@pytest.fixture(scope="module")
def timed(compile_c: Compiler) -> Path:
    return compile_c("timed.c", "-pthread")


def _count(timed: Path, spec: str, *argv: str, mode: tuple[str, ...] = ("keys", "20000", "200")
           ) -> tuple[int, str]:
    run = subprocess.run([*UPROBES, "count", "-e", "ptrace", *argv, f"{timed}:{spec}", "--",
                          str(timed), *mode], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    found = re.search(r"^uprobes/tiny\s+(\d+)$", run.stdout, re.M)
    return (int(found[1]) if found else 0), run.stderr


def _expected(keep: Callable[[int], bool], calls: int = 20000, keys: int = 200) -> int:
    return sum(1 for i in range(calls) if keep(i % keys))


def _s8(v: int) -> int:
    return v - 256 if v >= 128 else v


@pytest.mark.parametrize("cond,keep", [
    ("a == 7", lambda v: v == 7),
    ("a != 7", lambda v: v != 7),
    ("a < 10 || a >= 190", lambda v: v < 10 or v >= 190),
    ("a > 10 && a <= 20 && !(a & 1)", lambda v: 10 < v <= 20 and not v & 1),
    ("a == -1", lambda v: False),
], ids=["eq", "ne", "or", "and-not-mask", "none"])
def test_compiled_conditions_count_what_they_keep(timed: Path, cond: str,
                                                  keep: Callable[[int], bool]) -> None:
    got, stderr = _count(timed, "tiny a=%di:u64", "--if", cond)
    assert COUNTER_NOTE in stderr, stderr  # counted in the program, not recorded
    assert got == _expected(keep)


def test_signed_fields_compare_signed(timed: Path) -> None:
    """`a=%di:s8`: the low byte sign-extended, as the event path reads it."""
    got, stderr = _count(timed, "tiny a=%di:s8", "--if", "a < 0 && a > -50")
    assert COUNTER_NOTE in stderr
    assert got == _expected(lambda v: -50 < _s8(v) < 0)


def test_tid_filters_are_compiled(timed: Path) -> None:
    threads = ("threads", "4", "5000")
    got, stderr = _count(timed, "tiny", "--if", "tid > 0", mode=threads)
    assert COUNTER_NOTE in stderr and got == 20000
    got, stderr = _count(timed, "tiny", "--tid", "1", mode=threads)
    assert COUNTER_NOTE in stderr and got == 0


def test_what_cannot_be_compiled_is_still_filtered(timed: Path) -> None:
    """A glob on the comm is not tested in the program's code: those hits
    are recorded and filtered as before, with the same counts."""
    got, stderr = _count(timed, "tiny", "--if", f'comm ~ "{timed.name[:3]}*"',
                         mode=("tiny", "3000"))
    assert got == 3000 and "recording" in stderr, stderr


def _kernel_count(timed: Path, *argv: str, mode: tuple[str, ...], spec: str = "tiny") -> int:
    run = subprocess.run([*UPROBES, "count", *argv, f"{timed}:{spec}", "--", str(timed), *mode],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    found = re.search(r"^uprobes/tiny\s+(\d+)$", run.stdout, re.M)
    return int(found[1]) if found else 0


RENAMES = ("renames", "3000", "70")  # the thread renames itself before each 70 calls


def _evens(calls: int = 3000, block: int = 70) -> int:
    return sum(1 for i in range(calls) if (i // block) % 2 == 0)


@pytest.mark.parametrize("name", ["even", "odd"])
def test_comm_is_asked_at_each_hit(timed: Path, name: str) -> None:
    """`--comm` in the counting code: the thread renames itself every 70
    calls, by prctl and by writing its /proc comm in turn; each hit is
    counted by the name it has then, as the kernel engine counts it."""
    got, stderr = _count(timed, "tiny", "--comm", name, mode=RENAMES)
    assert COUNTER_NOTE in stderr, stderr
    want = _evens() if name == "even" else 3000 - _evens()
    assert got == want
    assert _kernel_count(timed, "--comm", name, mode=RENAMES) == want


@pytest.mark.root  # the rename word's BPF programs
def test_a_fork_child_renaming_itself_is_counted_by_its_names(timed: Path) -> None:
    """The parent's calls under its own name, then a fork child's, renaming
    itself every 70 calls (prctl and /proc in turn): the child inherits the
    rename word's mapping and the kept verdicts' tables, and each hit is
    counted by the name it has then."""
    evens = _evens()
    for name, want in (("even", evens), ("odd", 3000 - evens), (timed.name, 3000)):
        got, stderr = _count(timed, "tiny", "--comm", name, mode=("forkrenames", "3000", "70"))
        assert COUNTER_NOTE in stderr and "--comm asks the kernel" not in stderr, stderr
        assert got == want, name


@pytest.mark.root  # the rename word's BPF programs
def test_a_kept_verdict_is_not_asked_again_at_each_hit(timed: Path, tmp_path: Path) -> None:
    """With the kernel's rename word, a thread asks its name once and then
    only when the word moves (a rename or a new thread anywhere on the
    machine): counted by the kernel at each prctl entry of the program (a
    copy named uniquely, for the tracepoint's comm filter). Before, each of
    the 100,000 rejected hits made one."""
    exe = tmp_path / f"kept{os.getpid() % 100000}"
    shutil.copy(timed, exe)
    event_id = int(Path("/sys/kernel/tracing/events/syscalls/sys_enter_prctl/id").read_text())
    with ExitStack() as stack:
        events = [stack.enter_context(open_counting(event_id, cpu=cpu)) for cpu in online_cpus()]
        for event in events:
            event.set_filter(f'comm == "{exe.name}"')
            event.enable()
        got, stderr = _count(exe, "tiny", "--comm", "nobody", mode=("tiny", "100000"))
        asked = sum(event.read_count() for event in events)
    assert COUNTER_NOTE in stderr and "--comm asks the kernel" not in stderr, stderr
    assert got == 0
    assert asked < 1000, asked


def _bpf_fds(pid: int) -> tuple[int, list[tuple[int, ...]]]:
    """Process `pid`'s BPF programs (how many) and maps (type, key size,
    value size, entries) by its open fds."""
    progs, maps = 0, []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        if target == "anon_inode:bpf-prog":
            progs += 1
        elif target == "anon_inode:bpf-map":
            fields = dict(re.findall(r"^(\w+):\s+(\S+)$", info, re.M))
            maps.append(tuple(int(fields[k]) for k in
                              ("map_type", "key_size", "value_size", "max_entries")))
    return progs, maps


@pytest.mark.root  # the rename word's BPF programs
def test_a_rename_word_not_handed_over_is_detached(timed: Path, tmp_path: Path) -> None:
    """The program may hold 4 files (`ulimit -n 4`): the rename word's file
    cannot arrive, so each hit asks its name; the rename watch is closed
    then, its 3 BPF programs and its map of marks (a hash of 4096 4-byte
    keys) gone from uprobes while the program runs on (they stayed attached
    until uprobes exited before). Interrupted, the program runs to its end."""
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "--comm", "nobody",
                                f"{timed}:tiny", "--", "sh", "-c",
                                f"ulimit -n 4; exec {timed} tiny 3000000000"],
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            wait_until(lambda: "no kernel-kept rename word" in err.read_text(),
                       "the note that the rename word could not be mapped")
            progs, maps = _bpf_fds(run.pid)
        finally:
            run.send_signal(signal.SIGINT)
            out, _ = run.communicate(timeout=300)
    assert "the word's file did not arrive" in err.read_text(), err.read_text()
    assert (1, 4, 4, 4096) not in maps, maps
    assert progs <= 2, progs  # the seccomp watch's, which stays for the run
    assert "calls=3000000000" in out and run.returncode == 0, (out, err.read_text())


def test_comm_with_other_tests(timed: Path) -> None:
    """`--comm` with `--if` on a fetcharg and on the comm again, `||`, `!`:
    the compiled answer is the kernel engine's and the fixture's."""
    cond = '(a < 1000 || a >= 2900) && !(comm == "odd" && a & 1)'
    got, stderr = _count(timed, "tiny a=%di:u64", "--comm", "even", "--comm", "odd",
                         "--if", cond, mode=RENAMES)
    assert COUNTER_NOTE in stderr, stderr

    def keep(i: int) -> bool:
        odd = (i // 70) % 2 == 1
        return (i < 1000 or i >= 2900) and not (odd and i & 1)
    want = sum(1 for i in range(3000) if keep(i))
    assert got == want
    assert _kernel_count(timed, "--comm", "even", "--comm", "odd", "--if", cond,
                         mode=RENAMES, spec="tiny a=%di:u64") == want


def test_a_name_no_thread_can_have_is_said(timed: Path) -> None:
    """A name of 16 bytes or more: the kernel keeps 15, so the program
    cannot test it; the run says so and filters the records instead."""
    got, stderr = _count(timed, "tiny", "--comm", "x" * 16, mode=("tiny", "300"))
    assert got == 0 and "recording" in stderr, stderr


def test_a_name_that_is_not_utf8_is_its_bytes(timed: Path, tmp_path: Path) -> None:
    """A thread's name is bytes: `--comm` with one that is not UTF-8 (the
    command line's bytes) matches the program named so, on both engines."""
    exe = tmp_path / os.fsdecode(b"t\xffx")
    shutil.copy(timed, exe)
    got, stderr = _count(exe, "tiny", "--comm", exe.name, mode=("tiny", "300"))
    assert COUNTER_NOTE in stderr, stderr
    assert got == 300
    assert _kernel_count(exe, "--comm", exe.name, mode=("tiny", "300")) == 300


@pytest.mark.root  # pid namespaces; the rename word's BPF programs
def test_a_family_across_pid_namespaces_keeps_no_verdict_by_tid(compile_c: Compiler) -> None:
    """pidns_comm.c under `unshare -p -f`: a parent and its child, each pid 1
    of its own namespace, share the kept verdicts' tables. Keyed by tid,
    the child's verdict was taken for the parent's hits (before: 1000 for
    parentx, 100001 for kidx); the family now asks the kernel at each test,
    and a note says why."""
    exe = compile_c("pidns_comm.c", "-O1")
    for name, want in (("parentx", 101000), ("kidx", 1)):
        run = subprocess.run([*UPROBES, "count", "-e", "ptrace", "--comm", name, f"{exe}:f",
                              "--", "unshare", "-p", "-f", str(exe), "100000"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        assert "parent 101000, child 1" in run.stdout
        assert "is in a pid namespace of its own" in run.stderr, run.stderr
        found = re.search(r"^uprobes/f\s+(\d+)$", run.stdout, re.M)
        assert found is not None and int(found[1]) == want, (name, run.stdout)
