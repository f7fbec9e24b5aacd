"""Readers' locks: every process that reads a cache (the trainer, an evaluation, a teacher pass
that reuses complete units) holds a shared lock on each folder it reads, for as long as it reads
it; `garbage_collect` takes the same lock exclusively before it removes a folder, so it skips a
folder in use instead of deleting it under its reader.

The readers' lock is a file of its own (READ_LOCK) beside the writers' `.lock` (`cache_lock`):
readers never exclude writers or each other, only a gc. A folder that cannot be locked because
nobody may write to it (a read-only mount) is read without one: a gc cannot remove it either."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..files import holders_text, try_lock
from .manifest import read_manifest
from .read import TeacherCache
from .schema import CacheError

log = logging.getLogger(__name__)

READ_LOCK = ".lock-read"


class ReadLocks:
    """Shared locks on the cache folders one reader uses, all released by `close` (or the end of
    the `with` block, or the process's death)."""

    def __init__(self):
        self._fds: dict[Path, int | None] = {}

    def __enter__(self) -> "ReadLocks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, folder: Path) -> bool:
        """Lock `folder` for reading (a folder locked already is kept as it is). False when there
        is no such folder (never made, or removed by a gc before this lock was taken); a
        CacheError while a gc holds it, about to remove it."""
        folder = Path(folder)
        if folder in self._fds:
            return True
        lock = folder / READ_LOCK
        try:
            fd = try_lock(lock, shared=True)
        except BlockingIOError:
            raise CacheError(f"{folder}: being removed by `python -m stages.cache_info --gc` "
                             f"({holders_text(lock)}; lock held); run again once it is done") from None
        except FileNotFoundError:
            if not folder.is_dir():
                return False
            log.debug("%s: read-only, read without a lock (nothing can remove it)", folder)
            self._fds[folder] = None
            return True
        # a gc may have renamed the folder away between the open and the lock: then this lock is on
        # a file no longer under this name, and guards nothing
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except OSError:
            same = False
        if not same:
            os.close(fd)
            return False
        self._fds[folder] = fd
        return True

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


def open_held(path: Path, held: ReadLocks) -> TeacherCache:
    """A set opened under `held`'s locks on its folder and on every unit its manifest names, each
    taken before the manifests are read, so no unit checked here is removed before its reader is
    done with it."""
    path = Path(path)
    if not held.add(path):
        raise CacheError(f"{path}: no teacher cache here (removed?); run `make teacher-cache`")
    units = read_manifest(path, "set").get("units")
    for u in units if isinstance(units, list) else []:
        if isinstance(u, dict) and isinstance(u.get("dir"), str):
            held.add(path.parent.parent / u["dir"])  # a missing one: TeacherCache names it
    return TeacherCache(path)
