"""Requests a dead daemon may already have done, resent to its successor.

After a takeover the kernel resends every request the dead daemon read but never
answered (FUSE_NOTIFY_RESEND; bit 63 of the request id is set). Reads, writes and
lookups are safe to do twice; a create, mkdir, link, unlink or rename is not: done
once by the dead daemon, done again it answers EEXIST or ENOENT. So a resent one that
fails that way looks at the store: if what it finds is what this very request would
have left there (the caller's new object, made within RECENT seconds; the name gone;
the source now under the new name), the request was done, and its answer is success.

Left ambiguous (and answered as done): the same user making the same object under the
same name within that window from elsewhere at the moment the daemon died.
"""

from __future__ import annotations

import os
import stat
import time

RESENT = 1 << 63
RECENT = 60.0  # seconds: a takeover answers resent requests well within this


def made_by_caller(st: os.stat_result, uid: int, kind: int) -> bool:
    """Whether ``st`` is an object of type ``kind`` the caller ``uid`` made just now."""
    return (stat.S_IFMT(st.st_mode) == kind and st.st_uid == uid
            and time.time() - st.st_ctime < RECENT)
