"""Record now, render later: `uprobes record -o DIR`, then `replay DIR` and `report DIR`.

A recording is a directory:

    meta.json    what the run was: the probes (codec.py keeps them exactly),
                 what each trap-free probe id stands for and the TSC's rate,
                 the clocks at start and end, the command, counts and losses
    events.bin   chunks in the order the run saw them (stream.py):
                 RING  slots of a trap-free ring as they were (128 bytes each:
                       engines/trapfree/layout.py), copied with no work per record
                 OWNR  (pid, comm) of the threads in the RING chunks after it
                 HITS  hits of int3 probes and of the kernel engine, as JSON

Replay reads it back into the same `Hit` tuples a live run hands its
renderer (replay.py), so `replay` prints what `trace` would have printed and
`report` counts and times what `count` and `latency` would have. The ring
records are checked at replay as the live reader checks them: the traced
program could write its ring, and a record no probe's code can have made is
left out and counted.
"""
