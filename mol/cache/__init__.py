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

The package owns both sides of the contract, bottom up (each module imports only those above it):

    schema      columns, codes, the Arrow schema, shard names, ShardData (numpy + pyarrow only)
    records     a shard's resume record and residual summary: built, read and checked
    manifest    both manifests (assembled from the pass's facts, written, read, checked), the card
    sequences   rows in memory (Sequences) and the value checks every reader runs
    writer      the shard writer (ordered renames), the folder locks, the resume prefix
    read        CacheUnit, TeacherCache (a set), verify, the one compatibility check (key_problems)
    stream      Stage 2's streaming reader (StreamingSequences)
    locks       readers' shared locks (ReadLocks, open_held): a gc removes no folder in use
    keys        unit and set keys, fingerprints, folder names from a config: the only module that
                reads a config, a model folder or a corpus
    inspect     what `python -m stages.cache_info` shows and does (describe, inventory, gc)

Everything public is re-exported here: `from mol import cache as C; C.TeacherCache`.

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

from ..files import sha256_path, write_atomic  # noqa: F401  (re-exported: callers use C.sha256_path)
from .schema import (  # noqa: F401
    CARD, COLUMN_ENCODING, CORPUS, INPUT_IDS, MANIFEST, PROB_LEVELS, RESIDUAL, RESIDUAL_FLOOR, RESIDUAL_LEVELS,
    RESIDUAL_STEP, RESUME_KEY, SCHEMA_VERSION, SEGMENT_STRIDE, SEQ_ID, SETS_DIR, SHARD_GLOB, SPLIT, SUBSET,
    TEACHER_COLUMNS, TOPK_IDS, TOPK_PROBS, UNITS_DIR, CacheError, ShardData, arrow_schema, decode_ids, decode_probs,
    decode_residual, encode_labels, encode_residual, id_dtype, parse_shard_name, shard_name, shard_table,
)
from .records import (  # noqa: F401
    record_problems, residual_stats, resume_record, shard_data, shard_record_problems, shard_resume,
    table_record_problems,
)
from .manifest import (  # noqa: F401
    read_manifest, set_manifest, set_manifest_problems, sets_using, shard_entry, unit_manifest, unit_manifest_problems,
    write_card, write_manifest,
)
from .sequences import MASS_TOLERANCE, Sequences, concat_sequences, sequences_from_tables, sequences_problem  # noqa: F401
from .writer import ShardWriter, cache_lock, segment_prefix, segment_progress, write_shard  # noqa: F401
from .read import COMPATIBILITY, CacheFolder, CacheUnit, TeacherCache, key_problems  # noqa: F401
from .stream import StreamingSequences  # noqa: F401
from .locks import READ_LOCK, ReadLocks, open_held  # noqa: F401
from .keys import (  # noqa: F401
    ResolvedSet, ResolvedUnit, fingerprint, resolve_cache_key, row_group_rows, set_key, unit_key,
)
