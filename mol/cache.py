"""The Stage 1 <-> Stage 2 contract: the teacher cache's schema, fingerprint, manifest and reader.

A cache is a folder `<cache_root>/<model>-<fingerprint[:16]>/` holding

    shard-00000.parquet ...   one row per packed sequence (zstd), written to a temp name and renamed
    manifest.json             written LAST: its presence means the cache is complete
    config.yaml               the resolved config that built it

Columns (the same names are the batch keys in Stage 2 and the loss function's arguments):

    seq_id              int64                               global sequence index, 0..N-1
    corpus              string                              "domain" | "general"
    subset              string                              e.g. "medqa"
    split               string                              "train" | "val"
    input_ids           list<uint16|uint32>  [L]            packed tokens (uint16 when vocab <= 65536)
    teacher_topk_ids    list<fixed_size_list<uint16|uint32, k>>  [L-1, k]
                                                            base model's top-k next-token ids at every
                                                            position t < L-1 (predicting token t+1),
                                                            in ascending id order (a set, not a ranking)
    teacher_topk_probs  list<fixed_size_list<uint16, k>>    [L-1, k]  their probabilities as codes
                                                            q = round(1023 sqrt(p)) in [1, 1023];
                                                            p = (q / 1023)^2 (decode_probs)
    teacher_residual    list<float16>        [L-1]          mass of all other tokens (computed exactly,
                                                            then rounded to fp16)

Why this encoding (schema 2; `make bench` measures every alternative): a uniform grid on sqrt(p)
is finest where the KL is sensitive (an absolute error ~ sqrt(p)/1023 in p, so ~1e-4 relative
near p = 1/100), costs a mean |ΔKL| of ~3e-4 nats/token against the exact labels, and with
ascending ids, BYTE_STREAM_SPLIT and zstd 19 brings a cache to ~72 bytes/token at k = 31 (fp16
probs and fp32 residual in schema 1: ~97). Readers get float32 probabilities back from
`Sequences.row` (or `decode_probs` on the raw column); the loss renormalises the k+1 buckets, so
the few 1e-4 by which a decoded position misses a sum of 1 never makes a KL negative.

The teacher columns are null on rows the teacher did not label (domain rows when
`teacher.label_domain` is false; the manifest says so in `teacher.label_domain`).
Every position is a training target; there is no separate loss mask (the last sequence of a
subset is simply shorter than max_seq_len).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import MolConfig, expand_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.parquet"

SEQ_ID = "seq_id"
CORPUS = "corpus"
SUBSET = "subset"
SPLIT = "split"
INPUT_IDS = "input_ids"
TOPK_IDS = "teacher_topk_ids"
TOPK_PROBS = "teacher_topk_probs"
RESIDUAL = "teacher_residual"
TEACHER_COLUMNS = (TOPK_IDS, TOPK_PROBS, RESIDUAL)


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt or does not match the run."""


PROB_LEVELS = 1023  # 10-bit codes of sqrt(p), stored as uint16 (BYTE_STREAM_SPLIT keeps the zero bits cheap)


def encode_labels(ids: np.ndarray, probs: np.ndarray, residual: np.ndarray, vocab_size: int):
    """Exact labels -> stored column values.

    ids [N, k] int (any order), probs [N, k] float, residual [N] float ->
    (ids [N, k] uint16|uint32 ascending, codes [N, k] uint16, residual [N] float16).
    Codes never round to 0: a zero bucket would be floored at 1e-30 by the loss and charge the
    student its whole mass there.
    """
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, 1)
    p = np.take_along_axis(probs, order, 1).astype(np.float64)
    codes = np.clip(np.rint(np.sqrt(np.clip(p, 0.0, 1.0)) * PROB_LEVELS), 1, PROB_LEVELS).astype(np.uint16)
    id_dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    return ids.astype(id_dtype), codes, residual.astype(np.float16)


def decode_probs(codes: np.ndarray) -> np.ndarray:
    """Stored teacher_topk_probs codes (uint16) -> probabilities (float32, same shape)."""
    q = codes.astype(np.float32) / PROB_LEVELS
    return q * q


def id_type(vocab_size: int) -> pa.DataType:
    """Narrowest unsigned width that holds every token id."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def arrow_schema(k: int, vocab_size: int) -> pa.Schema:
    ids = id_type(vocab_size)
    return pa.schema([
        pa.field(SEQ_ID, pa.int64(), nullable=False),
        pa.field(CORPUS, pa.string(), nullable=False),
        pa.field(SUBSET, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(ids), nullable=False),
        pa.field(TOPK_IDS, pa.list_(pa.list_(ids, k))),
        pa.field(TOPK_PROBS, pa.list_(pa.list_(pa.uint16(), k))),
        pa.field(RESIDUAL, pa.list_(pa.float16())),
    ])


def cache_key(cfg: MolConfig, *, model_fp: str, tokenizer_fp: str, chat_template: str | None,
              source_fps: list[str]) -> dict:
    """Everything the cache's content depends on; its hash names the cache folder."""
    key = {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tokenizer_fp,
        "chat_template": chat_template,
        "chat_template_kwargs": cfg.model.chat_template_kwargs,
        "dtype": cfg.model.dtype,
        "top_k": cfg.teacher.top_k,
        "label_domain": cfg.teacher.label_domain,
        "rows_per_shard": cfg.teacher.rows_per_shard,
        "packing": {
            "max_seq_len": cfg.data.max_seq_len,
            "val_fraction": cfg.data.val_fraction,
            "max_train_sequences": cfg.data.max_train_sequences,
            "max_val_sequences": cfg.data.max_val_sequences,
            "on_bad_record": cfg.data.on_bad_record,
        },
        "sources": [
            {"corpus": s.corpus, "subset": s.subset, "format": s.format, "max_records": s.max_records,
             "max_train_sequences": s.max_train_sequences, "max_val_sequences": s.max_val_sequences, "sha256": fp}
            for s, fp in zip(cfg.data.sources, source_fps)
        ],
    }
    if cfg.teacher.backend != "transformers":  # only then: keeps every transformers cache's fingerprint
        key["backend"] = cfg.teacher.backend
    return key


def fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_dir_for(cfg: MolConfig, model_name: str, fp: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model_name).name)[:48]
    return expand_path(cfg.teacher.cache_root) / f"{slug}-{fp[:16]}"


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
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


# Splitting the bytes of each id and probability code into separate streams lets zstd see the
# runs in their high bytes (ascending ids share them; codes < 1024 have six zero bits): ~20%
# smaller shards than plain encoding, same values (make bench).
_BYTE_STREAM_SPLIT = {
    TOPK_IDS + ".list.element.list.element": "BYTE_STREAM_SPLIT",
    TOPK_PROBS + ".list.element.list.element": "BYTE_STREAM_SPLIT",
}


def write_shard(path: Path, table: pa.Table, zstd_level: int) -> None:
    """Write to a temp name, fsync, rename: a shard that exists under its final name is complete."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=zstd_level,
                       use_dictionary=[CORPUS, SUBSET, SPLIT], write_statistics=[SEQ_ID],
                       column_encoding=_BYTE_STREAM_SPLIT)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a lost mount...: pyarrow's errors are OSErrors too
        tmp.unlink(missing_ok=True)
        raise CacheError(f"{path}: could not write this shard ({e}); the shards before it are kept "
                         f"and the next run resumes here") from e


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """rows: dicts with the column names; teacher arrays as numpy [L-1, k] / [L-1] or None."""
    cols = {name: [] for name in schema.names}
    for r in rows:
        for name in schema.names:
            v = r.get(name)
            cols[name].append(v.tolist() if isinstance(v, np.ndarray) else v)
    return pa.table(cols, schema=schema)


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    try:
        write_atomic(cache_dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    except OSError as e:
        raise CacheError(f"{cache_dir / MANIFEST}: could not write the manifest ({e}); every shard is kept "
                         f"and the next run only writes the manifest") from e


_MANIFEST_FIELDS = {"fingerprint": str, "key": dict, "model": dict, "counts": dict, "totals": dict,
                    "residual": dict, "shards": list}
_KEY_FIELDS = {"model_fingerprint": str, "tokenizer_fingerprint": str, "top_k": int, "label_domain": bool}
_SHARD_FIELDS = {"file": str, "rows": int, "bytes": int, "sha256": str}


def manifest_problems(m) -> list[str]:
    """What a readable manifest lacks for the reader and the CLIs to use it (empty = usable)."""
    if not isinstance(m, dict):
        return [f"top level is a {type(m).__name__}, not an object"]
    out = [f"'{k}' missing or not a {t.__name__}" for k, t in _MANIFEST_FIELDS.items() if not isinstance(m.get(k), t)]
    if isinstance(m.get("key"), dict):
        out += [f"'key.{k}' missing or not a {t.__name__}" for k, t in _KEY_FIELDS.items()
                if not isinstance(m["key"].get(k), t)]
    for i, sh in enumerate(m.get("shards") if isinstance(m.get("shards"), list) else []):
        bad = [k for k, t in _SHARD_FIELDS.items() if not isinstance(sh, dict) or not isinstance(sh.get(k), t)]
        if bad:
            out.append(f"shards[{i}]: {', '.join(bad)} missing or of the wrong type")
        elif Path(sh["file"]).name != sh["file"]:
            out.append(f"shards[{i}]: file {sh['file']!r} is not a name inside the cache folder")
    return out


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
    teacher_topk_ids: np.ndarray | None    # [total_positions, k]
    teacher_topk_probs: np.ndarray | None  # [total_positions, k] uint16 codes, as stored (compact)
    teacher_residual: np.ndarray | None    # [total_positions] float16
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
            out[RESIDUAL] = self.teacher_residual[p:q].astype(np.float32)
        else:
            out[TOPK_IDS] = out[TOPK_PROBS] = out[RESIDUAL] = None
        return out


class TeacherCache:
    """A complete cache folder, opened through its manifest."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise CacheError(f"{self.path}: no {MANIFEST}; the teacher pass did not finish (run `make teacher-cache`)")
        try:
            self.manifest = json.loads(mf.read_text())
        except ValueError as e:
            raise CacheError(f"{mf}: unreadable manifest ({e})") from None
        version = self.manifest.get("schema_version") if isinstance(self.manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise CacheError(f"{self.path}: schema version {version} "
                             f"!= {SCHEMA_VERSION} that this code reads; rebuild the cache")
        problems = manifest_problems(self.manifest)
        if problems:
            raise CacheError(f"{mf}: malformed manifest: " + "; ".join(problems))

    @property
    def k(self) -> int:
        return self.manifest["key"]["top_k"]

    @property
    def label_domain(self) -> bool:
        return self.manifest["key"]["label_domain"]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def verify(self, progress=None) -> list[str]:
        """Check every shard's existence, size, sha256 and row count; return the problems (empty = ok)."""
        problems = []
        for s in self.manifest["shards"]:
            p = self.path / s["file"]
            if not p.is_file():
                problems.append(f"{s['file']}: missing")
            elif p.stat().st_size != s["bytes"]:
                problems.append(f"{s['file']}: {p.stat().st_size} bytes, manifest says {s['bytes']}")
            elif sha256_path(p) != s["sha256"]:
                problems.append(f"{s['file']}: sha256 mismatch (corrupt or modified)")
            else:
                try:
                    rows = pq.ParquetFile(p).metadata.num_rows
                except Exception as e:
                    rows = None
                    problems.append(f"{s['file']}: unreadable Parquet ({e})")
                if rows is not None and rows != s["rows"]:
                    problems.append(f"{s['file']}: {rows} rows, manifest says {s['rows']}")
            if progress:
                progress(1)
        # an entry removed from the manifest would silently drop its rows from training
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in sorted(self.path.glob("shard-*.parquet")):
            if p.name not in listed:
                problems.append(f"{p.name}: on disk but not listed in the manifest (edited manifest?)")
        n_rows = sum(s["rows"] for s in self.manifest["shards"])
        if n_rows != self.manifest["totals"].get("sequences"):
            problems.append(f"{MANIFEST}: its shards hold {n_rows} rows, totals.sequences says "
                            f"{self.manifest['totals'].get('sequences')}")
        return problems

    def check_compatible(self, *, model_fp: str, tokenizer_fp: str, k: int) -> None:
        """Refuse a cache made by another model, tokenizer or k than the run's."""
        key = self.manifest["key"]
        problems = []
        if key["model_fingerprint"] != model_fp:
            problems.append(f"model fingerprint {key['model_fingerprint'][:12]} != run's {model_fp[:12]}")
        if key["tokenizer_fingerprint"] != tokenizer_fp:
            problems.append(f"tokenizer fingerprint {key['tokenizer_fingerprint'][:12]} != run's {tokenizer_fp[:12]}")
        if key["top_k"] != k:
            problems.append(f"k = {key['top_k']} != run's teacher.top_k = {k}")
        if problems:
            raise CacheError(f"cache {self.path} does not match this run: " + "; ".join(problems))

    def load(self, split: str, corpus: str | None = None, columns_teacher: bool = True) -> Sequences:
        """Read every row of `split` (optionally one corpus) into flat numpy arrays."""
        filt = [(SPLIT, "=", split)] + ([(CORPUS, "=", corpus)] if corpus else [])
        cols = [SEQ_ID, CORPUS, SUBSET, INPUT_IDS] + (list(TEACHER_COLUMNS) if columns_teacher else [])
        tables = [pq.read_table(p, columns=cols, filters=filt) for p in self.shard_paths]
        schema = tables[0].schema if tables else None
        t = pa.concat_tables(tables) if tables else None
        if t is None or t.num_rows == 0:
            raise CacheError(f"{self.path}: no {split} rows" + (f" for corpus {corpus}" if corpus else ""))
        t = t.combine_chunks()
        ids_col = t.column(INPUT_IDS).chunk(0)
        tok_off = ids_col.offsets.to_numpy().astype(np.int64)
        tok_off = tok_off - tok_off[0]
        lengths = np.diff(tok_off)
        input_ids = ids_col.flatten().to_numpy().astype(np.int64)
        n = t.num_rows
        pos_len = lengths - 1
        if columns_teacher:
            has = np.asarray(t.column(RESIDUAL).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        else:
            has = np.zeros(n, dtype=bool)
        pos_off = np.zeros(n + 1, dtype=np.int64)
        pos_off[1:] = np.cumsum(np.where(has, pos_len, 0))
        tk_ids = tk_probs = resid = None
        if has.any():
            k = schema.field(TOPK_IDS).type.value_type.list_size
            # null rows contribute no values to the flattened children, so offsets line up with pos_off
            tk_ids = t.column(TOPK_IDS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k)
            tk_probs = t.column(TOPK_PROBS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k)
            resid = t.column(RESIDUAL).chunk(0).flatten().to_numpy()
            if len(resid) != pos_off[-1]:
                raise CacheError(f"{self.path}: teacher arrays have {len(resid)} positions, expected {pos_off[-1]}")
        return Sequences(
            seq_id=t.column(SEQ_ID).to_numpy(),
            corpus=np.array(t.column(CORPUS).to_pylist(), dtype=object),
            subset=np.array(t.column(SUBSET).to_pylist(), dtype=object),
            input_ids=input_ids, tok_off=tok_off,
            teacher_topk_ids=tk_ids, teacher_topk_probs=tk_probs, teacher_residual=resid,
            has_teacher=has, pos_off=pos_off,
        )


@dataclass
class ResolvedKey:
    """A config resolved against the files on disk: what a cache for it must contain and where it lives."""

    model_path: Path
    key: dict
    fingerprint: str
    cache_dir: Path


def resolve_cache_key(cfg: MolConfig, tokenizer=None) -> ResolvedKey:
    """Fingerprint the model, tokenizer, template and sources (no model load, only file hashes)."""
    from .corpora import source_fingerprint
    from .model import load_tokenizer, model_fingerprint, resolve_model_path, tokenizer_fingerprint

    model_path = resolve_model_path(cfg.model.name)
    tokenizer = tokenizer or load_tokenizer(model_path)
    source_fps = []
    for s in cfg.data.sources:
        p = expand_path(s.path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: source file does not exist (corpus {s.corpus}, subset {s.subset}); "
                                    f"for the default data run `make data`")
        source_fps.append(source_fingerprint(p))
    key = cache_key(cfg, model_fp=model_fingerprint(model_path), tokenizer_fp=tokenizer_fingerprint(model_path),
                    chat_template=tokenizer.chat_template, source_fps=source_fps)
    fp = fingerprint(key)
    return ResolvedKey(model_path, key, fp, cache_dir_for(cfg, cfg.model.name, fp))
