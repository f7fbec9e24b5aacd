"""Reading a cache: `CacheUnit` (one source's unit folder) and `TeacherCache` (a config's set of
units, the `sets/` folder), opened through their manifests; verify; and the one compatibility check
(`key_problems`) that Stage 1's reuse, a set's verify and Stage 2's `check_compatible` share."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..files import sha256_path
from .manifest import read_manifest, set_manifest_problems, unit_manifest_problems
from .records import record_problems, table_record_problems
from .schema import CORPUS, INPUT_IDS, MANIFEST, RESUME_KEY, SEGMENT_STRIDE, SEQ_ID, SHARD_GLOB, SPLIT, SUBSET, \
    TEACHER_COLUMNS, UNITS_DIR, CacheError, arrow_schema
from .sequences import Sequences, concat_sequences, sequences_from_tables, sequences_problem

class _Once:
    """Run a check at most once per key, whatever the threads: the first caller runs it, the others
    wait for its outcome; a failure is kept and raised again to every later caller."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done: dict[str, Future] = {}

    def run(self, key: str, fn) -> None:
        with self._lock:
            fut = self._done.get(key)
            mine = fut is None
            if mine:
                fut = self._done[key] = Future()
        if mine:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
        fut.result()



COMPATIBILITY = ("model_fingerprint", "tokenizer_fingerprint", "top_k")
"""The key fields on which two caches (or a cache and a run) must agree for their labels to be
interchangeable: the model and tokenizer that made them and k."""


def key_problems(have: dict, want: dict, whose: str, words: dict | None = None) -> list[str]:
    """The one compatibility check: how a cache's key `have` (a unit's or a set's) differs from `want`
    (its set's key, or what the run would key) in COMPATIBILITY, one "<field> <have> != <whose> <want>"
    a field (values cut to 12 characters; `words` renames fields). Stage 1's reuse of a unit, a set's
    verify and `TeacherCache.check_compatible` (Stage 2, evaluation) all ask it."""
    words = words or {}
    return [f"{words.get(f, f)} {str(have[f])[:12]} != {whose} {str(want[f])[:12]}"
            for f in COMPATIBILITY if have[f] != want[f]]


class CacheFolder:
    """A unit or set folder opened through its manifest: what both expose."""

    path: Path
    manifest: dict

    @property
    def key(self) -> dict:
        """What the folder's bytes depend on (`unit_key` or `set_key`): model and tokenizer fingerprints, k..."""
        return self.manifest["key"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def k(self) -> int:
        """teacher.top_k the labels were made with."""
        return self.key["top_k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["model"]["vocab_size"]

    @property
    def totals(self) -> dict:
        """sequences, tokens, bytes, bytes_per_token."""
        return self.manifest["totals"]


class CacheUnit(CacheFolder):
    """One source's complete unit folder, opened through its manifest."""

    def __init__(self, path: Path | str, fingerprint: str | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "unit")
        problems = unit_manifest_problems(self.manifest)
        if problems:
            raise CacheError(f"{self.path / MANIFEST}: malformed manifest: " + "; ".join(problems))
        if fingerprint is not None and self.manifest["fingerprint"] != fingerprint:
            raise CacheError(f"{self.path}: holds unit {self.manifest['fingerprint'][:16]}, "
                             f"expected {fingerprint[:16]} (a folder copied under another unit's name?)")
        self._hashed = _Once()

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict, hashed: bool = False) -> "CacheUnit":
        """A unit whose manifest is still in memory (the finalize step reads it before writing it);
        `hashed`: its sha256s were computed from these very files a moment ago (not hashed again)."""
        unit = object.__new__(cls)
        unit.path, unit.manifest, unit._hashed = Path(path), manifest, _Once()
        if hashed:
            for sh in manifest["shards"]:
                unit._hashed.run(sh["file"], lambda: None)
        return unit

    def require_sha256(self, entry: dict) -> None:
        """Raise a CacheError unless the shard's bytes hash to its manifest sha256. Hashed once per
        unit object, on first use, by whichever thread needs it first (the others wait): every reader
        over one TeacherCache shares its units, so Stage 2 reads each shard's bytes once to hash it,
        when it first needs the shard, instead of all of them before the first step."""
        path = self.path / entry["file"]

        def check() -> None:
            try:
                digest = sha256_path(path)
            except OSError as e:
                raise CacheError(f"{path}: cannot read this shard ({e})") from None
            if digest != entry["sha256"]:
                raise CacheError(f"{path}: sha256 mismatch (corrupt or modified since its manifest was written); "
                                 f"none of its rows is used")

        self._hashed.run(entry["file"], check)

    def first_seq_id(self, entry: dict) -> int:
        """The seq_id of a shard's first row: its place in the unit (Stage 1's numbering)."""
        return entry["segment"] * SEGMENT_STRIDE + entry["part"] * self.key["rows_per_shard"]

    @property
    def labelled(self) -> bool:
        return self.key["labelled"]

    @property
    def source(self) -> dict:
        """The source's corpus, subset and sha256 (as keyed)."""
        return self.key["source"]

    @property
    def corpus(self) -> str:
        return self.source["corpus"]

    @property
    def subset(self) -> str:
        return self.source["subset"]

    @property
    def shards(self) -> list[dict]:
        """The shard entries (file, segment, part, rows, bytes, sha256), in order."""
        return self.manifest["shards"]

    @property
    def shard_count(self) -> int:
        return len(self.shards)

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.shards]

    def _check_shard(self, s: dict, p: Path, last_part: bool) -> list[str]:
        """A shard whose bytes match is still checked against the contract from its footer alone:
        schema, k, rows, each row group's seq_id range (from the footer's statistics) and the resume
        record of the unit, segment and part it is listed as, whose own facts (rows, val_rows, the
        segment's end) must be the shard's and the manifest's."""
        try:
            pf = pq.ParquetFile(p)
            schema = pf.schema_arrow
        except Exception as e:
            return [f"{s['file']}: unreadable Parquet ({e})"]
        out = []
        md = pf.metadata
        if md.num_rows != s["rows"]:
            out.append(f"{s['file']}: {md.num_rows} rows, manifest says {s['rows']}")
        want = arrow_schema(self.k, self.vocab_size)
        got = schema.remove_metadata()
        if not got.equals(want):
            bad = [f.name for f in want if f.name not in got.names or got.field(f.name) != f]
            out.append(f"{s['file']}: schema differs from the cache contract (k = {self.k}) in {', '.join(bad) or 'fields'}")
        try:
            res = json.loads((schema.metadata or {})[RESUME_KEY])
        except (KeyError, ValueError, RecursionError):
            res = {}
        if not isinstance(res, dict):
            res = {}
        if (res.get("unit"), res.get("segment"), res.get("part")) != (self.manifest["fingerprint"], s["segment"], s["part"]):
            out.append(f"{s['file']}: its resume record does not name this unit's segment {s['segment']} "
                       f"part {s['part']} (a shard from elsewhere?)")
            return out
        out += [f"{s['file']}: {q}" for q in record_problems(res, md.num_rows, s.get("val_rows"), last_part)]
        if out:
            return out
        first = self.first_seq_id(s)
        idx = schema.get_field_index(SEQ_ID)
        row = 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            st = rg.column(idx).statistics if idx >= 0 else None
            if st is not None and st.has_min_max and (st.min, st.max) != (first + row, first + row + rg.num_rows - 1):
                out.append(f"{s['file']}: rows {row}-{row + rg.num_rows - 1} have seq_ids {st.min}..{st.max}, where "
                           f"their place in the unit gives {first + row}..{first + row + rg.num_rows - 1} "
                           f"(rows duplicated, moved or from elsewhere)")
                break
            row += rg.num_rows
        return out

    def _check_rows(self, s: dict, p: Path) -> list[str]:
        """Every value of a shard against the contract (`sequences_problem`) and its rows against
        its resume record (`table_record_problems`): the whole shard read and decoded."""
        try:
            t = pq.read_table(p)
            rec = json.loads(t.schema.metadata[RESUME_KEY])
        except Exception as e:
            return [f"{s['file']}: unreadable Parquet ({e})"]
        out = [f"{s['file']}: {q}" for q in table_record_problems(t, rec, self.first_seq_id(s))]
        try:
            seqs = sequences_from_tables([t], Path(s["file"]), self.k)
        except CacheError as e:
            return out + [str(e)]
        if seqs is not None:
            problem = sequences_problem(seqs, vocab_size=self.vocab_size, labelled=self.labelled)
            if problem:
                out.append(f"{s['file']}: {problem}")
        return out

    def _verify_shard(self, s: dict, last_part: bool, checksums: bool, contents: bool) -> list[str]:
        """One shard's checks for `verify`, as problems relative to the unit folder."""
        p = self.path / s["file"]
        if not p.is_file():
            return [f"{s['file']}: missing"]
        if p.stat().st_size != s["bytes"]:
            return [f"{s['file']}: {p.stat().st_size} bytes, manifest says {s['bytes']}"]
        if checksums:
            try:
                self.require_sha256(s)
            except CacheError:
                return [f"{s['file']}: sha256 mismatch (corrupt or modified)"]
        found = self._check_shard(s, p, last_part)
        if contents and not found:
            found = self._check_rows(s, p)
        return found

    def verify(self, progress=None, *, checksums: bool = True, contents: bool = True) -> list[str]:
        """Check the unit; return the problems (empty = ok). Always: every shard's existence, size,
        schema, rows, seq_id ranges and resume record (footers only), the parts of each segment
        (0..n-1, only the last ends it), files not listed, totals. `checksums`: every shard's sha256.
        `contents`: every shard read and every value checked (`_check_rows`). Stage 2 opens a cache
        with neither: its reader hashes each shard and checks each row group's values when it first
        reads them, before any of them reaches a step."""
        problems = []
        prefix = f"{UNITS_DIR}/{self.path.name}/"
        last = {}
        for s in self.manifest["shards"]:
            last[s["segment"]] = max(last.get(s["segment"], -1), s["part"])
        for seg in sorted(last):
            parts = sorted(s["part"] for s in self.manifest["shards"] if s["segment"] == seg)
            if parts != list(range(len(parts))):
                problems.append(f"{prefix}{MANIFEST}: segment {seg} lists parts {parts[:20]}, not 0..{len(parts) - 1} "
                                f"(a part missing or listed twice)")
        # shards are independent and their reads, hashes and decodes release the GIL: one thread a core
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            checks = pool.map(lambda s: self._verify_shard(s, s["part"] == last[s["segment"]], checksums, contents),
                              self.manifest["shards"])
            for found in checks:
                problems += [prefix + q for q in found]
                if progress:
                    progress(1)
        # an entry removed from the manifest would silently drop its rows from training
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in sorted(self.path.glob(SHARD_GLOB)):
            if p.name not in listed:
                problems.append(f"{prefix}{p.name}: on disk but not listed in the manifest (edited manifest?)")
        rows = sum(s["rows"] for s in self.manifest["shards"])
        if rows != self.manifest["totals"].get("sequences"):
            problems.append(f"{prefix}{MANIFEST}: its shards hold {rows} rows, totals.sequences says "
                            f"{self.manifest['totals'].get('sequences')}")
        return problems

    def load(self, split: str, columns_teacher: bool = True) -> Sequences | None:
        """Every row of `split` as flat numpy arrays (None when the unit has none); each shard's
        sha256 and values are checked as it is read (a CacheError names the shard and row)."""
        cols = [SEQ_ID, CORPUS, SUBSET, INPUT_IDS, SPLIT] + (list(TEACHER_COLUMNS) if columns_teacher else [])
        parts = []
        for s in self.shards:
            p = self.path / s["file"]
            self.require_sha256(s)
            t = pq.read_table(p, columns=cols)
            rows = np.flatnonzero(np.asarray(t.column(SPLIT).to_numpy(zero_copy_only=False), dtype=object) == split)
            if not len(rows):
                continue
            seqs = sequences_from_tables([t.drop_columns([SPLIT]).take(rows)], p, self.k, rows)
            problem = sequences_problem(seqs, vocab_size=self.vocab_size,
                                        labelled=self.labelled if columns_teacher else None,
                                        seq_ids=self.first_seq_id(s) + rows, rows=rows)
            if problem:
                raise CacheError(f"{p}: {problem}")
            parts.append(seqs)
        return concat_sequences(parts) if parts else None


class TeacherCache(CacheFolder):
    """A set (`sets/<model>-<fp16>/`, what `resolve_cache_key` names as a ResolvedSet): a config's
    complete cache, its set manifest and the units it lists, in config order."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "set")
        problems = set_manifest_problems(self.manifest)
        if problems:
            raise CacheError(f"{self.path / MANIFEST}: malformed manifest: " + "; ".join(problems))
        root = self.path.parent.parent
        self.units = [CacheUnit(root / u["dir"], u["fingerprint"]) for u in self.manifest["units"]]

    @property
    def label_domain(self) -> bool:
        return self.key["label_domain"]

    @property
    def run(self) -> dict:
        """How Stage 1 ran: device, dtype, seconds, forward tokens..."""
        return self.manifest["run"]

    def sequences_in(self, split: str) -> int:
        """Sequences of one split ("train" or "val") over every corpus and subset."""
        return sum(c["sequences"] for key, c in self.manifest["counts"].items() if key.endswith("/" + split))

    @property
    def shard_count(self) -> int:
        return sum(u.shard_count for u in self.units)

    def content_digests(self) -> dict[str, str]:
        """{"units/<name>": sha256 of its (file, sha256) shard list}, from the manifests: what a
        resumed run compares to tell a cache rebuilt under the same key (the same fingerprint) with
        other bytes, e.g. by a GPU teacher after a gc, from the one it started on. The reader checks
        every shard's bytes against these sha256s before it uses them."""
        return {f"{UNITS_DIR}/{u.path.name}": hashlib.sha256(
                    json.dumps([[s["file"], s["sha256"]] for s in u.shards]).encode()).hexdigest()
                for u in self.units}

    def verify(self, progress=None, *, checksums: bool = True, contents: bool = True) -> list[str]:
        """Every unit's checks (see CacheUnit.verify: `checksums` and `contents` as there), and each
        unit against the set's model, k and vocabulary (the readers check ids against the set's)."""
        problems = []
        for u in self.units:
            problems += [f"{UNITS_DIR}/{u.path.name}: {q}" for q in key_problems(u.key, self.key, "the set's")]
            if u.vocab_size != self.vocab_size:
                problems.append(f"{UNITS_DIR}/{u.path.name}: vocab_size {u.vocab_size} != the set's {self.vocab_size}")
            problems += u.verify(progress, checksums=checksums, contents=contents)
        return problems

    def check_compatible(self, *, model_fp: str, tokenizer_fp: str, k: int, vocab_size: int | None = None) -> None:
        """Refuse a cache made by another model, tokenizer, k or vocabulary than the run's (a cache
        whose ids may reach past the run's vocabulary would index past its embedding)."""
        problems = []
        if vocab_size is not None and self.vocab_size > vocab_size:
            problems.append(f"vocab_size {self.vocab_size} > the run model's {vocab_size}")
        run = {"model_fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fp, "top_k": k}
        problems += key_problems(self.key, run, "run's", {"model_fingerprint": "model fingerprint",
                                                          "tokenizer_fingerprint": "tokenizer fingerprint",
                                                          "top_k": "k ="})
        if problems:
            raise CacheError(f"cache {self.path} does not match this run: " + "; ".join(problems))

    def load(self, split: str, corpus: str | None = None, columns_teacher: bool = True) -> Sequences:
        """Read every row of `split` (optionally one corpus) into flat numpy arrays, units in order."""
        parts = [s for u in self.units if corpus in (None, u.corpus)
                 if (s := u.load(split, columns_teacher)) is not None]
        if not parts:
            raise CacheError(f"{self.path}: no {split} rows" + (f" for corpus {corpus}" if corpus else ""))
        return concat_sequences(parts)

