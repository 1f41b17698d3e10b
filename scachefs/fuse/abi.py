"""The kernel's FUSE protocol: constants and wire structs, from ``include/uapi/linux/fuse.h``.

Checked against protocol 7.45 (Linux 6.18, the kernel this project runs on);
only what scachefs speaks is here. Every struct is little-endian and 64-bit
aligned, as the header defines it; sizes are asserted below so that a typo in
a format string fails at import, not on the wire.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_MIN = 31  # oldest minor we accept: Linux 5.10
OUR_MINOR = 45  # what we speak; the session uses min(kernel's, ours)
PASSTHROUGH_MINOR = 40  # FUSE_PASSTHROUGH and the backing_id in fuse_open_out
ROOT_ID = 1

# opcodes (enum fuse_opcode)
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52
COPY_FILE_RANGE_64 = 53

OPCODE_NAMES = {code: name for name, code in (
    ("LOOKUP", LOOKUP), ("FORGET", FORGET), ("GETATTR", GETATTR), ("SETATTR", SETATTR),
    ("READLINK", READLINK), ("SYMLINK", SYMLINK), ("MKNOD", MKNOD), ("MKDIR", MKDIR),
    ("UNLINK", UNLINK), ("RMDIR", RMDIR), ("RENAME", RENAME), ("LINK", LINK), ("OPEN", OPEN),
    ("READ", READ), ("WRITE", WRITE), ("STATFS", STATFS), ("RELEASE", RELEASE),
    ("FSYNC", FSYNC), ("SETXATTR", SETXATTR), ("GETXATTR", GETXATTR),
    ("LISTXATTR", LISTXATTR), ("REMOVEXATTR", REMOVEXATTR), ("FLUSH", FLUSH), ("INIT", INIT),
    ("OPENDIR", OPENDIR), ("READDIR", READDIR), ("RELEASEDIR", RELEASEDIR),
    ("FSYNCDIR", FSYNCDIR), ("GETLK", GETLK), ("SETLK", SETLK), ("SETLKW", SETLKW),
    ("ACCESS", ACCESS), ("CREATE", CREATE), ("INTERRUPT", INTERRUPT), ("BMAP", BMAP),
    ("DESTROY", DESTROY), ("IOCTL", IOCTL), ("POLL", POLL), ("NOTIFY_REPLY", NOTIFY_REPLY),
    ("BATCH_FORGET", BATCH_FORGET), ("FALLOCATE", FALLOCATE), ("READDIRPLUS", READDIRPLUS),
    ("RENAME2", RENAME2), ("LSEEK", LSEEK), ("COPY_FILE_RANGE", COPY_FILE_RANGE),
    ("SETUPMAPPING", SETUPMAPPING), ("REMOVEMAPPING", REMOVEMAPPING), ("SYNCFS", SYNCFS),
    ("TMPFILE", TMPFILE), ("STATX", STATX), ("COPY_FILE_RANGE_64", COPY_FILE_RANGE_64))}

# notify codes (enum fuse_notify_code)
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_DELETE = 6
NOTIFY_RESEND = 7

UNIQUE_RESEND = 1 << 63  # set in the unique of a request the kernel sent again

# INIT flags (flags | flags2 << 32)
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
CREATE_SUPP_GROUP = 1 << 34
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
OVER_IO_URING = 1 << 41

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
WRITE_KILL_SUIDGID = 1 << 2
OPEN_KILL_SUIDGID = 1 << 0
SETXATTR_ACL_KILL_SGID = 1 << 0  # fuse_setxattr_in.setxattr_flags (with SETXATTR_EXT)
EXT_GROUPS = 32  # request extension: struct fuse_supp_groups (types 0-31: security contexts)
FSYNC_FDATASYNC = 1 << 0
RELEASE_FLUSH = 1 << 0

# ioctls on /dev/fuse
DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)

MAX_PAGES_LIMIT = 256  # max_pages we ask for: 1 MiB requests with 4 KiB pages
MAX_WRITE = MAX_PAGES_LIMIT * 4096
# The kernel refuses a read buffer smaller than a header, a write_in and max_write.
READ_BUFFER = MAX_WRITE + 4096

# ----------------------------------------------------------------------- structs
# The header declares most fields unsigned, but the kernel fills times (seconds
# since 1970, negative before it) and file offsets and sizes (loff_t) from
# signed types: those are packed signed here ("q"), so a 1960 mtime or a
# negative lseek offset reaches the store as what the caller asked.
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode
# nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid *nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIIII44x")  # major minor max_readahead flags flags2 unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")  # major minor max_readahead flags
# max_background congestion_threshold max_write time_gran max_pages map_alignment flags2
# max_stack_depth request_timeout unused[11]
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQqQqqqIIIIIIII")  # valid pad fh size lock_owner atime mtime
# ctime atimensec mtimensec ctimensec mode unused4 uid gid unused5
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")  # flags open_flags
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QqIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QqIIQII")
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")  # size flags (without FUSE_SETXATTR_EXT)
SETXATTR_IN_EXT = struct.Struct("<IIII")  # size flags setxattr_flags padding
EXT_HEADER = struct.Struct("<II")  # size (with this header) type
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
LK_IN = struct.Struct("<QQQQIIII")  # fh owner start end type pid lk_flags padding
LK_OUT = struct.Struct("<QQII")  # start end type pid
LK_FLOCK = 1 << 0  # lk_flags: a flock(), not a POSIX/OFD lock
FALLOCATE_IN = struct.Struct("<QqqII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QqII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<q")
COPY_FILE_RANGE_IN = struct.Struct("<QqQQqQQ")  # fh_in off_in nodeid_out fh_out off_out len
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")
NOTIFY_DELETE_OUT = struct.Struct("<QQII")
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

_SIZES = {IN_HEADER: 40, OUT_HEADER: 16, ATTR: 88, ENTRY_OUT_HEAD: 40, ATTR_OUT_HEAD: 16,
          INIT_IN: 64, INIT_OUT: 64, GETATTR_IN: 16, SETATTR_IN: 88, MKNOD_IN: 16,
          MKDIR_IN: 8, RENAME2_IN: 16, OPEN_IN: 8, CREATE_IN: 16, OPEN_OUT: 16,
          RELEASE_IN: 24, FLUSH_IN: 24, READ_IN: 40, WRITE_IN: 40, WRITE_OUT: 8, KSTATFS: 80,
          FSYNC_IN: 16, GETXATTR_IN: 8, SETXATTR_IN_EXT: 16, EXT_HEADER: 8, LK_IN: 48,
          LK_OUT: 24, FALLOCATE_IN: 32, LSEEK_IN: 24,
          COPY_FILE_RANGE_IN: 56, DIRENT_HEAD: 24, NOTIFY_INVAL_INODE_OUT: 24,
          NOTIFY_INVAL_ENTRY_OUT: 16, NOTIFY_DELETE_OUT: 24, BACKING_MAP: 16}
for _s, _n in _SIZES.items():
    assert _s.size == _n, (_s.format, _s.size, _n)
