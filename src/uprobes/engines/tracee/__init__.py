"""What the ptrace and trap-free engines both do to a stopped tracee.

xol.py (the out-of-line area mapped into a tracee, and system calls injected
into one of its stopped threads), relocate.py and emulate.py (instructions
moved out of their place and run or emulated there), fetch.py and
fetch_strings.py (a probe's argument values from registers and memory).
Below both engines: it imports neither.
"""
