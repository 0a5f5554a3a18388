"""Error types shared by every layer, and the CLI's exit codes.

`FsError` carries an errno from the engine to a front end, which turns it into a
FUSE reply.  `UserError` is what the CLI prints as one line and an exit code; its
subclasses fix the code for a kind of problem, so a script can tell them apart:

    0   success
    1   the operation failed or was refused (EXIT_FAILURE): a branch in use, a
        policy lint finding, not root for `run`, a daemon that refused, ...
    2   usage (EXIT_USAGE): wrong, missing or malformed arguments and options, an
        invalid name (empty, '/', control characters, not UTF-8, too long)
    3   commit conflict (EXIT_CONFLICT): nothing was applied
    4   store problem (EXIT_STORE): no store found, meta.db missing, corrupt or not
        an agentfs store, a newer schema than this agentfs knows, a read-only
        store, the store's base directory gone, a database error
    5   mount problem (EXIT_MOUNT): FUSE unavailable, mountpoint busy, not empty or
        not mounted, the daemon did not start, stop or answer
    6   not found (EXIT_NOT_FOUND): an unknown branch, trash entry, request id,
        process, or a path given on the command line that does not exist
    7   `agentfs fsck` found problems that remain (EXIT_DAMAGED): not repaired,
        because --repair was not given or they need a person
    70  internal error (EXIT_INTERNAL): a bug; AGENTFS_DEBUG=1 shows the traceback
    130 interrupted (Ctrl-C)

`agentfs run` and `agentfs exec` exit with their command's status once it runs.
"""

from __future__ import annotations

import errno
import os

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_STORE = 4
EXIT_MOUNT = 5
EXIT_NOT_FOUND = 6
EXIT_DAMAGED = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

# every exit status the CLI itself produces (run/exec add their command's own)
EXIT_CODES = frozenset({EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFLICT, EXIT_STORE,
                        EXIT_MOUNT, EXIT_NOT_FOUND, EXIT_DAMAGED, EXIT_INTERNAL,
                        EXIT_INTERRUPTED})


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

    default_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = self.default_code if exit_code is None else exit_code


class UsageError(UserError):
    """Wrong, missing or malformed arguments (exit 2)."""

    default_code = EXIT_USAGE


class StoreError(UserError):
    """The store cannot be used as it is (exit 4)."""

    default_code = EXIT_STORE


class MountError(UserError):
    """FUSE or a mountpoint is not usable, or a daemon misbehaved (exit 5)."""

    default_code = EXIT_MOUNT


class NotFoundError(UserError):
    """Something named on the command line does not exist (exit 6)."""

    default_code = EXIT_NOT_FOUND
