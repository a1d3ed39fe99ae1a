"""Python stacks: the frames a CPython interpreter is running, read from its
own state in the process's memory (`_PyRuntime` -> interpreters -> thread
states -> the frame chain) with struct layouts taken from that interpreter's
build, and interleaved with the native frames they run in."""
