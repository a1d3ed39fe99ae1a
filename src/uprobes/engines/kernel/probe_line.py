"""A resolved probe as its uprobe_events line (what the kernel engine writes
to tracefs, and what `uprobes resolve` shows)."""

from __future__ import annotations

from uprobes.errors import SpecError
from uprobes.lang.ast import Arg, Deref, FetchArg, FetchExpr, Register, UsdtTarget
from uprobes.lang.fetchargs import REGISTERS
from uprobes.lang.grammar import parse
from uprobes.lang.names import kernel_event_name
from uprobes.lang.render import render_fetcharg, render_path
from uprobes.model.probe import ResolvedProbe, VdsoKey
from uprobes.resolve.abi import at_ret_site, lower_fetcharg


def _at_ret_site_arg(arg: FetchArg, spec_text: str) -> FetchArg:
    expr = at_ret_site(arg.expr)
    if expr is None:
        raise SpecError(f"{arg.name} reads the stack pointer, which a probe on the ret "
                        "cannot give as a uretprobe would", spec_text, 0)
    return FetchArg(arg.name, expr, arg.type, arg.text)


def _has_arg(expr: FetchExpr) -> bool:
    return isinstance(expr, Arg) or (isinstance(expr, Deref) and _has_arg(expr.base))


def kernel_cannot_read(arg: FetchArg) -> bool:
    """Whether an argument reads a register no fetcharg names (an SSE
    register, where a DWARF location may put a float)."""
    expr = arg.expr
    while isinstance(expr, Deref):
        expr = expr.base
    return isinstance(expr, Register) and expr.name not in REGISTERS


def _register_of(arg: FetchArg) -> str:
    expr = arg.expr
    while isinstance(expr, Deref):
        expr = expr.base
    return expr.name if isinstance(expr, Register) else "?"


def kernel_can_name(path: str) -> bool:
    """uprobe_events splits a line at whitespace and has no quoting, so the
    kernel engine cannot name a file whose path holds any."""
    return not any(c.isspace() for c in path)


def kernel_line(probe: ResolvedProbe, ret_site: int | None = None, *,
                for_kernel: bool = True) -> str:
    """The uprobe_events line for `probe`:
    `p:GRP/EVENT PATH:0xOFF[(0xREF)] NAME=FETCHARG[:TYPE]...` (or `r:`).

    With `ret_site` (one of `probe.ret_sites`), the return probe as an entry
    probe on that `ret`, fetching what the uretprobe would (`at_ret_site`).
    An event name the kernel would refuse (a C++ label) is made a C
    identifier. The line is checked with our kernel-faithful parser, so a SpecError here
    carries the kernel's own message for it. Without `for_kernel` (to show
    the line), a path the kernel cannot name is quoted as our language
    writes it, instead of refused."""
    if isinstance(probe.key, VdsoKey):
        raise SpecError("vDSO probes have no uprobe_events form (no file to name)",
                        probe.spec.text, 0)
    usdt = probe.usdt_args if isinstance(probe.spec.target, UsdtTarget) else None
    if usdt is None and probe.is_return and any(_has_arg(a.expr) for a in probe.args):
        raise SpecError("$argN is not available on return probes with the kernel engine",
                        probe.spec.text, 0)
    path = probe.path
    if not kernel_can_name(path):
        if for_kernel:
            raise SpecError("The kernel cannot probe a file whose path has whitespace",
                            probe.spec.text, 0, "uprobe_events splits lines at spaces; "
                            "use -e ptrace")
        path = render_path(path)
    place = f"{path}:0x{probe.file_offset if ret_site is None else ret_site:x}"
    if probe.ref_ctr_offset:
        place += f"(0x{probe.ref_ctr_offset:x})"
    lowered = [lower_fetcharg(a, usdt) for a in probe.args]
    vector = next((a for a in lowered if kernel_cannot_read(a)), None)
    if vector is not None:
        raise SpecError(f"{vector.name} is in register {_register_of(vector)}: the kernel's "
                        "uprobe fetchargs read the general registers only", probe.spec.text, 0,
                        "use -e ptrace, which reads SSE registers")
    if ret_site is not None and probe.guard is None:
        # (a py: function's return sites are no `ret`s: what is fetched there
        # is the state before it, as the ptrace engine's probe sees it)
        lowered = [_at_ret_site_arg(a, probe.spec.text) for a in lowered]
    kind = "r" if probe.is_return and ret_site is None else "p"
    head = f"{kind}:{probe.group}/{kernel_event_name(probe.event)}"
    args = [render_fetcharg(a) for a in lowered]
    line = " ".join([head, place, *args])
    parse(line)
    return line
