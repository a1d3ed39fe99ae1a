"""The agent's configuration: from the command line or a TOML file.

    [prometheus]
    listen = "127.0.0.1:9464"   # HOST:PORT of the /metrics endpoint
    max_series = 1000            # series per probe before hits overflow

    [otlp]                       # spans and metrics over OTLP/HTTP
    endpoint = "http://127.0.0.1:4318"   # "" or left out: OTEL_EXPORTER_OTLP_*

    [[probe]]
    line = "libc:malloc size=%di:u64"
    labels = ["size"]            # fetched values that label the series
    comm = ["python3"]           # only tasks of these names
    executable = "/usr/bin/python3.11"   # only processes running this file

Every probe line the language takes is a probe; an entry line and a return
line of the same function time its calls. A config error names the file,
the line and the key (`ConfigError`), so a service that fails to start,
or a reload that is refused, says what to fix.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any

from uprobes.engines.choose import ENGINES
from uprobes.errors import ConfigError, SpecError, UsageError
from uprobes.lang import parse
from uprobes.lang.ast import ProbeSpec

from .metrics import DEFAULT_MAX_SERIES

FIXED_LABELS = ("probe", "executable", "comm")
"""Labels every series has; extra labels may not take these names (nor `le`)."""

_TOP_KEYS = {"engine", "counts_only", "prometheus", "otlp", "pyroscope", "probe"}
_OTLP_KEYS = {"endpoint"}
_PYROSCOPE_KEYS = {"url", "app", "interval"}
_PROMETHEUS_KEYS = {"listen", "max_series"}
_PROBE_KEYS = {"line", "labels", "comm", "executable", "stacks"}


@dataclass(frozen=True)
class AgentProbe:
    """One configured probe: a probe line and what labels and filters its hits."""

    line: str
    labels: tuple[str, ...] = ()
    comm: tuple[str, ...] = ()
    executable: str | None = None
    stacks: bool = False
    """Count the user stacks of its hits (pushed to Pyroscope)."""

    @property
    def key(self) -> str:
        """What names this probe across reloads: unchanged, it keeps its counts."""
        return self.line


@dataclass(frozen=True)
class AgentConfig:
    probes: tuple[AgentProbe, ...]
    prometheus: tuple[str, int] | None = None
    max_series: int = DEFAULT_MAX_SERIES
    engine: str = "auto"
    source: str = "the command line"
    otlp: str | None = None
    """The OTLP/HTTP base URL; "" for the standard OTEL_EXPORTER_OTLP_* variables;
    None: no OTLP."""
    pyroscope: Pyroscope | None = None
    counts_only: bool = False
    """The kernel counts each probe's hits, read at each export (counting.py)."""


@dataclass(frozen=True)
class Pyroscope:
    """Where folded stacks go: a server's base URL, the application name, how often."""

    url: str
    app: str = "uprobes"
    interval_s: float = 10.0


def listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) -> (host, port); UsageError if not."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"listen address {text!r}: give HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def check_probe(probe: AgentProbe) -> ProbeSpec:
    """The parsed line; SpecError or UsageError for a line or label that cannot be."""
    spec = parse(probe.line)
    if not isinstance(spec, ProbeSpec):
        raise SpecError("a '-:EVENT' line clears a probe; give probes to place", probe.line, 0)
    fetched = {a.name for a in spec.args}
    for name in probe.labels:
        if name in FIXED_LABELS or name == "le":
            raise UsageError(f"label {name!r} is one the agent sets itself: name the "
                             "fetcharg otherwise (NAME=FETCHARG)")
        if name not in fetched:
            raise UsageError(f"label {name!r}: {probe.line!r} fetches no value of that name "
                             f"(it fetches: {', '.join(sorted(fetched)) or 'nothing'})")
    return spec


def from_command_line(lines: list[str], labels: list[str], comm: list[str],
                      prometheus: str | None, max_series: int, engine: str,
                      otlp: str | None = None,
                      pyroscope: Pyroscope | None = None) -> AgentConfig:
    """The quick start: every line is a probe; `labels` apply to each line
    that fetches a value of that name; with `pyroscope`, every entry line
    counts its stacks."""
    probes = []
    for line in lines:
        spec = parse(line)
        names = {a.name for a in spec.args} if isinstance(spec, ProbeSpec) else set()
        stacks = pyroscope is not None and isinstance(spec, ProbeSpec) and not spec.is_return
        probe = AgentProbe(line, tuple(n for n in labels if n in names), tuple(comm),
                           stacks=stacks)
        check_probe(probe)
        probes.append(probe)
    for name in labels:
        if not any(name in p.labels for p in probes):
            raise UsageError(f"--label {name}: no probe line fetches a value of that name")
    if max_series < 1:
        raise UsageError("--max-series must be at least 1")
    if otlp:
        check_url(otlp)
    if pyroscope is not None:
        check_url(pyroscope.url, "Pyroscope URL", "http://127.0.0.1:4040")
        if not pyroscope.interval_s > 0:
            raise UsageError("--pyroscope-interval must be more than 0")
    return AgentConfig(tuple(probes), listen_address(prometheus) if prometheus else None,
                       max_series, engine, otlp=otlp, pyroscope=pyroscope)


def check_url(url: str, what: str = "OTLP endpoint",
              example: str = "http://127.0.0.1:4318") -> str:
    """A base URL (http or https, a host); UsageError if not."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{what} {url!r}: give a base URL, e.g. {example}")
    return url


def load(path: str) -> AgentConfig:
    """The config in TOML file `path`; ConfigError (file, line, key) if it is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, None, "", f"cannot read it: {e.strerror}") from e
    text = raw.decode(errors="replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(m.group(1)) if m else None
        raise ConfigError(path, line, "", f"not TOML: {str(e).split(' (at ')[0]}") from e
    return _Reader(path, text).config(doc)


class _Reader:
    """Checks a parsed TOML document and finds the line of each key it blames."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def config(self, doc: dict[str, Any]) -> AgentConfig:
        self._unknown(doc, _TOP_KEYS, None, "")
        engine = doc.get("engine", "auto")
        if engine not in ENGINES:
            self._fail(None, "engine", f"{engine!r}: choose from {', '.join(ENGINES)}")
        counts_only = doc.get("counts_only", False)
        if not isinstance(counts_only, bool):
            self._fail(None, "counts_only", "must be true or false")
        prom = doc.get("prometheus", {})
        if not isinstance(prom, dict):
            self._fail(None, "prometheus", "must be a table ([prometheus])")
        self._unknown(prom, _PROMETHEUS_KEYS, "prometheus", "prometheus.")
        listen = None
        if "listen" in prom:
            if not isinstance(prom["listen"], str):
                self._fail("prometheus", "prometheus.listen", "must be a string HOST:PORT")
            try:
                listen = listen_address(prom["listen"])
            except UsageError as e:
                self._fail("prometheus", "prometheus.listen", str(e))
        max_series = prom.get("max_series", DEFAULT_MAX_SERIES)
        if not isinstance(max_series, int) or isinstance(max_series, bool) or max_series < 1:
            self._fail("prometheus", "prometheus.max_series", "must be an integer, at least 1")
        otlp = doc.get("otlp")
        if otlp is not None:
            if not isinstance(otlp, dict):
                self._fail(None, "otlp", "must be a table ([otlp])")
            self._unknown(otlp, _OTLP_KEYS, "otlp", "otlp.")
            endpoint = otlp.get("endpoint", "")
            try:
                if not isinstance(endpoint, str):
                    raise UsageError("must be a string URL")
                otlp = check_url(endpoint) if endpoint else ""
            except UsageError as e:
                self._fail("otlp", "otlp.endpoint", str(e))
        pyroscope = self._pyroscope(doc.get("pyroscope"))
        raw_probes = doc.get("probe", [])
        if not isinstance(raw_probes, list) or not raw_probes:
            self._fail(None, "probe", "give at least one [[probe]] table with a `line`")
        probes = tuple(self._probe(i, p) for i, p in enumerate(raw_probes))
        keys = [p.key for p in probes]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                self._fail(("probe", i), f"probe[{i}].line", f"{key!r} is configured twice")
        return AgentConfig(probes, listen, max_series, engine, self.path, otlp, pyroscope,
                           counts_only)

    def _pyroscope(self, raw: Any) -> Pyroscope | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            self._fail(None, "pyroscope", "must be a table ([pyroscope])")
        self._unknown(raw, _PYROSCOPE_KEYS, "pyroscope", "pyroscope.")
        url = raw.get("url")
        try:
            if not isinstance(url, str):
                raise UsageError("give the server's base URL, e.g. http://127.0.0.1:4040")
            check_url(url, "Pyroscope URL", "http://127.0.0.1:4040")
        except UsageError as e:
            self._fail("pyroscope", "pyroscope.url", str(e))
        app = raw.get("app", "uprobes")
        if not isinstance(app, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", app):
            self._fail("pyroscope", "pyroscope.app", "letters, digits, '_', '.', '-' only")
        interval = raw.get("interval", 10.0)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            self._fail("pyroscope", "pyroscope.interval", "seconds, more than 0")
        return Pyroscope(url, app, float(interval))

    def _probe(self, i: int, raw: Any) -> AgentProbe:
        where = ("probe", i)
        name = f"probe[{i}]"
        if not isinstance(raw, dict):
            self._fail(None, "probe", "each probe is a table: [[probe]]")
        self._unknown(raw, _PROBE_KEYS, where, f"{name}.")
        line = raw.get("line")
        if not isinstance(line, str):
            self._fail(where, f"{name}.line", "give the probe line, a string")
        labels = self._strings(raw, "labels", where, name)
        comm = self._strings(raw, "comm", where, name)
        executable = raw.get("executable")
        if executable is not None and not (isinstance(executable, str)
                                           and executable.startswith("/")):
            self._fail(where, f"{name}.executable", "must be an absolute path")
        stacks = raw.get("stacks", False)
        if not isinstance(stacks, bool):
            self._fail(where, f"{name}.stacks", "true or false")
        probe = AgentProbe(line, labels, comm, executable, stacks)
        try:
            check_probe(probe)
        except SpecError as e:
            self._fail(where, f"{name}.line", " ".join(x.strip() for x in e.lines()))
        except UsageError as e:
            self._fail(where, f"{name}.labels", str(e))
        return probe

    def _strings(self, raw: dict[str, Any], key: str, where: tuple[str, int],
                 name: str) -> tuple[str, ...]:
        value = raw.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._fail(where, f"{name}.{key}", "must be a string or a list of strings")
        return tuple(value)

    def _unknown(self, table: dict[str, Any], known: set[str],
                 where: str | tuple[str, int] | None, prefix: str) -> None:
        for key in table:
            if key not in known:
                self._fail(where, prefix + key,
                           f"unknown key (known: {', '.join(sorted(known))})")

    def _fail(self, where: str | tuple[str, int] | None, key: str, message: str) -> None:
        raise ConfigError(self.path, self._line_of(where, key.rsplit(".", 1)[-1]), key, message)

    def _line_of(self, where: str | tuple[str, int] | None, key: str) -> int | None:
        """The line of `key` in the table `where` names (None: the top level;
        `(name, i)`: the i-th `[[name]]`), or of the table's header if the
        key is not written there; None if neither is found."""
        start, end = 0, len(self.lines)
        header = None
        if where is not None:
            name, index = (where, 0) if isinstance(where, str) else where
            brackets = r"\[" if isinstance(where, str) else r"\[\["
            pattern = re.compile(rf"^\s*{brackets}\s*{re.escape(name)}\s*\]")
            found = [n for n, text in enumerate(self.lines) if pattern.match(text)]
            if index >= len(found):
                return None
            header = start = found[index]
        tables = re.compile(r"^\s*\[")
        for n in range(start + (header is not None), end):
            if tables.match(self.lines[n]):
                if where is None and n > start:
                    break
                if where is not None:
                    break
            if re.match(rf"^\s*{re.escape(key)}\s*=", self.lines[n]):
                return n + 1
        if header is not None:
            return header + 1
        for n, text in enumerate(self.lines):  # a top-level table named `key`
            if re.match(rf"^\s*\[+\s*{re.escape(key)}\s*\]", text):
                return n + 1
        return None
