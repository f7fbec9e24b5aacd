"""A shard's records: the resume record (`mol.resume` in its Parquet metadata: where its input
ended, the packer's state, its rows' counts and val rows) and its residual summary, built here for
the teacher pass and checked here against the shard's rows and its manifest entry (a forged record
must not be believed: Stage 1 resumes from these records and writes the manifest from them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..spans import NO_SPANS, Spans
from .schema import INPUT_IDS, RESIDUAL_LEVELS, RESUME_KEY, SEGMENT_STRIDE, SEQ_ID, SPLIT, ShardData, \
    decode_residual, encode_labels

def resume_record(*, unit: str, segment: int, part: int, splits: list[str], lengths: list[int], end: bool,
                  state: dict) -> dict:
    """A shard's `mol.resume` record: the unit (fingerprint), segment and part it belongs to, its rows,
    whether it ends its segment, [rows, tokens] per split, which rows are val, and the packer's state
    right after its last row (where a resumed pass starts). Its residual summary is added by
    `shard_data` when the shard is labelled."""
    counts = {sp: [int(sum(1 for x in splits if x == sp)), int(sum(n for x, n in zip(splits, lengths) if x == sp))]
              for sp in ("train", "val")}
    return {"unit": unit, "segment": segment, "part": part, "rows": len(splits), "end": end, "counts": counts,
            "val_rows": [j for j, x in enumerate(splits) if x == "val"], "state": state}


def residual_stats(codes: np.ndarray, limit: int = 64) -> dict:
    """One shard's residuals summarised for the manifest, from the stored codes (so the record is
    as deterministic as the shard). The fp16 counts say what schema 2 would have lost."""
    r = decode_residual(codes).astype(np.float64)
    pick = np.linspace(0, len(r) - 1, min(limit, len(r))).astype(np.int64) if len(r) else []
    return {"sum": float(r.sum()), "n": int(len(r)), "below_floor": int((codes == RESIDUAL_LEVELS).sum()),
            "fp16_zero": int((r.astype(np.float16) == 0).sum()),
            "fp16_subnormal": int(((r > 0) & (r < 2.0 ** -14)).sum()),
            "sample": [float(f"{v:.4g}") for v in r[pick]]}


def shard_data(*, seq_id: np.ndarray, corpus: str, subset: str, splits: list[str], rows: list[np.ndarray],
               labels: list[tuple] | None, k: int, vocab_size: int, record: dict | None,
               spans: Spans = NO_SPANS) -> ShardData:
    """One shard's rows (token arrays) and their exact labels (per row: ids [L-1, k], probs [L-1, k],
    residual [L-1], as the teacher gives them; None: an unlabelled shard) -> the ShardData a writer
    stores: the labels as codes (`encode_labels`), and, given its resume `record`, the residual summary
    added to it and the record as the shard's Parquet metadata."""
    tok_off = np.zeros(len(rows) + 1, dtype=np.int64)
    tok_off[1:] = np.cumsum([len(r) for r in rows])
    d = ShardData(seq_id=seq_id, corpus=corpus, subset=subset, split=splits,
                  input_ids=np.concatenate(rows) if rows else np.zeros(0, np.int32), tok_off=tok_off)
    if labels is not None:
        ids = np.concatenate([x[0] for x in labels]) if labels else np.zeros((0, k), np.int64)
        probs = np.concatenate([x[1] for x in labels]) if labels else np.zeros((0, k), np.float32)
        resid = np.concatenate([x[2] for x in labels]) if labels else np.zeros(0, np.float32)
        with spans.span("encode_labels"):
            d.topk_ids, d.topk_probs, d.residual = encode_labels(ids, probs, resid, vocab_size)
        if record is not None:
            with spans.span("residual stats"):
                record = {**record, "residual": residual_stats(d.residual)}
    if record is not None:
        d.metadata = {RESUME_KEY: json.dumps(record, separators=(",", ":")).encode()}
    return d


def shard_resume(path: Path) -> dict | None:
    """The `mol.resume` record of a shard's Parquet metadata (None when absent or unreadable)."""
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[RESUME_KEY])
    except Exception:  # a torn or foreign file: the caller treats it as not written
        return None



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

