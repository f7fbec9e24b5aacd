"""How the teacher labels are stored: the cache's shards rewritten at each zstd level, and
variants of the storage schema (bytes per token and KL fidelity on real teacher labels)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import cache as C
from ..losses import truncated_reverse_kl
from .sizes import BenchSizes
from .stage1 import shard_data, write_table
from .timing import interleaved, med

log = logging.getLogger(__name__)

PROBE_TEMPERATURE = 1.5


# --------------------------------------------------------------------------- zstd levels


def shard_from_file(path: Path, unit: C.CacheUnit, vocab: int) -> tuple[C.ShardData, bool, Optional[int]]:
    """One cache shard back as the ShardData Stage 1 built for it: its rows, its labels decoded and
    re-encoded by C.encode_labels, its resume metadata. Also whether the re-encoding gave the stored
    codes, and the rows per row group it was written with (None: one row group)."""
    pf = pq.ParquetFile(path)
    rg = pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups > 1 else None
    t = pf.read().combine_chunks()
    col = t.column(C.INPUT_IDS)
    col = col.chunk(0) if col.num_chunks else pa.array([], col.type)
    off = col.offsets.to_numpy().astype(np.int64)
    src = unit.source
    d = C.ShardData(seq_id=t.column(C.SEQ_ID).to_numpy(), corpus=src["corpus"], subset=src["subset"],
                    split=t.column(C.SPLIT).to_pylist(), input_ids=col.flatten().to_numpy(), tok_off=off - off[0])
    exact = True
    if unit.labelled:
        k = unit.k

        def flat(name, depth):
            c = t.column(name)
            a = c.chunk(0) if c.num_chunks else pa.array([], c.type)
            for _ in range(depth):
                a = a.flatten()
            return a.to_numpy(zero_copy_only=False)

        gaps, pc, rc = flat(C.TOPK_IDS, 2).reshape(-1, k), flat(C.TOPK_PROBS, 2).reshape(-1, k), flat(C.RESIDUAL, 1)
        d.topk_ids, d.topk_probs, d.residual = C.encode_labels(C.decode_ids(gaps), C.decode_probs(pc),
                                                               C.decode_residual(rc), vocab)
        exact = (np.array_equal(d.topk_ids, gaps) and np.array_equal(d.topk_probs, pc)
                 and np.array_equal(d.residual, rc))
    md = pf.schema_arrow.metadata or {}
    d.metadata = {C.RESUME_KEY: md[C.RESUME_KEY]} if C.RESUME_KEY in md else {}
    return d, exact, rg


def zstd_levels_study(cache: C.TeacherCache, vocab: int, levels: tuple, default_level: int, workdir: Path,
                      sz: BenchSizes) -> dict:
    """Every shard of the cache (real labels of the real model, Stage 1's own grouping) rewritten
    with mol.cache's encoding at each zstd level: bytes/token and single-thread writer tokens/s
    (C.shard_table + C.write_shard), levels interleaved round by round. At the cache's own level
    the rewritten shards must be the cache's bytes (sha256 against the unit manifests)."""
    shards, exact = [], True
    for u in cache.units:
        for s in u.shards:
            d, ok, rg = shard_from_file(u.path / s["file"], u, vocab)
            shards.append((rg, s, d))
            exact &= ok
    tokens = sum(d.tokens for _, _, d in shards)
    levels = tuple(sorted(set(levels) | {default_level}))
    out_dir = workdir / "zstd-levels"
    out_dir.mkdir(parents=True, exist_ok=True)

    def task(level):
        def run():
            for i, (rg, _, d) in enumerate(shards):
                write_table(d, out_dir / f"l{level:02d}-{i:05d}.parquet", cache.k, vocab, level, rg)
        return run

    t = interleaved({f"zstd {lv}": task(lv) for lv in levels}, sz.reps, sz.warmup)
    rows = []
    for lv in levels:
        files = [out_dir / f"l{lv:02d}-{i:05d}.parquet" for i in range(len(shards))]
        nbytes = sum(p.stat().st_size for p in files)
        row = {"level": lv, "default": lv == default_level, "bytes": nbytes, "bytes_per_token": nbytes / tokens,
               "write_s": t[f"zstd {lv}"], "writer_tokens_per_s": tokens / med(t[f"zstd {lv}"])}
        if lv == default_level:
            same = [C.sha256_path(p) == s["sha256"] for p, (_, s, _) in zip(files, shards)]
            row["shards_identical_to_cache"] = int(sum(same))
        rows.append(row)
        for p in files:
            p.unlink()
    base = next(r for r in rows if r["default"])
    for r in rows:
        r["bytes_vs_default"] = r["bytes"] / base["bytes"]
        r["speed_vs_default"] = r["writer_tokens_per_s"] / base["writer_tokens_per_s"]
    cache_level_rows = base["shards_identical_to_cache"]
    return {"shards": len(shards), "tokens": tokens, "units": len(cache.units), "default_level": default_level,
            "reencode_exact": bool(exact), "reproduces_cache_bytes": cache_level_rows == len(shards),
            "cache_manifest_bytes_per_token": cache.totals["bytes_per_token"], "levels": rows}


# --------------------------------------------------------------------------- storage variants


@dataclass(frozen=True)
class StorageVariant:
    """One way to store the teacher columns, as changes to the current schema (mol.cache's, v3)."""

    name: str
    probs: str = "u10_sqrt"      # fp16 | logp_fp16 | u8_sqrt | u10_sqrt | u12_sqrt (in uint16) | u8_log
    resid: str = "log16"         # log16 (schema 3's log code) | fp32 | fp16 (schema 2) | none (1 - sum of probs)
    ids_order: str = "asc_gap"   # asc_gap (ascending, stored as gaps) | asc | desc (most probable first)
    zstd: Optional[int] = None   # None: the config's teacher.zstd_level, as Stage 1 writes
    encodings: tuple = ()        # ((column, parquet encoding), ...) replacing the current one for its values
    current: bool = False        # written and read by mol.cache itself (encode_labels, shard_table, write_shard, decode_*)


_U8_LOG_STEP = 20.0 / 255  # log-prob grid: p in [2e-9, 1], relative step 8%
# sqrt(p) on a uniform grid: absolute error in p ~ sqrt(p) / levels, finest where the mass is
_SQRT_LEVELS = {"u8_sqrt": 255, "u10_sqrt": C.PROB_LEVELS, "u12_sqrt": 4095}
_IDS, _PROBS, _RES = C.TOPK_IDS, C.TOPK_PROBS, C.RESIDUAL
_BSS, _DELTA = "BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED"

_PLAIN = "PLAIN"

# The first entry is the current schema; every other one names what it changes relative to it
# (encodings too: a column not listed keeps the encoding mol.cache gives it).
_SCHEMA2 = dict(ids_order="asc", resid="fp16", encodings=((_RES, _PLAIN),))
_SCHEMA1 = dict(probs="fp16", resid="fp32", ids_order="desc")
STORAGE_VARIANTS = [
    StorageVariant("current", current=True),
    StorageVariant("PLAIN ids + probs", encodings=((_IDS, _PLAIN), (_PROBS, _PLAIN))),
    StorageVariant("PLAIN ids", encodings=((_IDS, _PLAIN),)),
    StorageVariant("PLAIN probs", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("PLAIN residual", encodings=((_RES, _PLAIN),)),
    StorageVariant("DELTA_BINARY_PACKED id gaps", encodings=((_IDS, _DELTA),)),
    StorageVariant("zstd 3", zstd=3),
    StorageVariant("zstd 19", zstd=19),
    StorageVariant("zstd 22", zstd=22),
    StorageVariant("ids ascending, not gaps (schema 2)", ids_order="asc"),
    StorageVariant("ids most probable first", ids_order="desc"),
    StorageVariant("probs fp16", probs="fp16"),
    StorageVariant("probs fp16 log-probs", probs="logp_fp16"),
    StorageVariant("probs uint12 sqrt(p) (uint16)", probs="u12_sqrt"),
    StorageVariant("probs uint8 sqrt(p)", probs="u8_sqrt", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("probs uint8 log p grid", probs="u8_log", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("residual fp16, PLAIN (schema 2)", resid="fp16", encodings=((_RES, _PLAIN),)),
    StorageVariant("residual fp32", resid="fp32"),
    StorageVariant("no residual (1 - sum probs)", resid="none"),
    StorageVariant("schema 2: ascending ids, fp16 residual (PLAIN)", **_SCHEMA2),
    StorageVariant("schema 1: ids most probable first, fp16 probs, fp32 residual", **_SCHEMA1),
    StorageVariant("schema 1 with PLAIN encodings", **_SCHEMA1,
                   encodings=((_IDS, _PLAIN), (_PROBS, _PLAIN), (_RES, _PLAIN))),
]


def _nested(values: np.ndarray, k: int, positions: list[int]) -> pa.ListArray:
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), k)
    offsets = np.concatenate([[0], np.cumsum(positions)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def encode_variant(v: StorageVariant, ids: np.ndarray, probs: np.ndarray, resid: np.ndarray, id_dtype) -> dict:
    """Exact fp32 labels [N, k] (most probable first) -> the variant's stored column values."""
    if v.ids_order in ("asc", "asc_gap"):
        order = np.argsort(ids, axis=1, kind="stable")
        ids, probs = np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1)
    stored_ids = ids.astype(id_dtype)
    if v.ids_order == "asc_gap":
        stored_ids = np.diff(stored_ids, axis=1, prepend=np.zeros((len(ids), 1), id_dtype))
    p64 = probs.astype(np.float64)
    if v.probs == "fp16":
        sp = probs.astype(np.float16)
    elif v.probs == "logp_fp16":
        sp = np.log(np.maximum(p64, 1e-30)).astype(np.float16)
    elif v.probs in _SQRT_LEVELS:
        # never 0: a zero bucket would be floored at 1e-30 and cost the student's whole mass there
        top = _SQRT_LEVELS[v.probs]
        sp = np.clip(np.rint(np.sqrt(np.clip(p64, 0.0, 1.0)) * top), 1, top).astype(np.uint8 if top < 256 else np.uint16)
    elif v.probs == "u8_log":
        sp = np.clip(np.rint(-np.log(np.maximum(p64, 1e-30)) / _U8_LOG_STEP), 0, 255).astype(np.uint8)
    else:
        raise ValueError(v.probs)
    out = {_IDS: stored_ids, _PROBS: sp}
    if v.resid == "log16":
        r = np.clip(np.asarray(resid, dtype=np.float64), C.RESIDUAL_FLOOR, 1.0)
        out[_RES] = np.rint(-np.log(r) / C.RESIDUAL_STEP).astype(np.uint16)
    elif v.resid == "fp32":
        out[_RES] = resid.astype(np.float32)
    elif v.resid == "fp16":
        out[_RES] = resid.astype(np.float16)
    elif v.resid != "none":
        raise ValueError(v.resid)
    return out


def decode_variant(v: StorageVariant, ids: np.ndarray, probs: np.ndarray, resid: Optional[np.ndarray]):
    """Stored column values -> (ids int64 [N, k], probs float64, residual float64), as a reader would."""
    if v.current:
        return (C.decode_ids(ids).astype(np.int64), C.decode_probs(probs).astype(np.float64),
                C.decode_residual(resid).astype(np.float64))
    ids = ids.astype(np.int64)
    if v.ids_order == "asc_gap":
        ids = np.cumsum(ids, axis=1)
    if v.probs == "fp16":
        p = probs.astype(np.float64)
    elif v.probs == "logp_fp16":
        p = np.exp(probs.astype(np.float64))
    elif v.probs in _SQRT_LEVELS:
        p = (probs.astype(np.float64) / _SQRT_LEVELS[v.probs]) ** 2
    else:
        p = np.exp(-probs.astype(np.float64) * _U8_LOG_STEP)
    if resid is None:
        r = np.clip(1 - p.sum(1), 0, None)
    elif v.resid == "log16":
        r = C.decode_residual(resid).astype(np.float64)
    else:
        r = resid.astype(np.float64)
    return ids, p, r


_LEAF = {C.INPUT_IDS: ".list.element", _IDS: ".list.element.list.element", _PROBS: ".list.element.list.element",
         _RES: ".list.element"}


def write_variant(v: StorageVariant, path: Path, rows: list[dict], labels: list[tuple], k: int, vocab: int,
                  zstd_level: int, base_encodings: dict) -> float:
    """rows: cache rows (input_ids etc.); labels: exact (ids, probs fp32, resid fp32) per row;
    zstd_level / base_encodings: the current schema's, which the variant changes.

    The current variant is mol.cache's own path (shard_data -> C.shard_table -> C.write_shard).
    Every other one takes that same table and replaces its teacher columns with the variant's,
    then writes it with mol.cache's Parquet options and the current encodings it does not change.
    Returns the seconds spent in the write (table build + Parquet encoding + compression + I/O)."""
    level = zstd_level if v.zstd is None else v.zstd
    d = shard_data(rows, labels, vocab, subset="storage-study")
    if v.current:
        t0 = time.perf_counter()
        write_table(d, path, k, vocab, level)
        return time.perf_counter() - t0
    id_dtype = C.id_dtype(vocab)
    enc = encode_variant(v, np.concatenate([x[0] for x in labels]), np.concatenate([x[1] for x in labels]),
                        np.concatenate([x[2] for x in labels]), id_dtype)
    positions = [len(x[2]) for x in labels]
    t0 = time.perf_counter()
    table = C.shard_table(d, k, vocab)
    for name in (_IDS, _PROBS):
        table = table.set_column(table.schema.get_field_index(name), name, _nested(enc[name], k, positions))
    if _RES in enc:
        offsets = np.concatenate([[0], np.cumsum(positions)]).astype(np.int32)
        table = table.set_column(table.schema.get_field_index(_RES), _RES,
                                 pa.ListArray.from_arrays(pa.array(offsets), pa.array(enc[_RES])))
    else:
        table = table.drop_columns([_RES])
    encodings = {**base_encodings, **dict(v.encodings)}
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", compression_level=level,
                   use_dictionary=[C.CORPUS, C.SUBSET, C.SPLIT], write_statistics=[C.SEQ_ID],
                   column_encoding={col + _LEAF[col]: e for col, e in encodings.items()
                                    if col in table.column_names} or None)
    with open(tmp, "rb") as f:  # as write_shard: the fsync is part of every write
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return time.perf_counter() - t0


def leaf_encodings(path: Path) -> dict:
    """The value encoding of input_ids and each teacher column in a shard: what mol.cache chose, to build upon."""
    md = pq.ParquetFile(path).metadata.row_group(0)
    out = {}
    for c in range(md.num_columns):
        col = md.column(c)
        top = col.path_in_schema.split(".")[0]
        if top in _LEAF:
            data = [e for e in col.encodings if e not in ("RLE", "BIT_PACKED")]
            known = [e for e in data if e in (_BSS, _DELTA, "DELTA_BYTE_ARRAY", "DELTA_LENGTH_BYTE_ARRAY")]
            if any("DICTIONARY" in e for e in data):
                log.warning("%s is dictionary-encoded by mol.cache; the variants write it PLAIN", top)
            out[top] = known[0] if known else _PLAIN
    return out


def _column_bytes(path: Path) -> dict:
    """Compressed bytes per top-level column (data pages only; the footer is not attributed)."""
    md = pq.ParquetFile(path).metadata
    out: dict = defaultdict(int)
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            out[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    return dict(out)


def read_variant(v: StorageVariant, path: Path):
    t = pq.read_table(path).combine_chunks()
    k = t.schema.field(_IDS).type.value_type.list_size
    ids = t.column(_IDS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k)
    probs = t.column(_PROBS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k)
    resid = t.column(_RES).chunk(0).flatten().to_numpy() if _RES in t.column_names else None
    return decode_variant(v, ids, probs, resid)


def _bucket_logits(student_logp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] student log-probs -> ([N, k+1] logits, ids into them) giving truncated_reverse_kl the
    same value: the k teacher ids' log-probs plus one "everything else" column already sum to 1, so
    the log-softmax over them is the identity and the KL is that of the full vocabulary, at a
    thousandth of the cost of a 49k-wide float64 log-softmax per variant."""
    top = student_logp.gather(-1, ids)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1.0)).unsqueeze(-1)
    k = ids.shape[-1]
    return torch.cat([top, rest], -1), torch.arange(k, device=ids.device).expand(ids.shape[0], k)


@torch.no_grad()
def storage_study(model, tokenizer, rows: list[dict], k: int, chunk: int, vocab: int, workdir: Path,
                  zstd_level: int, variants: list[StorageVariant] = STORAGE_VARIANTS,
                  labels: Optional[list[tuple]] = None) -> dict:
    """Bytes per token and KL fidelity of each storage variant on real teacher labels.

    variants[0] must be the current schema: the others are written as changes to what it wrote.
    `labels`: the teacher's labels of `rows` when already computed (else computed here).

    Fidelity as in mol.teacher.measure_fidelity: probe student = teacher logits / 1.5, float64,
    |KL_trunc(stored labels) - KL_trunc(exact labels: the float64 teacher's probabilities of the
    same ids, residual 1 - their sum)| per position.
    """
    from ..labels import final_hidden, teacher_labels

    device = next(model.parameters()).device
    seqs = [np.asarray(r[C.INPUT_IDS]) for r in rows]
    if labels is None:
        labels = teacher_labels(model, seqs, k, chunk, tokenizer.pad_token_id, device)
    labels_ids = np.concatenate([x[0] for x in labels])
    tokens = sum(len(s) for s in seqs)
    if not variants[0].current:
        raise ValueError("storage_study: the first variant must be the current schema")
    results = []
    decoded = []
    base: dict = {}
    for i, v in enumerate(variants):
        path = workdir / f"storage-{i:02d}.parquet"
        seconds = write_variant(v, path, rows, labels, k, vocab, zstd_level, base)
        name = v.name
        if v.current:
            base = leaf_encodings(path)
            t = pq.read_schema(path)
            name = (f"current mol.cache schema {C.SCHEMA_VERSION}: {t.field(_IDS).type.value_type.value_type} "
                    f"id gaps ({base.get(_IDS)}), {t.field(_PROBS).type.value_type.value_type} sqrt-p codes "
                    f"({base.get(_PROBS)}), {t.field(_RES).type.value_type} log-coded residual ({base.get(_RES)}), "
                    f"zstd {zstd_level}")
        results.append({"name": name, "variant": dataclasses.asdict(v), "bytes": path.stat().st_size,
                        "write_us_per_token": seconds / tokens * 1e6,
                        "bytes_per_token": path.stat().st_size / tokens,
                        "column_bytes_per_token": {c: b / tokens for c, b in _column_bytes(path).items()}})
        decoded.append(read_variant(v, path))
        if v.current:
            current_sha = C.sha256_path(path)
        path.unlink()
    # the same content through this module's variant writer, changing nothing, must give mol.cache's bytes
    check = workdir / "check.parquet"
    write_variant(StorageVariant("builder check"), check, rows, labels, k, vocab, zstd_level, base)
    builder_bytes, builder_identical = check.stat().st_size, C.sha256_path(check) == current_sha
    check.unlink()
    if not builder_identical:
        log.warning("storage study: the variant writer gives %d bytes, mol.cache %d (not the same file)",
                    builder_bytes, results[0]["bytes"])

    w = model.get_output_embeddings().weight.double()
    diffs: list[list[torch.Tensor]] = [[] for _ in variants]
    kl_exact_all = []
    pos = 0
    for s in seqs:
        x = torch.as_tensor(s.astype(np.int64), device=device)[None]
        t_logits = final_hidden(model, x)[0, :-1].double() @ w.T
        s_logp = torch.log_softmax(t_logits / PROBE_TEMPERATURE, -1)
        t_logp = torch.log_softmax(t_logits, -1)
        n = t_logits.shape[0]
        ids_x = torch.as_tensor(labels_ids[pos:pos + n], device=device)
        probs_x = t_logp.gather(-1, ids_x).exp()
        # every variant stores the same id set, and the truncated KL does not depend on their order
        kl_x = truncated_reverse_kl(*_bucket_logits(s_logp, ids_x), probs_x, (1 - probs_x.sum(-1)).clamp_min(0))
        kl_exact_all.append(kl_x.cpu())
        for j, (ids, p, r) in enumerate(decoded):
            ids_t = torch.as_tensor(ids[pos:pos + n], device=device)
            kl_c = truncated_reverse_kl(*_bucket_logits(s_logp, ids_t), torch.as_tensor(p[pos:pos + n], device=device),
                                        torch.as_tensor(r[pos:pos + n], device=device))
            diffs[j].append((kl_c - kl_x).abs().cpu())
        pos += n
    for res, d in zip(results, diffs):
        d = torch.cat(d)
        res["kl_abs_mean"] = float(d.mean())
        res["kl_abs_max"] = float(d.max())
    return {"sequences": len(seqs), "tokens": tokens, "positions": pos, "k": k,
            "kl_trunc_exact_mean": float(torch.cat(kl_exact_all).mean()),
            "probe": f"student = teacher logits / {PROBE_TEMPERATURE}", "builder_check_bytes": builder_bytes,
            "builder_check_identical": builder_identical,
            "current_encodings": base, "zstd_level": zstd_level,
            "variants": results}


def best_storage(storage: dict, max_bytes: float = 80.0, max_kl: float = 1e-3) -> dict:
    ok = [v for v in storage["variants"] if v["kl_abs_mean"] <= max_kl]
    best = min(ok, key=lambda v: v["bytes_per_token"]) if ok else None
    return {"best_meeting_fidelity": best, "meets_both": bool(best and best["bytes_per_token"] <= max_bytes)}
