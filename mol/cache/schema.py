"""The cache's schema: column names, the codes the teacher columns are stored as, the Arrow schema,
shard names and how a shard's rows are laid out in memory (`ShardData` -> `shard_table`).

A leaf: numpy and pyarrow only (and mol.errors for `CacheError`). What the codes are and why:
the package's docstring (`mol.cache`) and docs/cache.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..errors import MolError

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

