"""Files that must never be seen half-written, and what a full disk looks like."""
from __future__ import annotations

import errno
import json
import os
import sqlite3
from pathlib import Path

DISK_FULL_ADVICE = ("nothing half-written is used: finished stages, the last complete checkpoint and every "
                    "stored label are kept; free space and run the same command again to continue")


def write_json(path: Path, data) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one (also when the disk fills
    up halfway: the staging file is removed and the old file stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from a file write, or SQLite's SQLITE_FULL ("database or disk is full")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
