"""User stacks: unwinding a copy of a thread's stack (DWARF CFI from
`.eh_frame`, frame pointers where there is none) and naming its frames."""
