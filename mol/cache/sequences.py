"""Rows in memory: `Sequences` (a split's rows as flat numpy arrays with offsets), built from Arrow
tables, and the contract's value checks (`sequences_problem`) that every reader runs on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import CORPUS, INPUT_IDS, PROB_LEVELS, RESIDUAL, SEQ_ID, SUBSET, TEACHER_COLUMNS, TOPK_IDS, TOPK_PROBS, \
    CacheError, decode_ids, decode_probs, decode_residual

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

