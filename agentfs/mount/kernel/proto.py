"""The FUSE kernel protocol (linux/fuse.h, 7.31 and later): opcodes, flags, and every
message layout as a precompiled `struct.Struct`.

Requests are read as one buffer: a 40-byte `fuse_in_header`, then the opcode's
argument struct, then (for some opcodes) NUL-terminated names or data.  Replies are
written as one message: a 16-byte `fuse_out_header` (length, -errno, unique) and the
opcode's reply struct.  The reply structs below include the out header, so a reply is
one `pack` call.  Byte order and sizes are the host's ("=": native order, no padding),
as the kernel writes them.
"""

from __future__ import annotations

from struct import Struct
from typing import Final

KERNEL_VERSION: Final = 7
KERNEL_MINOR: Final = 38    # the newest layout this module speaks
MIN_MINOR: Final = 31       # older kernels are refused
ROOT_ID: Final = 1

# -- opcodes ------------------------------------------------------------------------------
LOOKUP: Final = 1
FORGET: Final = 2
GETATTR: Final = 3
SETATTR: Final = 4
READLINK: Final = 5
SYMLINK: Final = 6
MKNOD: Final = 8
MKDIR: Final = 9
UNLINK: Final = 10
RMDIR: Final = 11
RENAME: Final = 12
LINK: Final = 13
OPEN: Final = 14
READ: Final = 15
WRITE: Final = 16
STATFS: Final = 17
RELEASE: Final = 18
FSYNC: Final = 20
SETXATTR: Final = 21
GETXATTR: Final = 22
LISTXATTR: Final = 23
REMOVEXATTR: Final = 24
FLUSH: Final = 25
INIT: Final = 26
OPENDIR: Final = 27
READDIR: Final = 28
RELEASEDIR: Final = 29
FSYNCDIR: Final = 30
GETLK: Final = 31
SETLK: Final = 32
SETLKW: Final = 33
ACCESS: Final = 34
CREATE: Final = 35
INTERRUPT: Final = 36
BMAP: Final = 37
DESTROY: Final = 38
IOCTL: Final = 39
POLL: Final = 40
NOTIFY_REPLY: Final = 41
BATCH_FORGET: Final = 42
FALLOCATE: Final = 43
READDIRPLUS: Final = 44
RENAME2: Final = 45
LSEEK: Final = 46
COPY_FILE_RANGE: Final = 47
SYNCFS: Final = 50
TMPFILE: Final = 51
MAX_OPCODE: Final = 64      # the dispatch table's size; larger opcodes get ENOSYS

_OPCODES: Final = (
    "LOOKUP FORGET GETATTR SETATTR READLINK SYMLINK MKNOD MKDIR UNLINK RMDIR RENAME LINK "
    "OPEN READ WRITE STATFS RELEASE FSYNC SETXATTR GETXATTR LISTXATTR REMOVEXATTR FLUSH "
    "INIT OPENDIR READDIR RELEASEDIR FSYNCDIR GETLK SETLK SETLKW ACCESS CREATE INTERRUPT "
    "BMAP DESTROY IOCTL POLL NOTIFY_REPLY BATCH_FORGET FALLOCATE READDIRPLUS RENAME2 LSEEK "
    "COPY_FILE_RANGE SYNCFS TMPFILE")
OPCODE_NAMES: Final = {globals()[name]: name.lower() for name in _OPCODES.split()}

# requests the kernel expects no reply to
NO_REPLY: Final = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# -- notifications (written with unique 0 and the code in the error field) -----------------
NOTIFY_INVAL_INODE: Final = 2
NOTIFY_INVAL_ENTRY: Final = 3
NOTIFY_STORE: Final = 4

# -- INIT flags -----------------------------------------------------------------------------
ASYNC_READ: Final = 1 << 0
POSIX_LOCKS: Final = 1 << 1
ATOMIC_O_TRUNC: Final = 1 << 3
EXPORT_SUPPORT: Final = 1 << 4
BIG_WRITES: Final = 1 << 5
DONT_MASK: Final = 1 << 6
AUTO_INVAL_DATA: Final = 1 << 12
DO_READDIRPLUS: Final = 1 << 13
READDIRPLUS_AUTO: Final = 1 << 14
ASYNC_DIO: Final = 1 << 15
WRITEBACK_CACHE: Final = 1 << 16
PARALLEL_DIROPS: Final = 1 << 18
HANDLE_KILLPRIV: Final = 1 << 19
MAX_PAGES: Final = 1 << 22
CACHE_SYMLINKS: Final = 1 << 23
HANDLE_KILLPRIV_V2: Final = 1 << 28
SETXATTR_EXT: Final = 1 << 29
INIT_EXT: Final = 1 << 30
# flags2 (the high half of the 64 INIT flags)
PASSTHROUGH_2: Final = 1 << (37 - 32)    # FUSE_PASSTHROUGH: backing files (Linux 6.9)

# -- open_out.open_flags -------------------------------------------------------------------
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_CACHE_DIR: Final = 1 << 3
FOPEN_PASSTHROUGH: Final = 1 << 7

# -- request flags -----------------------------------------------------------------------------
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8
FATTR_LOCKOWNER: Final = 1 << 9
FATTR_CTIME: Final = 1 << 10
FATTR_KILL_SUIDGID: Final = 1 << 11
GETATTR_FH: Final = 1 << 0
WRITE_KILL_SUIDGID: Final = 1 << 2
OPEN_KILL_SUIDGID: Final = 1 << 0
FSYNC_FDATASYNC: Final = 1 << 0

# -- request layouts (unpacked at offset 40, after the in header) -------------------------
IN_HEADER: Final = Struct("=IIQQIIIHH")          # len opcode unique nodeid uid gid pid extlen -
IN_HEADER_SIZE: Final = IN_HEADER.size            # 40
INIT_IN: Final = Struct("=IIII")                 # major minor max_readahead flags
INIT_IN_FLAGS2: Final = Struct("=I")             # flags2, at +16 when INIT_EXT is offered
FORGET_IN: Final = Struct("=Q")                  # nlookup
BATCH_FORGET_IN: Final = Struct("=II")           # count dummy
FORGET_ONE: Final = Struct("=QQ")                # nodeid nlookup
GETATTR_IN: Final = Struct("=IIQ")               # getattr_flags dummy fh
SETATTR_IN: Final = Struct("=IIQQQqqqIIIIIIII")  # valid pad fh size lock_owner atime mtime
#                                                  ctime atimensec mtimensec ctimensec mode
#                                                  unused4 uid gid unused5
MKNOD_IN: Final = Struct("=IIII")                # mode rdev umask padding
MKDIR_IN: Final = Struct("=II")                  # mode umask
RENAME_IN: Final = Struct("=Q")                  # newdir
RENAME2_IN: Final = Struct("=QII")               # newdir flags padding
LINK_IN: Final = Struct("=Q")                    # oldnodeid
OPEN_IN: Final = Struct("=II")                   # flags open_flags
CREATE_IN: Final = Struct("=IIII")               # flags mode umask open_flags
READ_IN: Final = Struct("=QQIIQII")              # fh offset size read_flags lock_owner flags pad
WRITE_IN: Final = Struct("=QQIIQII")             # fh offset size write_flags lock_owner flags pad
RELEASE_IN: Final = Struct("=QIIQ")              # fh flags release_flags lock_owner
FSYNC_IN: Final = Struct("=QII")                 # fh fsync_flags padding
SETXATTR_IN: Final = Struct("=II")               # size flags
SETXATTR_IN_EXT: Final = Struct("=IIII")         # size flags setxattr_flags padding
GETXATTR_IN: Final = Struct("=II")               # size padding
ACCESS_IN: Final = Struct("=II")                 # mask padding
INTERRUPT_IN: Final = Struct("=Q")               # unique
FALLOCATE_IN: Final = Struct("=QQQII")           # fh offset length mode padding
LSEEK_IN: Final = Struct("=QQII")                # fh offset whence padding
COPY_FILE_RANGE_IN: Final = Struct("=QQQQQQQ")   # fh_in off_in nodeid_out fh_out off_out len
#                                                  flags

# -- reply layouts (out header included) ------------------------------------------------------
OUT_HEADER: Final = Struct("=IiQ")                # len error unique
OUT_HEADER_SIZE: Final = OUT_HEADER.size          # 16
_ATTR: Final = "QQQqqqIIIIIIIIII"  # ino size blocks atime mtime ctime atimensec mtimensec
#                                    ctimensec mode nlink uid gid rdev blksize flags
ENTRY_OUT: Final = Struct("=IiQ" "QQQQII" + _ATTR)   # + nodeid generation entry_valid
#                                                     attr_valid entry_nsec attr_nsec
ATTR_OUT: Final = Struct("=IiQ" "QII" + _ATTR)       # + attr_valid attr_nsec dummy
OPEN_OUT: Final = Struct("=IiQ" "QIi")               # + fh open_flags backing_id
CREATE_OUT: Final = Struct("=IiQ" "QQQQII" + _ATTR + "QIi")  # entry_out + open_out
WRITE_OUT: Final = Struct("=IiQ" "II")               # + size padding
GETXATTR_OUT: Final = Struct("=IiQ" "II")            # + size padding
STATFS_OUT: Final = Struct("=IiQ" "QQQQQIIII24x")    # + blocks bfree bavail files ffree
#                                                     bsize namelen frsize padding spare[6]
INIT_OUT: Final = Struct("=IiQ" "IIIIHHIIHHII24x")   # + major minor max_readahead flags
#                                                     max_background congestion max_write
#                                                     time_gran max_pages map_alignment
#                                                     flags2 max_stack_depth unused
LSEEK_OUT: Final = Struct("=IiQ" "Q")                # + offset
NOTIFY_INVAL_INODE_OUT: Final = Struct("=IiQ" "Qqq")  # + ino off len
NOTIFY_INVAL_ENTRY_OUT: Final = Struct("=IiQ" "QII")  # + parent namelen flags; name NUL
NOTIFY_STORE_OUT: Final = Struct("=IiQ" "QQII")  # + nodeid offset size padding; data

# -- /dev/fuse ioctls (passthrough) -------------------------------------------------------------
BACKING_MAP: Final = Struct("=iIQ")                   # fd flags padding
BACKING_OPEN: Final = (1 << 30) | (BACKING_MAP.size << 16) | (229 << 8) | 1   # _IOW(229, 1)
BACKING_CLOSE: Final = (1 << 30) | (4 << 16) | (229 << 8) | 2                 # _IOW(229, 2)
BACKING_ID: Final = Struct("=I")

# directory records, each padded to 8 bytes
DIRENT: Final = Struct("=QQII")                      # ino off namelen type; name
DIRENTPLUS: Final = Struct("=QQQQII" + _ATTR + "QQII")  # entry_out + dirent; name
PADDING: Final = tuple(b"\0" * i for i in range(8))
