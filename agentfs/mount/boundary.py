"""The one rule both front ends answer errors by: engine errors are their errno,
OS errors theirs, anything else is a bug, logged with its traceback, answered EIO."""

from __future__ import annotations

import errno
import logging

from agentfs.errors import FsError

log = logging.getLogger(__name__)


def errno_for(exc: Exception, where: str) -> int:
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    log.exception("unexpected error in %s", where)
    return errno.EIO
