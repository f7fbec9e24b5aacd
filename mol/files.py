"""File primitives every stage shares: content hashes, atomic and durable writes, advisory locks
(no MoL imports, so anything may import it).

Durable means it survives a power loss, not only a crash: a rename changes the folder, not the
file, so the folder itself is fsynced after every rename (`replace_durably`); until then a power
cut can bring back the old name, or no name at all, over data that was fsynced."""

from __future__ import annotations

import errno
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


def fsync_dir(path: Path) -> None:
    """fsync a folder: makes the names created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (itself included), e.g. a folder a library wrote
    (save_pretrained does not fsync) before it is renamed into place."""
    for root, _, files in os.walk(path, topdown=False):  # a folder after everything in it
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def replace_durably(src: Path, dst: Path) -> None:
    """os.replace, then fsync the destination's folder: the new name survives a power loss. `src`
    must be durable already (fsynced file, or a folder after fsync_tree)."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp name, fsync, rename, fsync the folder: a reader sees the old file or the whole new one,
    never a part, even after a power loss."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep the partial copy
        raise


def try_lock(path: Path, shared: bool = False) -> int:
    """Take an advisory lock on `path` (created if absent) without waiting; returns the descriptor
    (closing it releases the lock, as does the process's death). Raises BlockingIOError if held.
    A shared lock needs no write access: a reader of a file it may not write still locks it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR)
    except OSError as e:
        if not shared or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def lock_holders(path: Path) -> list[int]:
    """The ids of the processes holding a flock on `path`, from Linux's /proc/locks (matched by
    inode); [] where it cannot tell (another system, another pid namespace). For a message naming
    who holds a lock, never for a decision: the lock itself decides."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        f = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; a waiter's has "->" second
        if len(f) < 6 or f[1] != "FLOCK":
            continue
        try:
            pid, node = int(f[4]), int(f[5].rsplit(":", 1)[-1])
        except ValueError:
            continue
        if node == inode and pid > 0 and pid not in pids:
            pids.append(pid)
    return pids


def holders_text(path: Path) -> str:
    """'pid N' (or 'pids N, M') of `lock_holders`, else 'a running process'."""
    pids = lock_holders(path)
    if not pids:
        return "a running process"
    return ("pid " if len(pids) == 1 else "pids ") + ", ".join(map(str, pids))
