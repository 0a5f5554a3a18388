"""The FUSE side: front ends, the daemon, the control socket, mount lifecycle."""

import os
import sys

if sys.platform.startswith("linux"):
    # mfusepy takes the first libfuse it finds; on Linux that must be libfuse3 (libfuse2
    # is often installed alongside, and lacks rename flags among other things)
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
