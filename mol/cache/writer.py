"""Writing a unit: shards written atomically (temp name, fsync, rename) by a background writer that
renames them in order, the folder locks that admit one writer, and the resume prefix (which part of a
segment to write next, from the shards on disk)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import replace_durably, try_lock
from ..spans import NO_SPANS, Spans
from .records import shard_record_problems, shard_resume
from .schema import COLUMN_ENCODING, CORPUS, SEGMENT_STRIDE, SEQ_ID, SPLIT, SUBSET, CacheError, ShardData, \
    parse_shard_name, shard_name, shard_table

def write_shard(path: Path, table: pa.Table, zstd_level: int, before_rename=None, row_group_rows: int | None = None) -> None:
    """Write to a temp name, fsync, rename: a shard that exists under its final name is complete.
    `before_rename()` (the writer's ordering) may return False: then the temp file is dropped."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=zstd_level,
                       use_dictionary=[CORPUS, SUBSET, SPLIT], write_statistics=[SEQ_ID],
                       column_encoding=COLUMN_ENCODING, row_group_size=row_group_rows)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None and not before_rename():
            tmp.unlink(missing_ok=True)
            return
        replace_durably(tmp, path)  # the folder fsynced too: the name survives a power loss
    except OSError as e:  # a full disk, a lost mount...: pyarrow's errors are OSErrors too
        tmp.unlink(missing_ok=True)
        raise CacheError(f"{path}: could not write this shard ({e}); the shards before it are kept "
                         f"and the next run resumes here") from e


class ShardWriter:
    """Builds, compresses, fsyncs and renames shards on background threads, so the teacher never
    waits on the disk (zstd and Parquet encoding release the GIL).

    Shards are compressed in parallel but renamed in submission order, so what a crash leaves under
    final names is always a prefix (the resume point is the last of them). At most `threads + 1`
    shards are in flight (bounded memory); `submit` blocks beyond that. The first error is re-raised
    by the next `submit` or by `close`, and no shard after it is renamed: a failure leaves the
    shards before it and nothing after.
    """

    def __init__(self, k: int, vocab_size: int, zstd_level: int, threads: int, row_group_rows: int | None = None,
                 spans: Spans = NO_SPANS):
        self.k, self.vocab_size, self.zstd_level, self.row_group_rows = k, vocab_size, zstd_level, row_group_rows
        self.spans = spans
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="mol-shard-writer")
        self._slots = threading.BoundedSemaphore(max(1, threads) + 1)
        self._error: BaseException | None = None
        self._last = threading.Event()
        self._last.set()

    def _write(self, path: Path, data: ShardData, prev: threading.Event, mine: threading.Event) -> None:
        def in_order() -> bool:
            prev.wait()
            return self._error is None

        try:
            if self._error is None:
                with self.spans.span("writer: shard_table"):
                    table = shard_table(data, self.k, self.vocab_size)
                with self.spans.span("writer: write_shard (Parquet encode + zstd + write + fsync)"):
                    write_shard(path, table, self.zstd_level, in_order, self.row_group_rows)
        except BaseException as e:
            prev.wait()  # the first error in submission order is the one reported
            if self._error is None:
                self._error = e
        finally:
            mine.set()
            self._slots.release()

    def _raise(self) -> None:
        if self._error is not None:  # it stays set: no later shard is written
            raise self._error

    def submit(self, path: Path, data: ShardData) -> None:
        with self.spans.span("main: submit (waits for a free writer slot)"):
            self._raise()
            self._slots.acquire()
            prev, self._last = self._last, threading.Event()
            self._pool.submit(self._write, path, data, prev, self._last)

    def close(self) -> None:
        """Wait for every queued shard; re-raise the first error."""
        self._pool.shutdown(wait=True)
        self._raise()

    def close_quietly(self) -> None:
        """On the way out of an error: let the shards already handed over finish, raise nothing."""
        self._pool.shutdown(wait=True)



@contextmanager
def cache_lock(folder: Path, worker: int | None = None, shared: bool = False, what: str = "cache"):
    """One writer per folder: an exclusive lock refuses a second. Workers of a sharded pass take
    the folder's lock shared (so they exclude a single pass and a finalize, not each other) plus
    an exclusive lock of their own index."""
    folder.mkdir(parents=True, exist_ok=True)
    fds = []
    try:
        for name, share in ([(".lock", shared)] + ([(f".lock-worker-{worker:04d}", False)] if worker is not None else [])):
            try:
                fds.append(try_lock(folder / name, shared=share))
            except BlockingIOError:
                who = (f"another process as worker {worker}" if name != ".lock"
                       else "another teacher pass" if not shared else "a single (unsharded) pass or a finalize")
                raise CacheError(f"{folder}: {who} is writing this {what} (lock held)") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def segment_progress(folder: Path, unit_fp: str, rows_per_shard: int, segment: int) -> tuple[int, dict | None]:
    """(next part to write, resume record of the part before it) of one segment of the unit in
    `folder` (fingerprint `unit_fp`): see `segment_prefix`."""
    records = segment_prefix(folder, unit_fp, rows_per_shard, segment)
    return len(records), (records[-1] if records else None)


def segment_prefix(folder: Path, unit_fp: str, rows_per_shard: int, segment: int) -> list[dict]:
    """The resume records of the parts 0, 1, ... of one segment of the unit in `folder`
    (fingerprint `unit_fp`) that are on disk and trusted, in order.

    Parts are renamed by parallel writer threads, so a kill can leave part p+1 without part p:
    the pass resumes after the contiguous prefix (and rewrites the same bytes after it). A shard
    whose resume record does not name this unit, segment and part, or whose rows contradict its
    record (row count, seq_ids, splits, counts: a record forged or copied from another shard), is
    refused, never trusted. The prefix ends at the part that ends the segment: a file after it is
    no part of the segment (the finalize refuses it)."""
    parts = sorted(p for p in (parse_shard_name(f.name) for f in folder.glob(f"shard-{segment:05d}-*.parquet"))
                   if p is not None)
    records = []
    for seg, part in parts:
        if part != len(records) or (records and records[-1].get("end")):
            break
        path = folder / shard_name(seg, part)
        rec = shard_resume(path)
        if not isinstance(rec, dict) or (rec.get("unit"), rec.get("segment"), rec.get("part")) != (unit_fp, seg, part):
            said = (str(rec.get("unit"))[:16], rec.get("segment"), rec.get("part")) if isinstance(rec, dict) else None
            raise CacheError(f"{path}: not a shard this pass wrote for unit {unit_fp[:16]} segment {seg} "
                             f"part {part} (its resume record says {said}); remove it and run again")
        problems = shard_record_problems(path, rec, seg * SEGMENT_STRIDE + part * rows_per_shard)
        if problems:
            raise CacheError(f"{path}: its rows contradict its resume record ({'; '.join(problems[:3])}); "
                             f"not resuming from it: remove it and run again")
        records.append(rec)
    return records
