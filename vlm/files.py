"""Files that must never be seen half-written, and what a full disk looks like."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path

# A write that fails while its file system has less than this left is taken for a full disk.
NEARLY_FULL_BYTES = 16 * 2**20

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


def free_bytes(path: Path) -> int | None:
    """Free space of the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def writing(path: Path):
    """Around the writes of a checkpoint or model under `path`: a write that fails on a full disk
    is raised as OSError(ENOSPC) naming `path`.

    Only Python's own file writes say ENOSPC. On a full disk torch.save raises a bare RuntimeError
    ("[enforce fail at inline_container.cc] unexpected pos ...") and safetensors a SafetensorError
    ("I/O error: No space left on device"), so a failure is also taken for a full disk when the
    file system has next to nothing left (a write that ran out of space filled it first)."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc):
            raise
        free = free_bytes(path)
        if free is None or free >= NEARLY_FULL_BYTES:
            raise
        raise OSError(errno.ENOSPC, f"No space left on device ({free:,} bytes free; "
                                    f"{type(exc).__name__}: {str(exc)[:200]})", str(path)) from exc
