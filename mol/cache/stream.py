"""Stage 2's streaming reader: a split of a teacher cache, read and decoded a row group at a time.

`TeacherCache.load` holds a whole split in memory (~130 bytes a token at k = 31): right for
evaluation sets, wrong for the paper's 630M tokens in every DDP rank. `StreamingSequences` keeps
only an index (where each sequence lives: 8 bytes a sequence, built from the unit manifests' row
groups and val_rows without opening a shard) and a bounded cache of decoded row
groups, filled on demand and ahead of time by a background thread, so peak memory does not depend
on the corpus and a DDP rank decodes only the row groups that hold its own sequences. Row order is
TeacherCache.load's (units in config order, shards and rows in file order), so the same DataPlan
indices name the same sequences either way.

Nothing decoded reaches a caller unchecked: before a shard's first row group is decoded its bytes
are hashed against the manifest's sha256 (once per shard, shared by every reader over one
TeacherCache: the cache's units keep the outcome), and every decoded row group is checked against
the contract (`sequences_problem`: seq_ids, id ranges, probability codes, mass). A failure is
a CacheError naming the shard and the row, raised to the caller that needed the row.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq

from .read import CacheUnit, TeacherCache
from .schema import CORPUS, INPUT_IDS, SEQ_ID, SPLIT, SUBSET, TEACHER_COLUMNS, CacheError
from .sequences import Sequences, sequences_from_tables, sequences_problem


class StreamingSequences:
    """One split (optionally one corpus) of a cache: `len`, `row(i)` (the dict `Sequences.row`
    gives), `prefetch(indices)`, and per-row `corpus`, `subset`, `has_teacher` arrays."""

    def __init__(self, cache: TeacherCache, split: str, corpus: str | None = None,
                 max_cache_bytes: int = 256 << 20, prefetch_threads: int = 1, check_sha256: bool = True,
                 check_values: bool = True):
        """`check_sha256`, `check_values` (see the module's docstring) are on in every use; off only
        to measure what they cost (mol.bench)."""
        self.k = cache.k
        self.vocab_size = cache.vocab_size
        self.check_sha256, self.check_values = check_sha256, check_values
        self.max_cache_bytes = max_cache_bytes
        # (shard path, row group, unit, shard entry, the group's first row in the shard)
        self.groups: list[tuple[str, int, CacheUnit, dict, int]] = []
        gid, row, unit_of = [], [], []
        units = [u for u in cache.units if corpus in (None, u.corpus)]
        for ui, u in enumerate(units):
            for sh in u.shards:
                path = u.path / sh["file"]
                splits = self._splits(sh, path)
                for g, (first, n) in enumerate(self._row_groups(sh, path)):
                    local = np.flatnonzero(splits[first:first + n] == split)
                    if len(local):
                        gid.append(np.full(len(local), len(self.groups), np.int32))
                        row.append(local.astype(np.int32))
                        unit_of.append(np.full(len(local), ui, np.int16))
                        self.groups.append((str(path), g, u, sh, first))
        if not gid:
            raise CacheError(f"{cache.path}: no {split} rows" + (f" for corpus {corpus}" if corpus else ""))
        self._gid, self._row = np.concatenate(gid), np.concatenate(row)
        which = np.concatenate(unit_of)
        self.corpus = np.array([u.corpus for u in units], dtype=object)[which]
        self.subset = np.array([u.subset for u in units], dtype=object)[which]
        self.has_teacher = np.array([u.labelled for u in units], dtype=bool)[which]
        self._cache: OrderedDict[int, Future] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._files: OrderedDict[str, tuple[pq.ParquetFile, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, prefetch_threads), thread_name_prefix="mol-reader")
        self.decoded_groups = 0  # row groups decoded so far (tests: a DDP rank reads only its own)

    def __len__(self) -> int:
        return len(self._gid)

    @staticmethod
    def _row_groups(sh: dict, path) -> list[tuple[int, int]]:
        """(first row, rows) of each row group: from the manifest, else from the shard's footer."""
        if isinstance(sh.get("rows_per_group"), int) and sh["rows_per_group"] > 0:
            r = sh["rows_per_group"]
            return [(a, min(r, sh["rows"] - a)) for a in range(0, sh["rows"], r)]
        md = pq.ParquetFile(path).metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        return [(sum(sizes[:g]), n) for g, n in enumerate(sizes)]

    @staticmethod
    def _splits(sh: dict, path) -> np.ndarray:
        """Each row's split: from the manifest's val_rows, else read from the shard's split column."""
        if isinstance(sh.get("val_rows"), list):
            out = np.full(sh["rows"], "train", dtype=object)
            out[np.asarray(sh["val_rows"], dtype=np.int64)] = "val"
            return out
        return pq.read_table(path, columns=[SPLIT]).column(SPLIT).to_numpy(zero_copy_only=False)

    def _file(self, path: str) -> tuple[pq.ParquetFile, threading.Lock]:
        """An open shard and the lock its reads take. Open shards are kept (at most 64): parsing a footer
        costs more than decoding a row group. A ParquetFile is not safe to read from two threads at once
        (pyarrow 26 fails with "ReadRangeCache did not find matching cache entry" when the trainer and the
        prefetch thread read row groups of one shard together), so reads of one shard take turns."""
        with self._lock:
            pf = self._files.pop(path, None)
            if pf is None:
                pf = (pq.ParquetFile(path), threading.Lock())
            self._files[path] = pf
            while len(self._files) > 64:
                self._files.popitem(last=False)
            return pf

    def _decode(self, g: int) -> Sequences:
        path, rg, unit, entry, first = self.groups[g]
        if self.check_sha256:
            unit.require_sha256(entry)
        # one thread a decode: the row group is small, and the prefetch thread runs beside the trainer
        pf, reading = self._file(path)
        try:
            with reading:
                table = pf.read_row_group(rg, columns=[SEQ_ID, CORPUS, SUBSET, INPUT_IDS, *TEACHER_COLUMNS],
                                          use_threads=False)
        except (OSError, ValueError, IndexError) as e:  # pyarrow's errors for a file not as its footer says
            raise CacheError(f"{path}: row group {rg} cannot be read ({e})") from None
        rows = first + np.arange(table.num_rows)
        seqs = sequences_from_tables([table], path, self.k, rows)
        if self.check_values:
            problem = sequences_problem(seqs, vocab_size=self.vocab_size, labelled=unit.labelled,
                                          seq_ids=unit.first_seq_id(entry) + rows, rows=rows)
            if problem:
                raise CacheError(f"{path}: {problem}; not training on it")
        with self._lock:
            self.decoded_groups += 1
            self._sizes[g] = sum(a.nbytes for a in (seqs.input_ids, seqs.teacher_topk_ids, seqs.teacher_topk_probs,
                                                     seqs.teacher_residual) if a is not None)
            self._evict()
        return seqs

    def _evict(self) -> None:
        """Drop the least recently used decoded groups beyond the byte budget (never the newest)."""
        total = sum(self._sizes.get(g, 0) for g in self._cache)
        while total > self.max_cache_bytes and len(self._cache) > 1:
            g, fut = next(iter(self._cache.items()))
            if not fut.done():
                break
            self._cache.pop(g)
            total -= self._sizes.pop(g, 0)

    def _future(self, g: int, background: bool) -> Future:
        with self._lock:
            fut = self._cache.get(g)
            if fut is not None:
                self._cache.move_to_end(g)
                return fut
            if background:
                fut = self._pool.submit(self._decode, g)
            else:
                fut = Future()
            self._cache[g] = fut
        if not background:
            try:
                fut.set_result(self._decode(g))
            except BaseException as e:
                fut.set_exception(e)
        return fut

    def prefetch(self, indices) -> None:
        """Decode, in the background, the row groups that hold these sequences."""
        for g in dict.fromkeys(int(x) for x in self._gid[np.asarray(list(indices), dtype=np.int64)]):
            self._future(g, background=True)

    def row(self, i: int) -> dict:
        seqs = self._future(int(self._gid[i]), background=False).result()
        return seqs.row(int(self._row[i]))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
