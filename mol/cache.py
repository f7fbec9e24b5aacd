"""The Stage 1 <-> Stage 2 contract: cache units, their schema, fingerprints, manifests and readers.

A teacher cache is made of UNITS, one per source, shared by every config and project under one
`cache_root`:

    <cache_root>/units/<corpus>-<subset>-<fp[:16]>/    one source's labels (a Hugging Face dataset)
        shard-SSSSS-PPPPP.parquet   segment S, part P: rows_per_shard packed sequences (zstd)
        manifest.json               written LAST: its presence means the unit is complete
        README.md                   dataset card (YAML header: data files, features, model, k)
    <cache_root>/sets/<model>-<fp[:16]>/               one config's cache: which units, in order
        manifest.json               unit list, counts, totals, fidelity (written after every unit)
        config.yaml                 the resolved config that named it

A unit's fingerprint covers exactly what its rows depend on (`unit_key`): model and tokenizer
fingerprints, chat template and kwargs, dtype, backend, k, whether it is labelled, the packing
settings and the source's content hash and caps. So config B that shares a general corpus with
config A reuses A's unit for it, and a changed domain corpus re-labels only the domain unit.

Segments: a large uncapped source is cut into segments of about `data.segment_bytes` of input
(byte ranges of a JSONL file, row ranges of Parquet / datasets), each packed on its own, so
sharded workers split a source without reading what precedes their segments. Each shard's
Parquet metadata carries where its input ended (`mol.resume`), so a resumed pass continues at
the first missing shard without re-reading what finished shards cover.

Both manifests are assembled here, from the facts the teacher pass gathers (`shard_entry`,
`unit_manifest`, `set_manifest`: pure functions, the manifest's shape in one place), and checked here
when read (`unit_manifest_problems`, `set_manifest_problems`).

Columns (the same names are the batch keys in Stage 2 and the loss function's arguments):

    seq_id              int64   segment * 2^32 + row index within the segment (the row index when
                                the source is one segment)
    corpus              string  "domain" | "general"
    subset              string  e.g. "medqa"
    split               string  "train" | "val"
    input_ids           list<uint16|uint32>  [L]   packed tokens (uint16 when vocab <= 65536)
    teacher_topk_ids    list<fixed_size_list<uint16|uint32, k>>  [L-1, k]
                                base model's top-k next-token ids at every position t < L-1
                                (predicting token t+1), ascending (a set, not a ranking), stored as
                                gaps g: id_j = g_0 + ... + g_j (decode_ids)
    teacher_topk_probs  list<fixed_size_list<uint16, k>>  [L-1, k]
                                probabilities as codes q = round(1023 sqrt(p)) in [1, 1023];
                                p = (q / 1023)^2 (decode_probs)
    teacher_residual    list<uint16>  [L-1]
                                mass of every other token as a log code
                                u = round(-ln(max(r, 1e-30)) / RESIDUAL_STEP), r = exp(-u STEP)
                                (decode_residual)

Schema 3 (this one) against schema 2: (1) the residual: fp16 underflowed (0.24% of the default
cache's positions stored exactly 0, 5% were subnormals), and the loss then charged
r_s (log r_s + 69) instead of r_s (log r_s - log r); the log code keeps a relative error
<= 5.3e-4 for every r in [1e-30, 1] in the same two bytes. (2) ids as gaps: ascending ids share
high bytes, gaps are mostly small, 3.3 bytes/token less at every zstd level, which brings the
default cache under 72 bytes/token at zstd 6 (~300k tokens/s a core) instead of zstd 19 (~30k):
the writer keeps up with a GPU teacher. Probabilities stay on the sqrt grid (finest where the KL
is sensitive; mean |ΔKL| ~3e-4 nats/token against exact labels). Every teacher column is thus a
code: `Sequences.row` (and decode_ids / decode_probs / decode_residual) give ids, probabilities
and residual back.

The teacher columns are null on every row of an unlabelled unit (a domain source when
`teacher.label_domain` is false). Every position is a training target; there is no loss mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import MolConfig, SourceConfig, expand_path
from .corpora import detect_format, source_caps, source_fingerprint
from .errors import MissingInput, MolError
from .files import sha256_path, write_atomic  # noqa: F401  (re-exported: callers use C.sha256_path)
from .model import load_tokenizer, model_fingerprint, resolve_model_path, tokenizer_fingerprint

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
CARD = "README.md"
UNITS_DIR = "units"
SETS_DIR = "sets"
SHARD_GLOB = "shard-*.parquet"
RESUME_KEY = b"mol.resume"

SEQ_ID = "seq_id"
CORPUS = "corpus"
SUBSET = "subset"
SPLIT = "split"
INPUT_IDS = "input_ids"
TOPK_IDS = "teacher_topk_ids"
TOPK_PROBS = "teacher_topk_probs"
RESIDUAL = "teacher_residual"
TEACHER_COLUMNS = (TOPK_IDS, TOPK_PROBS, RESIDUAL)
SEGMENT_STRIDE = 1 << 32


class CacheError(MolError, RuntimeError):
    """A cache that is missing, incomplete, corrupt or does not match the run."""


def shard_name(segment: int, part: int) -> str:
    return f"shard-{segment:05d}-{part:05d}.parquet"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    parts = name.removesuffix(".parquet").split("-")
    if len(parts) != 3 or parts[0] != "shard" or not name.endswith(".parquet"):
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


# --------------------------------------------------------------------------- encoding

PROB_LEVELS = 1023  # 10-bit codes of sqrt(p), stored as uint16 (BYTE_STREAM_SPLIT keeps the zero bits cheap)
RESIDUAL_FLOOR = 1e-30
RESIDUAL_LEVELS = 65535
RESIDUAL_STEP = -math.log(RESIDUAL_FLOOR) / RESIDUAL_LEVELS  # ~1.05e-3 nats a code


def encode_residual(residual: np.ndarray) -> np.ndarray:
    """Residual mass r [N] float -> log codes [N] uint16; r <= 1e-30 is stored as 1e-30 (never 0)."""
    r = np.clip(np.asarray(residual, dtype=np.float64), RESIDUAL_FLOOR, 1.0)
    return np.rint(-np.log(r) / RESIDUAL_STEP).astype(np.uint16)


def decode_residual(codes: np.ndarray) -> np.ndarray:
    """Stored teacher_residual codes (uint16) -> residual mass (float32, same shape), in [1e-30, 1]."""
    return np.exp(codes.astype(np.float64) * -RESIDUAL_STEP).astype(np.float32)


def encode_labels(ids: np.ndarray, probs: np.ndarray, residual: np.ndarray, vocab_size: int):
    """Exact labels -> stored column values.

    ids [N, k] int (any order), probs [N, k] float, residual [N] float ->
    (id gaps [N, k] uint16|uint32, prob codes [N, k] uint16, residual codes [N] uint16): per
    position the ids ascending, stored as [id_0, id_1 - id_0, ...] (decode_ids), the codes in the
    same order. One sort of (id << 16 | code) keys orders both at once (6x cheaper than argsort and
    gather). Codes never round to 0: a zero bucket would be floored at 1e-30 by the loss and charge
    the student its whole mass there.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    codes = np.clip(np.rint(np.sqrt(p) * PROB_LEVELS), 1, PROB_LEVELS).astype(np.uint64)
    key = (np.asarray(ids).astype(np.uint64) << np.uint64(16)) | codes
    key.sort(axis=1)
    sorted_ids = (key >> np.uint64(16)).astype(id_dtype(vocab_size))
    gaps = np.diff(sorted_ids, axis=1, prepend=np.zeros((len(key), 1), sorted_ids.dtype))
    return gaps, (key & np.uint64(0xFFFF)).astype(np.uint16), encode_residual(residual)


def decode_ids(gaps: np.ndarray) -> np.ndarray:
    """Stored teacher_topk_ids gaps [..., k] -> the ascending ids (same dtype: ids fit it)."""
    return np.cumsum(gaps, axis=-1, dtype=gaps.dtype)


def decode_probs(codes: np.ndarray) -> np.ndarray:
    """Stored teacher_topk_probs codes (uint16) -> probabilities (float32, same shape)."""
    q = codes.astype(np.float32) / PROB_LEVELS
    return q * q


def id_dtype(vocab_size: int):
    """Narrowest unsigned width that holds every token id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def arrow_schema(k: int, vocab_size: int) -> pa.Schema:
    ids = pa.from_numpy_dtype(id_dtype(vocab_size))
    return pa.schema([
        pa.field(SEQ_ID, pa.int64(), nullable=False),
        pa.field(CORPUS, pa.string(), nullable=False),
        pa.field(SUBSET, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(ids), nullable=False),
        pa.field(TOPK_IDS, pa.list_(pa.list_(ids, k))),
        pa.field(TOPK_PROBS, pa.list_(pa.list_(pa.uint16(), k))),
        pa.field(RESIDUAL, pa.list_(pa.uint16())),
    ])


@dataclass
class ShardData:
    """One shard's rows as flat numpy buffers (no per-value Python objects).

    Row i's tokens are input_ids[tok_off[i]:tok_off[i+1]]; its labels (when labelled) are the
    positions pos_off[i]:pos_off[i+1] of the [P, k] / [P] label arrays, pos = tokens - 1 per row.
    """

    seq_id: np.ndarray          # [N] int64
    corpus: str
    subset: str
    split: list[str]            # [N]
    input_ids: np.ndarray       # [T] ids dtype
    tok_off: np.ndarray         # [N+1] int64
    topk_ids: np.ndarray | None = None     # [P, k] ids dtype, ascending per row
    topk_probs: np.ndarray | None = None   # [P, k] uint16 codes
    residual: np.ndarray | None = None     # [P] uint16 codes
    metadata: dict = field(default_factory=dict)  # bytes -> bytes, e.g. RESUME_KEY

    @property
    def tokens(self) -> int:
        return int(self.tok_off[-1])


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def shard_table(d: ShardData, k: int, vocab_size: int) -> pa.Table:
    """ShardData -> an Arrow table of `arrow_schema`, built straight from the numpy buffers."""
    schema = arrow_schema(k, vocab_size)
    n = len(d.seq_id)
    ids_t = id_dtype(vocab_size)
    cols = [
        pa.array(d.seq_id, pa.int64()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([d.corpus])).cast(pa.string()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([d.subset])).cast(pa.string()),
        pa.array(d.split, pa.string()),
        _list_array(d.tok_off, pa.array(d.input_ids.astype(ids_t, copy=False))),
    ]
    if d.topk_ids is None:
        cols += [pa.nulls(n, schema.field(c).type) for c in TEACHER_COLUMNS]
    else:
        pos_off = d.tok_off - np.arange(n + 1)
        cols += [
            _list_array(pos_off, pa.FixedSizeListArray.from_arrays(
                pa.array(d.topk_ids.astype(ids_t, copy=False).reshape(-1)), k)),
            _list_array(pos_off, pa.FixedSizeListArray.from_arrays(pa.array(d.topk_probs.reshape(-1)), k)),
            _list_array(pos_off, pa.array(d.residual)),
        ]
    return pa.Table.from_arrays(cols, schema=schema.with_metadata(d.metadata or None))


# Splitting the bytes of each id, gap and code into separate streams lets zstd see the runs in
# their high bytes (gaps are mostly < 256; codes < 1024 have six zero bits): ~20% smaller shards
# than plain encoding, same values (make bench).
COLUMN_ENCODING = {
    INPUT_IDS + ".list.element": "BYTE_STREAM_SPLIT",
    TOPK_IDS + ".list.element.list.element": "BYTE_STREAM_SPLIT",
    TOPK_PROBS + ".list.element.list.element": "BYTE_STREAM_SPLIT",
    RESIDUAL + ".list.element": "BYTE_STREAM_SPLIT",
}


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
        from .files import replace_durably  # the folder fsynced too: the name survives a power loss

        replace_durably(tmp, path)
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

    def __init__(self, k: int, vocab_size: int, zstd_level: int, threads: int, row_group_rows: int | None = None):
        self.k, self.vocab_size, self.zstd_level, self.row_group_rows = k, vocab_size, zstd_level, row_group_rows
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
                write_shard(path, shard_table(data, self.k, self.vocab_size), self.zstd_level, in_order,
                            self.row_group_rows)
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


def shard_resume(path: Path) -> dict | None:
    """The `mol.resume` record of a shard's Parquet metadata (None when absent or unreadable)."""
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[RESUME_KEY])
    except Exception:  # a torn or foreign file: the caller treats it as not written
        return None


# --------------------------------------------------------------------------- keys and layout


def unit_key(cfg: MolConfig, src: SourceConfig, *, model_fp: str, tokenizer_fp: str, chat_template: str | None,
             source_fp: str, source_format: str) -> dict:
    """Everything one source's unit depends on; its hash names the unit folder."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tokenizer_fp,
        "chat_template": chat_template,
        "chat_template_kwargs": cfg.model.chat_template_kwargs,
        "dtype": cfg.model.dtype,
        "backend": cfg.teacher.backend,
        # vLLM caches from prompt log-probs (before 2026-12-04) had a residual off by up to 54x at small r
        **({"vllm_labels": "hidden-states"} if cfg.teacher.backend == "vllm" else {}),
        "top_k": cfg.teacher.top_k,
        "labelled": src.corpus == "general" or cfg.teacher.label_domain,
        "rows_per_shard": cfg.teacher.rows_per_shard,
        "packing": {"max_seq_len": cfg.data.max_seq_len, "val_fraction": cfg.data.val_fraction,
                    "segment_bytes": cfg.data.segment_bytes, "on_bad_record": cfg.data.on_bad_record},
        "source": {"corpus": src.corpus, "subset": src.subset, "format": source_format, "sha256": source_fp,
                   **source_caps(src, cfg.data)},
    }


def row_group_rows(cfg: MolConfig) -> int:
    return max(1, cfg.teacher.row_group_tokens // cfg.data.max_seq_len)


def fingerprint(key) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name)[:48]


@dataclass
class ResolvedUnit:
    """One source resolved against the files on disk: its key and where its unit lives."""

    source: SourceConfig
    key: dict
    fingerprint: str
    dir: Path

    @property
    def labelled(self) -> bool:
        return self.key["labelled"]

    @property
    def name(self) -> str:
        return self.dir.name


@dataclass
class ResolvedKey:
    """A config resolved against the files on disk: its units, and the set folder naming them."""

    model_path: Path
    units: list[ResolvedUnit]
    key: dict
    fingerprint: str
    cache_dir: Path  # the set folder


def set_key(units: list[ResolvedUnit], cfg: MolConfig, model_fp: str, tokenizer_fp: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "model_fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fp,
            "top_k": cfg.teacher.top_k, "label_domain": cfg.teacher.label_domain,
            "packing": {"max_seq_len": cfg.data.max_seq_len},
            "units": [u.fingerprint for u in units]}


def resolve_cache_key(cfg: MolConfig, tokenizer=None) -> ResolvedKey:
    """Fingerprint the model, tokenizer, template and every source (file hashes only, no model load)."""
    model_path = resolve_model_path(cfg.model.name)
    tokenizer = tokenizer or load_tokenizer(model_path)
    model_fp, tok_fp = model_fingerprint(model_path), tokenizer_fingerprint(model_path)
    root = expand_path(cfg.teacher.cache_root)
    units = []
    for s in cfg.data.sources:
        p = expand_path(s.path)
        if not p.exists():
            raise MissingInput(f"{p}: source file does not exist (corpus {s.corpus}, subset {s.subset}); "
                                    f"for the default data run `make data`")
        key = unit_key(cfg, s, model_fp=model_fp, tokenizer_fp=tok_fp, chat_template=tokenizer.chat_template,
                       source_fp=source_fingerprint(p), source_format=detect_format(p, s.format))
        fp = fingerprint(key)
        units.append(ResolvedUnit(s, key, fp, root / UNITS_DIR / f"{s.corpus}-{_slug(s.subset)}-{fp[:16]}"))
    key = set_key(units, cfg, model_fp, tok_fp)
    fp = fingerprint(key)
    return ResolvedKey(model_path, units, key, fp, root / SETS_DIR / f"{_slug(cfg.model.name)}-{fp[:16]}")


# --------------------------------------------------------------------------- manifests


def write_manifest(folder: Path, manifest: dict) -> None:
    try:
        write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    except OSError as e:
        raise CacheError(f"{folder / MANIFEST}: could not write the manifest ({e}); every shard is kept "
                         f"and the next run only writes the manifest") from e


def _read_manifest(folder: Path, what: str) -> dict:
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CacheError(f"{folder}: no {MANIFEST}; the teacher pass did not finish (run `make teacher-cache`)")
    try:
        m = json.loads(mf.read_text())
    except (ValueError, OSError) as e:  # invalid JSON or UTF-8, or a file that cannot be read
        raise CacheError(f"{mf}: unreadable manifest ({e})") from None
    except RecursionError:  # valid JSON nested deeper than the parser's stack: no manifest is
        raise CacheError(f"{mf}: unreadable manifest (nested deeper than any manifest is)") from None
    version = m.get("schema_version") if isinstance(m, dict) else None
    if version != SCHEMA_VERSION:
        raise CacheError(f"{folder}: schema version {version} != {SCHEMA_VERSION} that this code reads; "
                         f"rebuild the cache (make teacher-cache)")
    if m.get("kind") != what:
        raise CacheError(f"{mf}: a {m.get('kind')!r} manifest where a {what!r} belongs")
    return m


def _type_problems(obj: dict, fields: dict, prefix: str = "") -> list[str]:
    return [f"'{prefix}{k}' missing or not a {t.__name__}" for k, t in fields.items()
            if not isinstance(obj.get(k), t) or (t is int and isinstance(obj.get(k), bool))]


_UNIT_FIELDS = {"fingerprint": str, "key": dict, "model": dict, "counts": dict, "totals": dict,
                "residual": dict, "shards": list}
_UNIT_KEY_FIELDS = {"model_fingerprint": str, "tokenizer_fingerprint": str, "top_k": int, "labelled": bool,
                    "rows_per_shard": int, "source": dict}
_SHARD_FIELDS = {"file": str, "segment": int, "part": int, "rows": int, "tokens": int, "bytes": int,
                 "sha256": str}
_SET_FIELDS = {"fingerprint": str, "key": dict, "model": dict, "counts": dict, "totals": dict,
               "residual": dict, "units": list}
_SET_KEY_FIELDS = {"model_fingerprint": str, "tokenizer_fingerprint": str, "top_k": int, "label_domain": bool}
_SET_UNIT_FIELDS = {"dir": str, "fingerprint": str, "corpus": str, "subset": str}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shard_entry_problems(sh: dict) -> list[str]:
    """What is wrong with one well-typed shard entry: its name, negative counts, val_rows the
    reader could not index with, a row group size it could not step by (verify compares the rest
    with the shard itself)."""
    out = []
    if Path(sh["file"]).name != sh["file"] or parse_shard_name(sh["file"]) != (sh["segment"], sh["part"]):
        out.append(f"file {sh['file']!r} is not segment {sh['segment']} part {sh['part']}'s name")
    neg = [f for f in ("segment", "part", "rows", "tokens", "bytes") if sh[f] < 0]
    if neg:
        out.append("negative " + ", ".join(neg))
    vr = sh.get("val_rows")
    if vr is not None and not (isinstance(vr, list) and all(_is_int(r) and 0 <= r < sh["rows"] for r in vr)
                               and all(a < b for a, b in zip(vr, vr[1:]))):
        out.append(f"val_rows is not an ascending list of row indices below {sh['rows']}")
    rg = sh.get("rows_per_group")
    if rg is not None and not (_is_int(rg) and rg > 0):
        out.append(f"rows_per_group {rg!r} is not a positive integer")
    return out


def unit_manifest_problems(m) -> list[str]:
    """What a readable unit manifest lacks for the reader and the CLIs to use it (empty = usable)."""
    out = _type_problems(m, _UNIT_FIELDS)
    if isinstance(m.get("key"), dict):
        out += _type_problems(m["key"], _UNIT_KEY_FIELDS, "key.")
        if isinstance(m["key"].get("source"), dict):
            out += _type_problems(m["key"]["source"], {"corpus": str, "subset": str}, "key.source.")
        if _is_int(m["key"].get("top_k")) and m["key"]["top_k"] < 1:
            out.append(f"'key.top_k' {m['key']['top_k']} is not positive")
        if _is_int(m["key"].get("rows_per_shard")) and m["key"]["rows_per_shard"] < 1:
            out.append(f"'key.rows_per_shard' {m['key']['rows_per_shard']} is not positive")
    if isinstance(m.get("model"), dict):
        out += _type_problems(m["model"], {"vocab_size": int}, "model.")
    for i, sh in enumerate(m.get("shards") if isinstance(m.get("shards"), list) else []):
        bad = _type_problems(sh, _SHARD_FIELDS) if isinstance(sh, dict) else ["an object"]
        bad = bad or _shard_entry_problems(sh)
        if bad:
            out.append(f"shards[{i}]: " + "; ".join(bad))
    return out


def set_manifest_problems(m) -> list[str]:
    """What a readable set manifest lacks for the trainer and the CLIs to use it (empty = usable)."""
    out = _type_problems(m, _SET_FIELDS)
    if isinstance(m.get("key"), dict):
        out += _type_problems(m["key"], _SET_KEY_FIELDS, "key.")
    if isinstance(m.get("model"), dict):
        out += _type_problems(m["model"], {"vocab_size": int}, "model.")
    for i, u in enumerate(m.get("units") if isinstance(m.get("units"), list) else []):
        bad = _type_problems(u, _SET_UNIT_FIELDS) if isinstance(u, dict) else ["an object"]
        if bad:
            out.append(f"units[{i}]: " + "; ".join(bad))
        elif Path(u["dir"]).parts[:1] != (UNITS_DIR,) or len(Path(u["dir"]).parts) != 2:
            out.append(f"units[{i}]: dir {u['dir']!r} is not units/<name>")
    return out


def shard_entry(*, file: str, segment: int, part: int, rows: int, tokens: int, bytes: int, sha256: str,
                rows_per_group: int, val_rows) -> dict:
    """One shard's record in its unit manifest's `shards` list: its file name (shard_name(segment,
    part)), rows, tokens, size and sha256 (what verify checks), rows per Parquet row group, and where
    the val rows are (Stage 2's reader builds its index from these records alone)."""
    return {"file": file, "segment": segment, "part": part, "rows": rows, "tokens": tokens, "bytes": bytes,
            "sha256": sha256, "rows_per_group": rows_per_group, "val_rows": val_rows}


def _sample_quantiles(sample: np.ndarray) -> dict:
    """median, p90, p99 and max of a residual sample (a unit's, or its set's units' pooled)."""
    return {"median": float(np.median(sample)), "p90": float(np.quantile(sample, 0.9)),
            "p99": float(np.quantile(sample, 0.99)), "max_sampled": float(sample.max())}


def unit_manifest(*, fingerprint: str, key: dict, model_name: str, vocab_size: int, eos_token_id: int | None,
                  pad_token_id: int | None, source: dict, segments: int, counts: dict, shards: list[dict],
                  residual: dict, residual_sample: list[float], device: str, dtype: str | None, host: str,
                  torch_version: str, worker_stats: list[dict], fidelity: dict | None = None) -> dict:
    """A unit's manifest.json, assembled from what the teacher pass gathered (pure: reads nothing).

    key, fingerprint: the unit's `unit_key` and its hash. source: the source report (a dict).
    segments: how many segments the source was cut into. counts: {"train"|"val": {"sequences",
    "tokens"}} summed over the shards. shards: their `shard_entry` records, in order. residual: the
    shards' residual records (`teacher.residual_stats`) summed: {"sum", "n", "below_floor",
    "fp16_zero", "fp16_subnormal"}, n = 0 for an unlabelled unit (its `residual` section is then
    empty); residual_sample: the shards' samples concatenated. worker_stats: one record per worker
    process that labelled the unit ({"forward_tokens", "forward_seconds", "seconds"}).
    fidelity: `teacher.measure_fidelity`'s record, when measured (it reads the unit through this
    manifest, so it is measured on the manifest without it, which is then built again with it).
    Totals, the residual statistics and the run section are derived here."""
    total_tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
    total_bytes = sum(m["bytes"] for m in shards)
    rs = np.array(residual_sample if residual_sample else [0.0])
    fwd_tokens = sum(s.get("forward_tokens", 0) for s in worker_stats)
    fwd_seconds = sum(s.get("forward_seconds", 0.0) for s in worker_stats)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "unit",
        "fingerprint": fingerprint,
        "key": key,
        "model": {"name": model_name, "vocab_size": vocab_size},
        "tokenizer": {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id},
        "source": source,
        "segments": segments,
        "counts": counts,
        "totals": {"sequences": sum(m["rows"] for m in shards), "tokens": total_tokens, "bytes": total_bytes,
                   "bytes_per_token": total_bytes / max(total_tokens, 1)},
        "residual": ({"mean": residual["sum"] / max(residual["n"], 1), **_sample_quantiles(rs),
                      "positions": residual["n"],
                      "below_1e-30": residual["below_floor"], "fp16_would_be_zero": residual["fp16_zero"],
                      "fp16_would_be_subnormal": residual["fp16_subnormal"],
                      "sample": [float(v) for v in rs[np.linspace(0, len(rs) - 1, min(256, len(rs))).astype(int)]]}
                     if residual["n"] else {}),
        "shards": shards,
        "run": {"device": device, "dtype": dtype, "host": host, "torch": torch_version,
                "workers": len(worker_stats) or 1,
                # per worker process: the figure one process reaches, comparable across worker counts
                "teacher_tokens_per_s": fwd_tokens / fwd_seconds if fwd_seconds else None,
                "forward_tokens": fwd_tokens, "forward_seconds": fwd_seconds,
                "seconds": sum(s.get("seconds", 0.0) for s in worker_stats)},
    }
    if fidelity is not None:
        manifest["fidelity"] = fidelity
    return manifest


def _weighted(units: list[dict], section: str, field: str, weight: str) -> float | None:
    """The mean of units' section[field] weighted by section[weight] (None when no unit has it)."""
    pairs = [(u[section][field], u[section][weight]) for u in units if u.get(section) and field in u[section]]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def set_manifest(*, fingerprint: str, key: dict, model_name: str, model_path: str, units: list[dict],
                 unit_names: list[str], this_pass: list[dict], device: str, this_pass_seconds: float) -> dict:
    """A set's manifest.json from its units' manifests, in config order (pure: reads nothing).

    key, fingerprint: the set's `set_key` and its hash. units: the unit manifests; unit_names: their
    folder names under units/; this_pass: what this pass did to each ({"status", "labelled_tokens"}).
    Counts are keyed corpus/subset/split; totals are summed; the residual and fidelity means are
    weighted by each unit's positions (its quantiles come from the units' samples pooled)."""
    if not len(units) == len(unit_names) == len(this_pass):
        raise ValueError(f"{len(units)} unit manifests, {len(unit_names)} names, {len(this_pass)} this_pass records")
    counts, totals = {}, {"sequences": 0, "tokens": 0, "bytes": 0}
    for m in units:
        src = m["key"]["source"]
        for sp, c in m["counts"].items():
            counts[f"{src['corpus']}/{src['subset']}/{sp}"] = dict(c)
        for f in totals:
            totals[f] += m["totals"][f]
    totals["bytes_per_token"] = totals["bytes"] / max(totals["tokens"], 1)
    labelled = [m for m in units if m["residual"]]
    sample = np.array([v for m in labelled for v in m["residual"]["sample"]] or [0.0])
    residual = {"mean": _weighted(labelled, "residual", "mean", "positions") or 0.0, **_sample_quantiles(sample),
                "positions": sum(m["residual"]["positions"] for m in labelled)}
    for f in ("below_1e-30", "fp16_would_be_zero", "fp16_would_be_subnormal"):
        residual[f] = sum(m["residual"][f] for m in labelled)
    measured = [m for m in units if m.get("fidelity")]
    fidelity = {}
    if measured:
        fidelity = {"probe": measured[0]["fidelity"]["probe"],
                    "sequences": sum(m["fidelity"]["sequences"] for m in measured),
                    "positions": sum(m["fidelity"]["positions"] for m in measured),
                    "kl_quantisation_max_abs": max(m["fidelity"]["kl_quantisation_max_abs"] for m in measured)}
        for f in ("topk_ids_exact_match", "kl_quantisation_mean_abs", "kl_truncation_mean_abs", "kl_dense_mean"):
            fidelity[f] = _weighted(measured, "fidelity", f, "positions")
    fwd_tokens = sum(m["run"]["forward_tokens"] for m in units)
    fwd_seconds = sum(m["run"]["forward_seconds"] for m in units)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "set",
        "fingerprint": fingerprint,
        "key": key,
        "model": {"name": model_name, "path": model_path, "vocab_size": max(m["model"]["vocab_size"] for m in units)},
        "tokenizer": units[0]["tokenizer"],
        "units": [{"dir": f"{UNITS_DIR}/{name}", "fingerprint": m["fingerprint"], "corpus": m["key"]["source"]["corpus"],
                   "subset": m["key"]["source"]["subset"], "sequences": m["totals"]["sequences"],
                   "tokens": m["totals"]["tokens"], "bytes": m["totals"]["bytes"], "this_pass": tp}
                  for name, m, tp in zip(unit_names, units, this_pass)],
        "counts": counts,
        "totals": totals,
        "residual": residual,
        "run": {"device": device, "workers": max(m["run"]["workers"] for m in units),
                "teacher_tokens_per_s": fwd_tokens / fwd_seconds if fwd_seconds else None,
                "forward_tokens": fwd_tokens, "seconds": sum(m["run"]["seconds"] for m in units),
                "this_pass_seconds": this_pass_seconds},
    }
    if fidelity:
        manifest["fidelity"] = fidelity
    return manifest


# --------------------------------------------------------------------------- reading


@dataclass
class Sequences:
    """Sequences of one split held as flat numpy arrays with offsets (no per-row Python objects).

    Row i spans input_ids[tok_off[i]:tok_off[i+1]] and teacher arrays [pos_off[i]:pos_off[i+1]],
    where pos = tok - 1 per row.
    """

    seq_id: np.ndarray
    corpus: np.ndarray          # object array of str
    subset: np.ndarray
    input_ids: np.ndarray       # [total_tokens] int64
    tok_off: np.ndarray         # [N+1]
    teacher_topk_ids: np.ndarray | None    # [total_positions, k] ids (decoded from the stored gaps)
    teacher_topk_probs: np.ndarray | None  # [total_positions, k] uint16 codes, as stored (compact)
    teacher_residual: np.ndarray | None    # [total_positions] uint16 log codes, as stored
    has_teacher: np.ndarray     # [N] bool
    pos_off: np.ndarray         # [N+1]

    def __len__(self) -> int:
        return len(self.seq_id)

    def row(self, i: int) -> dict:
        """One sequence as a dict keyed by the column names (teacher arrays None when unlabeled);
        teacher probabilities and residual decoded to float32."""
        a, b = self.tok_off[i], self.tok_off[i + 1]
        out = {SEQ_ID: int(self.seq_id[i]), CORPUS: self.corpus[i], SUBSET: self.subset[i],
               INPUT_IDS: self.input_ids[a:b]}
        if self.has_teacher[i]:
            p, q = self.pos_off[i], self.pos_off[i + 1]
            out[TOPK_IDS] = self.teacher_topk_ids[p:q]
            out[TOPK_PROBS] = decode_probs(self.teacher_topk_probs[p:q])
            out[RESIDUAL] = decode_residual(self.teacher_residual[p:q])
        else:
            out[TOPK_IDS] = out[TOPK_PROBS] = out[RESIDUAL] = None
        return out


def sequences_from_tables(tables: list[pa.Table], where: Path, k: int, rows: np.ndarray | None = None) -> Sequences | None:
    """Tables of the cache's columns -> Sequences (None when they hold no rows).

    Every labelled row must hold one teacher position per token but the last, in each of the three
    teacher columns (a shard whose list offsets disagree would shift every later row's labels onto
    the wrong tokens); a CacheError names `where` and the row (`rows[i]`, default i)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    t = pa.concat_tables(tables).combine_chunks()
    ids_col = t.column(INPUT_IDS).chunk(0)
    tok_off = ids_col.offsets.to_numpy().astype(np.int64)
    tok_off = tok_off - tok_off[0]
    input_ids = ids_col.flatten().to_numpy().astype(np.int64)
    n = t.num_rows
    if RESIDUAL in t.column_names:
        has = np.asarray(t.column(RESIDUAL).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    else:
        has = np.zeros(n, dtype=bool)
    lens = np.diff(tok_off)
    pos_off = np.zeros(n + 1, dtype=np.int64)
    pos_off[1:] = np.cumsum(np.where(has, lens - 1, 0))
    tk_ids = tk_probs = resid = None
    if has.any():
        want = np.where(has, lens - 1, 0)
        for col in TEACHER_COLUMNS:
            got = pc.list_value_length(t.column(col).chunk(0)).fill_null(0).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero((got != want) | (np.asarray(t.column(col).is_valid().to_numpy(zero_copy_only=False)) != has))
            if len(bad):
                i = int(bad[0])
                raise CacheError(f"{where}: row {i if rows is None else int(rows[i])}: {col} holds {got[i]} positions"
                                 f" where its {lens[i]} tokens need {max(lens[i] - 1, 0) if has[i] else 0}")
        # null rows contribute no values to the flattened children, so offsets line up with pos_off
        tk_ids = decode_ids(t.column(TOPK_IDS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k))
        tk_probs = t.column(TOPK_PROBS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k)
        resid = t.column(RESIDUAL).chunk(0).flatten().to_numpy()
    return Sequences(
        seq_id=t.column(SEQ_ID).to_numpy(),
        corpus=np.array(t.column(CORPUS).to_pylist(), dtype=object),
        subset=np.array(t.column(SUBSET).to_pylist(), dtype=object),
        input_ids=input_ids, tok_off=tok_off,
        teacher_topk_ids=tk_ids, teacher_topk_probs=tk_probs, teacher_residual=resid,
        has_teacher=has, pos_off=pos_off,
    )


MASS_TOLERANCE = 0.02
"""How far a position's decoded k probabilities plus residual may sum from 1. Quantisation moves
the sum by at most sum_j sqrt(p_j)/1023 + k/1023² (<= 0.0055 at k = 31) plus the residual code's
5.3e-4 relative error; a sum further off is not a distribution the teacher gave."""


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    """The row whose [offsets[i], offsets[i+1]) span holds a flat index."""
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def sequences_problem(seqs: Sequences, *, vocab_size: int, labelled: bool | None = None,
                      seq_ids: np.ndarray | None = None, rows: np.ndarray | None = None) -> str | None:
    """The first value of `seqs` that the cache contract rules out, as "row R: what" (None when
    every value is in range); rows[i] names row i (default: i). Vectorised over whole arrays, one
    comparison a column on the way through, so the reader can afford it on every row group.

    - seq_id equals `seq_ids` (the ids the rows' places give: segment · 2^32 + part ·
      rows_per_shard + row) when given: a duplicated or moved row is caught
    - every row has a token; labelled rows have labels, and none when `labelled` is False
    - input ids and teacher ids < vocab_size (a larger id indexes past the embedding)
    - each position's teacher ids strictly ascending (the gaps decode to a set; a wrapped sum or a
      zero gap would put one id twice)
    - probability codes in [1, PROB_LEVELS] (a 0 code is no probability the encoder writes)
    - decoded probabilities + residual sum to 1 within MASS_TOLERANCE (every uint16 is a valid
      residual code; only its balance with the probabilities can be wrong)
    """
    name = (lambda i: int(i)) if rows is None else (lambda i: int(rows[i]))
    if seq_ids is not None:
        bad = np.flatnonzero(seqs.seq_id != seq_ids)
        if len(bad):
            i = bad[0]
            return (f"row {name(i)}: seq_id {int(seqs.seq_id[i])}, where its place in the unit gives {int(seq_ids[i])}"
                    f" (a row duplicated, moved or from elsewhere)")
    lens = np.diff(seqs.tok_off)
    bad = np.flatnonzero(lens < 1)
    if len(bad):
        return f"row {name(bad[0])}: an empty sequence"
    if labelled is not None:
        bad = np.flatnonzero(seqs.has_teacher != labelled)
        if len(bad):
            return f"row {name(bad[0])}: " + ("no teacher labels in a labelled unit" if labelled
                                               else "teacher labels in an unlabelled unit")
    ids = seqs.input_ids
    if len(ids) and int(ids.max()) >= vocab_size:
        j = int(np.argmax(ids >= vocab_size))
        i = _row_of(seqs.tok_off, j)
        return f"row {name(i)}: input id {int(ids[j])} at token {j - int(seqs.tok_off[i])} is >= the vocabulary size {vocab_size}"
    tk = seqs.teacher_topk_ids
    if tk is None or not len(tk):
        return None

    def at(p: int) -> str:
        i = _row_of(seqs.pos_off, p)
        return f"row {name(i)} position {p - int(seqs.pos_off[i])}"

    if tk.shape[1] > 1 and not (tk[:, 1:] > tk[:, :-1]).all():
        p = int(np.argmax(~(tk[:, 1:] > tk[:, :-1]).all(axis=1)))
        return f"{at(p)}: teacher ids {tk[p].tolist()} are not strictly ascending (corrupt id gaps)"
    if int(tk[:, -1].max()) >= vocab_size:
        p = int(np.argmax(tk[:, -1] >= vocab_size))
        return f"{at(p)}: teacher id {int(tk[p, -1])} is >= the vocabulary size {vocab_size}"
    q = seqs.teacher_topk_probs
    if int(q.min()) < 1 or int(q.max()) > PROB_LEVELS:
        p = int(np.argmax(((q < 1) | (q > PROB_LEVELS)).any(axis=1)))
        return f"{at(p)}: probability codes {q[p].tolist()} outside [1, {PROB_LEVELS}]"
    qi = q.astype(np.int32)  # sum_j q_j² <= k · 1023² fits int32 for any k below 2052
    mass = (qi * qi).sum(axis=1) * (1.0 / PROB_LEVELS ** 2) + decode_residual(seqs.teacher_residual)
    off = np.abs(mass - 1.0) > MASS_TOLERANCE
    if off.any():
        p = int(np.argmax(off))
        return (f"{at(p)}: its {tk.shape[1]} probabilities and residual sum to {float(mass[p]):.4f}, not 1"
                f" (probability codes {q[p].tolist()}, residual code {int(seqs.teacher_residual[p])})")
    return None


def concat_sequences(parts: list[Sequences]) -> Sequences:
    if len(parts) == 1:
        return parts[0]
    tok = np.concatenate([[0]] + [p.tok_off[1:] + sum(q.tok_off[-1] for q in parts[:i]) for i, p in enumerate(parts)])
    pos = np.concatenate([[0]] + [p.pos_off[1:] + sum(q.pos_off[-1] for q in parts[:i]) for i, p in enumerate(parts)])
    labelled = [p for p in parts if p.teacher_topk_ids is not None]

    def cat(name):
        return np.concatenate([getattr(p, name) for p in labelled]) if labelled else None

    return Sequences(
        seq_id=np.concatenate([p.seq_id for p in parts]), corpus=np.concatenate([p.corpus for p in parts]),
        subset=np.concatenate([p.subset for p in parts]), input_ids=np.concatenate([p.input_ids for p in parts]),
        tok_off=tok.astype(np.int64), teacher_topk_ids=cat("teacher_topk_ids"),
        teacher_topk_probs=cat("teacher_topk_probs"), teacher_residual=cat("teacher_residual"),
        has_teacher=np.concatenate([p.has_teacher for p in parts]), pos_off=pos.astype(np.int64))


class CacheUnit:
    """One source's complete unit folder, opened through its manifest."""

    def __init__(self, path: Path | str, fingerprint: str | None = None):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path, "unit")
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
    def vocab_size(self) -> int:
        return self.manifest["model"]["vocab_size"]

    @property
    def key(self) -> dict:
        """What the unit's bytes depend on: model and tokenizer fingerprints, k, labelled, source, packing."""
        return self.manifest["key"]

    @property
    def k(self) -> int:
        return self.key["top_k"]

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
    def totals(self) -> dict:
        """sequences, tokens, bytes, bytes_per_token."""
        return self.manifest["totals"]

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


def record_problems(rec: dict, rows: int, val_rows, last_part: bool | None) -> list[str]:
    """What a shard's resume record claims that its footer or its manifest entry contradicts: its
    row count, its per-split counts (rows), its val_rows, and whether it ends its segment
    (`last_part`, when known). Stage 1 trusts these records to resume and to write the manifest."""
    out = []
    if not isinstance(rec.get("end"), bool) or not isinstance(rec.get("state"), dict):
        out.append("its resume record lacks its end flag or its packer state")
    if rec.get("rows") != rows:
        out.append(f"its resume record says {rec.get('rows')} rows, the shard holds {rows}")
    counts = rec.get("counts")
    try:
        counted = sum(int(c[0]) for c in counts.values())
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        counted = None
    if counted != rows:
        out.append(f"its resume record counts {counted} rows by split, the shard holds {rows}")
    if val_rows is not None and rec.get("val_rows") != val_rows:
        out.append(f"its resume record puts rows {rec.get('val_rows')} in val, the manifest says {val_rows}")
    if last_part is not None and rec.get("end") is not last_part:
        out.append("its resume record says it " + ("ends" if rec.get("end") else "does not end")
                   + " its segment, the manifest lists " + ("no later part" if last_part else "later parts"))
    return out


def table_record_problems(t: pa.Table, rec: dict, first_seq_id: int) -> list[str]:
    """What a shard's rows (a table with its seq_id, split and input_ids columns) contradict in its
    resume record: the row count, seq_ids first_seq_id, first_seq_id + 1, ... (its place in the
    unit: a row copied from another part carries another's), val_rows, and the per-split row and
    token counts. Stage 1 resumes from and writes the manifest with these records, so a forged
    one must not be believed; a list of "row R: what" / "what" problems (empty = consistent)."""
    n = t.num_rows
    out = record_problems(rec, n, None, None)
    seq = t.column(SEQ_ID).to_numpy()
    bad = np.flatnonzero(seq != first_seq_id + np.arange(n))
    if len(bad):
        i = int(bad[0])
        out.append(f"row {i}: seq_id {int(seq[i])}, where its place in the unit gives {first_seq_id + i}"
                   f" (a row duplicated, moved or from elsewhere)")
    split = np.asarray(t.column(SPLIT).to_numpy(zero_copy_only=False), dtype=object)
    odd = np.flatnonzero((split != "train") & (split != "val"))
    if len(odd):
        out.append(f"row {int(odd[0])}: split {split[odd[0]]!r} is neither train nor val")
    val = np.flatnonzero(split == "val").tolist()
    if rec.get("val_rows") != val:
        out.append(f"its split column puts rows {val[:20]} in val, its resume record says {str(rec.get('val_rows'))[:80]}")
    lens = pc.list_value_length(t.column(INPUT_IDS)).to_numpy(zero_copy_only=False)
    counts = rec.get("counts") if isinstance(rec.get("counts"), dict) else {}
    for sp in ("train", "val"):
        have = [int((split == sp).sum()), int(lens[split == sp].sum())]
        if counts.get(sp) != have:
            out.append(f"its resume record counts {counts.get(sp)} {sp} [rows, tokens], the shard holds {have}")
    return out


def shard_record_problems(path: Path, rec: dict, first_seq_id: int) -> list[str]:
    """`table_record_problems` for a shard file (reads its seq_id, split and input_ids columns)."""
    try:
        t = pq.read_table(path, columns=[SEQ_ID, SPLIT, INPUT_IDS])
    except Exception as e:  # a torn or foreign file
        return [f"unreadable Parquet ({e})"]
    return table_record_problems(t, rec, first_seq_id)


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


def sets_using(root: Path) -> dict[str, list[str]]:
    """unit folder name -> the set folders (configs' caches) under `root` that list it; a set manifest
    that cannot be read is skipped (an inventory lists what it can)."""
    users: dict[str, list[str]] = {}
    for mf in sorted((root / SETS_DIR).glob(f"*/{MANIFEST}")):
        try:
            m = json.loads(mf.read_text())
            for u in m.get("units", []):
                users.setdefault(Path(u["dir"]).name, []).append(mf.parent.name)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            continue
    return users


class TeacherCache:
    """A config's complete cache: its set manifest and the units it lists, in config order."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path, "set")
        problems = set_manifest_problems(self.manifest)
        if problems:
            raise CacheError(f"{self.path / MANIFEST}: malformed manifest: " + "; ".join(problems))
        root = self.path.parent.parent
        self.units = [CacheUnit(root / u["dir"], u["fingerprint"]) for u in self.manifest["units"]]

    @property
    def key(self) -> dict:
        """What the set depends on: model and tokenizer fingerprints, k, label_domain, packing, its units."""
        return self.manifest["key"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def k(self) -> int:
        return self.key["top_k"]

    @property
    def label_domain(self) -> bool:
        return self.key["label_domain"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["model"]["vocab_size"]

    @property
    def totals(self) -> dict:
        """sequences, tokens, bytes, bytes_per_token over every unit."""
        return self.manifest["totals"]

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

    def verify(self, progress=None, *, checksums: bool = True, contents: bool = True) -> list[str]:
        """Every unit's checks (see CacheUnit.verify: `checksums` and `contents` as there), and each
        unit against the set's model, k and vocabulary (the readers check ids against the set's)."""
        problems = []
        key = self.manifest["key"]
        for u in self.units:
            uk = u.manifest["key"]
            for name in ("model_fingerprint", "tokenizer_fingerprint", "top_k"):
                if uk[name] != key[name]:
                    problems.append(f"{UNITS_DIR}/{u.path.name}: {name} {str(uk[name])[:12]} != the set's {str(key[name])[:12]}")
            if u.vocab_size != self.vocab_size:
                problems.append(f"{UNITS_DIR}/{u.path.name}: vocab_size {u.vocab_size} != the set's {self.vocab_size}")
            problems += u.verify(progress, checksums=checksums, contents=contents)
        return problems

    def check_compatible(self, *, model_fp: str, tokenizer_fp: str, k: int, vocab_size: int | None = None) -> None:
        """Refuse a cache made by another model, tokenizer, k or vocabulary than the run's (a cache
        whose ids may reach past the run's vocabulary would index past its embedding)."""
        key = self.manifest["key"]
        problems = []
        if vocab_size is not None and self.vocab_size > vocab_size:
            problems.append(f"vocab_size {self.vocab_size} > the run model's {vocab_size}")
        if key["model_fingerprint"] != model_fp:
            problems.append(f"model fingerprint {key['model_fingerprint'][:12]} != run's {model_fp[:12]}")
        if key["tokenizer_fingerprint"] != tokenizer_fp:
            problems.append(f"tokenizer fingerprint {key['tokenizer_fingerprint'][:12]} != run's {tokenizer_fp[:12]}")
        if key["top_k"] != k:
            problems.append(f"k = {key['top_k']} != run's teacher.top_k = {k}")
        if problems:
            raise CacheError(f"cache {self.path} does not match this run: " + "; ".join(problems))

    def load(self, split: str, corpus: str | None = None, columns_teacher: bool = True) -> Sequences:
        """Read every row of `split` (optionally one corpus) into flat numpy arrays, units in order."""
        parts = [s for u in self.units if corpus in (None, u.corpus)
                 if (s := u.load(split, columns_teacher)) is not None]
        if not parts:
            raise CacheError(f"{self.path}: no {split} rows" + (f" for corpus {corpus}" if corpus else ""))
        return concat_sequences(parts)


# --------------------------------------------------------------------------- the dataset card


def _features_yaml(k: int, vocab_size: int) -> str:
    ids = "uint16" if id_dtype(vocab_size) is np.uint16 else "uint32"
    return f"""  features:
  - name: {SEQ_ID}
    dtype: int64
  - name: {CORPUS}
    dtype: string
  - name: {SUBSET}
    dtype: string
  - name: {SPLIT}
    dtype: string
  - name: {INPUT_IDS}
    list: {ids}
  - name: {TOPK_IDS}
    list:
      list: {ids}
      length: {k}
  - name: {TOPK_PROBS}
    list:
      list: uint16
      length: {k}
  - name: {RESIDUAL}
    list: uint16
"""


def write_card(folder: Path, manifest: dict) -> None:
    """The unit's README.md: a Hugging Face dataset card, so `datasets.load_dataset(folder)` loads
    it and `hf upload` publishes it as it is."""
    key, src = manifest["key"], manifest["key"]["source"]
    k, vocab = key["top_k"], manifest["model"]["vocab_size"]
    t = manifest["totals"]
    text = f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "shard-*.parquet"
dataset_info:
{_features_yaml(k, vocab)}tags:
- mol
- knowledge-distillation
- teacher-labels
---
# MoL teacher labels: {src['corpus']}/{src['subset']}

Top-{k} next-token distributions of **{manifest['model']['name']}** over one packed corpus, made by
MoL's Stage 1 (`make teacher-cache`) for Mixture-of-Losses training (arXiv 2505.12043). One row is
one packed sequence; the `split` column holds MoL's own train/val split (the dataset's single split
is named `train` only because the Hub requires one).

| | |
|---|---|
| unit fingerprint | `{manifest['fingerprint']}` |
| model fingerprint | `{key['model_fingerprint']}` |
| tokenizer fingerprint | `{key['tokenizer_fingerprint']}` |
| k | {k} (+ one residual bucket) |
| labelled | {key['labelled']} |
| source sha256 | `{src['sha256']}` ({src['format']}) |
| packing | max_seq_len {key['packing']['max_seq_len']}, val_fraction {key['packing']['val_fraction']} |
| sequences / tokens | {t['sequences']} / {t['tokens']} |
| bytes per token | {t['bytes_per_token']:.1f} |
| schema version | {manifest['schema_version']} |

Columns (`mol/cache.py` is the contract): `input_ids` [L]; `teacher_topk_ids` [L-1, k] the ascending ids
as gaps g, id_j = g_0 + ... + g_j (`numpy.cumsum(g, axis=-1)`);
`teacher_topk_probs` [L-1, k] codes q, p = (q / 1023)^2; `teacher_residual` [L-1] codes u,
r = exp(-u * ln(1e30) / 65535). MoL verifies every shard's sha256 against `manifest.json` before
it uses a downloaded unit, and refuses one whose model or tokenizer fingerprint differs from the run's.
"""
    write_atomic(folder / CARD, text.encode())
