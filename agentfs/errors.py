"""Error types shared by every layer.

`FsError` carries an errno from the engine to a front end, which turns it into a
FUSE reply.  `UserError` is what the CLI prints as one line and an exit code.
"""

from __future__ import annotations

import errno
import os


class FsError(Exception):
    """A filesystem operation failed with a specific errno (never a bug)."""

    def __init__(self, err: int, detail: str = "") -> None:
        super().__init__(err, detail or os.strerror(err))
        self.errno = err

    @classmethod
    def from_os(cls, exc: OSError) -> FsError:
        return cls(exc.errno or errno.EIO, str(exc))


class UserError(Exception):
    """A problem the user can fix: printed as one line, never as a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
