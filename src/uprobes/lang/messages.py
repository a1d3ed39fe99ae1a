"""Error texts: the kernel's own words (kernel/trace/trace_probe.h ERRORS) and ours.

The kernel strings are copied as facts so that a line our parser rejects reads
exactly like the tracefs `error_log` entry the kernel would write for it.
"""

from __future__ import annotations

# ---- kernel wording (trace_probe.h, Linux 6.x)
BAD_REFCNT = "Invalid reference counter offset"
REFCNT_OPEN_BRACE = "Reference counter brace is not closed"
BAD_REFCNT_SUFFIX = "Reference counter has wrong suffix"
BAD_UPROBE_OFFS = "Invalid uprobe offset"
BAD_ADDR_SUFFIX = "Invalid probed address suffix"
NO_GROUP_NAME = "Group name is not specified"
GROUP_TOO_LONG = "Group name is too long"
BAD_GROUP_NAME = "Group name must follow the same rules as C identifiers"
NO_EVENT_NAME = "Event name is not specified"
EVENT_TOO_LONG = "Event name is too long"
BAD_EVENT_NAME = "Event name must follow the same rules as C identifiers"
RETVAL_ON_PROBE = "$retval is not available on probe"
BAD_ARG_NUM = "Invalid argument number"
BAD_VAR = "Invalid $-variable specified"  # older kernels: "valiable"
BAD_REG_NAME = "Invalid register name"
BAD_MEM_ADDR = "Invalid memory address"
BAD_IMM = "Invalid immediate value"
IMMSTR_NO_CLOSE = "String is not closed with '\"'"
BAD_FILE_OFFS = "Invalid file offset value"
SYM_ON_UPROBE = "Symbol is not available with uprobe"
TOO_MANY_OPS = "Dereference is too much nested"
DEREF_NEED_BRACE = "Dereference needs a brace"
BAD_DEREF_OFFS = "Invalid dereference offset"
DEREF_OPEN_BRACE = "Dereference brace is not closed"
COMM_CANT_DEREF = "$comm can not be dereferenced"
BAD_FETCH_ARG = "Invalid fetch argument"
ARRAY_NO_CLOSE = "Array is not closed"
BAD_ARRAY_SUFFIX = "Array has wrong suffix"
BAD_ARRAY_NUM = "Invalid array size"
ARRAY_TOO_BIG = "Array number is too big"
BAD_TYPE = "Unknown type is specified"
BAD_STRING = "String accepts only memory argument"
BAD_BITFIELD = "Invalid bitfield"
ARG_NAME_TOO_LONG = "Argument name is too long"
NO_ARG_NAME = "Argument name is not specified"
BAD_ARG_NAME = "Argument name must follow the same rules as C identifiers"
USED_ARG_NAME = "This argument name is already used"
ARG_TOO_LONG = "Argument expression is too long"
NO_ARG_BODY = "No argument expression"
NOSUP_BTFARG = "BTF is not available or not supported"
NOFENTRY_ARGS = "$arg* can be used only on function entry or exit"
NEED_STRING_TYPE = "$comm and immediate-string only accepts string type"
TOO_MANY_ARGS = "Too many arguments are specified"
# trace.c pr_warn, not error_log: the write fails with EINVAL.
LINE_TOO_LONG = "Line length is too long: Should be less than 4094"

# ---- our own wording (the kernel has none: it returns EINVAL silently)
EMPTY_LINE = "Empty probe line"
MULTI_LINE = "A probe spec is a single line"
NO_PLACE = ("Probe point is not specified (PATH:OFFSET, PATH:SYMBOL, usdt:PATH:PROVIDER:NAME "
            "or :vdso:SYMBOL)")
BAD_PLACE = "Probe point must be PATH:OFFSET or PATH:SYMBOL[+OFFSET]"
NO_PATH = "Path is missing before ':'"
PY_POINT_RETURN = "%yield and %resume are points of their own, not returns: drop the r or %return"
BAD_PY_NAME = "A Python function is MODULE.QUALNAME (json.dumps, __main__.Job.run)"
QUOTE_NOT_CLOSED = "Quoted path is not closed with '\"'"
QUOTED_PATH = "A quoted path must be followed by ':'"
SPACE_HINT = 'a path with spaces is written in double quotes: "/opt/my app/bin":main'
NO_SYMBOL = "Offset or symbol is missing after ':'"
BAD_SYMBOL = "A symbol cannot start with this character"
BAD_SYMBOL_OFFS = "Invalid symbol offset"
BAD_USDT = "USDT probe must be usdt:PATH:PROVIDER:NAME"
USDT_RETURN = "USDT probes cannot be return probes"
USDT_SUFFIX = "USDT probes take no %return or reference counter"
BAD_VDSO = "vDSO probe must be :vdso:[/IMAGE:]SYMBOL[+OFFSET] or :vdso:[/IMAGE:]OFFSET"
BAD_VDSO_IMAGE = "vDSO image must be /64, /32 or /x32, followed by ':'"
VDSO_REFCNT = "vDSO probes take no reference counter"
BAD_CLEAR = "Clear command must be -:[GROUP/]EVENT"
CLEAR_ARGS = "Clear command takes no arguments"
CLEAR_NOT_FIRST = "Clear command must start at the beginning of the line"
SUBREGISTER_TYPE = "Type is wider than the register"
SUBREGISTER_ADDRESS = "Part of a register cannot be dereferenced"
INTERNAL = "uprobes bug: the probe parser failed on this line"


class TokenError(Exception):
    """Internal: an error at `offset` inside one token; the line parser adds
    the token's position. Never escapes `uprobes.lang.parse`."""

    def __init__(self, message: str, offset: int, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.detail = detail
