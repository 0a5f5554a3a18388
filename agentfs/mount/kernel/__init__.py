"""The kernel front end (`--impl kernel`): agentfs speaking the FUSE kernel protocol
itself, in Python, without libfuse.

proto    message layouts, opcodes and flags (precompiled structs)
session  mount/unmount, the request loop, notifications
ops      requests -> gate, guard and overlay (the adapter, like mfuse_ops)
daemon   serve_kernel(config, ready), like serve_mfusepy

Why: pyfuse3 and trio spend more Python CPU per request than the overlay itself;
this loop reads a request, dispatches on its opcode and writes the reply with one
system call each.  It also negotiates what pyfuse3 cannot: FOPEN_CACHE_DIR, 1 MiB
writes (MAX_PAGES) and HANDLE_KILLPRIV_V2.  Pinned mounts only.
"""
