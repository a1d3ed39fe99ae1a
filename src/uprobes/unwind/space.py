"""A process's code as files: runtime addresses -> (file, link address), and
from there CFI rules and symbol names.

Maps are read from /proc/PID/maps when a process is first seen and again
when an address falls in no known mapping (a library loaded since); once
the process is gone, the last maps read still serve. The vDSO (no file) is
read from the process's memory once.
"""

from __future__ import annotations

import bisect
import os

from uprobes.elf.framerule import FrameRule
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.errors import UprobesError
from uprobes.model.event import Frame
from uprobes.resolve.vdso import read_vdso
from uprobes.sys import procfs
from uprobes.unwind.cfi import CfiTable
from uprobes.unwind.stack import RuleFinder


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.maps: list[procfs.Mapping] = []
        self.starts: list[int] = []
        self.alive = True
        self.vdso: ElfImage | None = None
        # Per code address, while the maps stay the same: the same return
        # addresses recur in every stack of a run, and walking and naming a
        # frame uncached costs several times a cached one (docs/benchmarks.md).
        self.rules: dict[int, FrameRule | None | LookupError] = {}
        self.named: dict[tuple[int, bool], Frame] = {}
        self.generation = 0  # one more at each change of the maps
        self.refresh()

    def refresh(self) -> None:
        if not self.alive:
            return
        try:
            maps = [m for m in procfs.maps(self.pid) if m.executable]
        except UprobesError:
            self.alive = False
            return
        if maps:
            maps.sort(key=lambda m: m.start)
            if maps != self.maps:
                self._set(maps)
        else:
            self.alive = False  # a zombie's maps are empty: keep the last ones

    def add(self, m: procfs.Mapping) -> None:
        """A mapping made since (it replaces what it overlaps, as mmap does)."""
        keep = [old for old in self.maps if old.end <= m.start or old.start >= m.end]
        self._set(sorted([*keep, m], key=lambda x: x.start))

    def replace(self, maps: list[procfs.Mapping]) -> None:
        """These maps (sorted) in place of the ones known."""
        self._set(list(maps))

    def _set(self, maps: list[procfs.Mapping]) -> None:
        self.maps = maps
        self.generation += 1
        self.starts = [x.start for x in maps]
        self.rules.clear()
        self.named.clear()

    def mapping(self, runtime_addr: int) -> procfs.Mapping | None:
        i = bisect.bisect_right(self.starts, runtime_addr) - 1
        if i >= 0 and self.maps[i].contains_runtime(runtime_addr):
            return self.maps[i]
        return None


class AddressSpaces:
    """Per-process address → file lookups for a run (many processes)."""

    def __init__(self) -> None:
        self._procs: dict[int, _Process] = {}
        self._images: dict[str, ElfImage | None] = {}

    def _process(self, pid: int) -> _Process:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = _Process(pid)
        return proc

    def seen(self, pid: int) -> None:
        """Note `pid`: its maps are read now if it is new (read them while
        the process lives: a hit may be walked after it exited)."""
        if pid not in self._procs:
            self._procs[pid] = _Process(pid)

    def generation(self, pid: int) -> int:
        """A number that changes when `pid`'s maps do (walks and names found
        before stand no more)."""
        return self._process(pid).generation

    def reread(self, pid: int) -> None:
        """Read `pid`'s maps now (again if known): a stack copied into a ring
        is walked later, maybe once the process is gone."""
        proc = self._procs.get(pid)
        if proc is None:
            self._procs[pid] = _Process(pid)
        else:
            proc.refresh()

    def mapped(self, pid: int, m: procfs.Mapping) -> None:
        """Process `pid` mapped `m` (a PERF_RECORD_MMAP2): known even once
        the process has exited. Its maps are read first if it is new."""
        self._process(pid).add(m)

    def forked(self, ppid: int, pid: int) -> None:
        """Process `pid` was forked from `ppid` (a PERF_RECORD_FORK): its maps
        start as a copy of the parent's as known now, so the frames of a
        child that exits before its maps are read are still named. A child
        whose maps were read while it ran keeps them; what a child mapped
        itself (its PERF_RECORD_MMAP2s, read first) stays on top."""
        parent = self._process(ppid)
        child = self._process(pid)
        if child.alive:
            return
        own = child.maps
        child.replace(parent.maps)
        for m in own:
            child.add(m)

    def locate(self, pid: int, runtime_addr: int) -> tuple[ElfImage, int, str] | None:
        """(image, link address, display path) of the code at `runtime_addr`."""
        proc = self._process(pid)
        m = proc.mapping(runtime_addr)
        if m is None:
            proc.refresh()
            m = proc.mapping(runtime_addr)
        if m is None:
            return None
        if m.path == "[vdso]":
            if proc.vdso is None:
                try:
                    proc.vdso = read_vdso(pid)
                except UprobesError:
                    return None
            vdso = proc.vdso
            return vdso, vdso.file_to_link_addr(runtime_addr - m.start), "[vdso]"
        if not m.path.startswith("/"):
            return None
        image = self._image(pid, m)
        if image is None:
            return None
        try:
            link = image.file_to_link_addr(runtime_addr - m.start + m.file_offset)
        except UprobesError:
            return None
        return image, link, m.path

    def _image(self, pid: int, m: procfs.Mapping) -> ElfImage | None:
        """The mapped file; by its own path when that is the very file mapped
        (an image reopens its path to read tables later, and
        /proc/PID/root/... is gone once the process exits), else as the
        process sees it."""
        path = m.path
        if path not in self._images:
            image = None
            candidates = [f"/proc/{pid}/root{path}", path]
            try:
                st = os.stat(path)
                if (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) == \
                        (m.inode, m.dev_major, m.dev_minor):
                    candidates.reverse()
            except OSError:
                pass
            for candidate in candidates:
                try:
                    image = ElfImage.open(candidate)
                    break
                except UprobesError:
                    continue
            self._images[path] = image
        return self._images[path]

    def rule_finder(self, pid: int) -> RuleFinder:
        """A `RuleFinder` for `uprobes.unwind.stack.unwind` in process `pid`."""
        rules = self._process(pid).rules

        def rule_for(runtime_addr: int) -> FrameRule | None:
            rule = rules.get(runtime_addr)
            if rule is None and runtime_addr not in rules:
                where = self.locate(pid, runtime_addr)
                if where is None:
                    rule = LookupError(runtime_addr)
                else:
                    image, link, _ = where
                    rule = CfiTable.load(image).rule_at(link)
                rules[runtime_addr] = rule
            if isinstance(rule, LookupError):
                raise rule
            return rule
        return rule_for

    def frame(self, pid: int, runtime_addr: int, return_address: bool = False) -> Frame:
        """Name the code at `runtime_addr`; a `return_address` is named by the
        call before it (a call can be the last instruction of a function)."""
        named = self._process(pid).named
        frame = named.get((runtime_addr, return_address))
        if frame is None:
            frame = named[(runtime_addr, return_address)] = self._name(pid, runtime_addr,
                                                                      return_address)
        return frame

    def _name(self, pid: int, runtime_addr: int, return_address: bool) -> Frame:
        where = self.locate(pid, runtime_addr - return_address)
        if where is None:
            return Frame(runtime_addr, None, None)
        image, link, path = where
        link += return_address  # `where` was found for the call before it
        try:
            sym = SymbolTable.load(image).containing(link - return_address)
        except UprobesError:
            sym = None
        if sym is None:
            return Frame(runtime_addr, path, None, link_addr=link)
        return Frame(runtime_addr, path, sym.pretty_name, link - sym.link_addr, link)
