"""File primitives every stage shares: content hashes and atomic writes (no MoL imports, so
anything may import it)."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Temp name, fsync, rename: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep the partial copy
        raise


def try_lock(path: Path, shared: bool = False) -> int:
    """Take an advisory lock on `path` (created if absent) without waiting; returns the descriptor
    (closing it releases the lock, as does the process's death). Raises BlockingIOError if held."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd
