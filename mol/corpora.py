"""Corpora in: records from every supported format (mol/corpus_formats.py), rendered to text, tokenized and packed.

Every record becomes one document: `{"text": ...}` as is, chat (`{"messages": [...]}`) and QA
(`{"question": ..., "answer": ...}`) records through the tokenizer's chat template, so text and QA
train in one pipeline. Documents are joined with EOS and cut into `max_seq_len` sequences within
one (corpus, subset, split). Everything is deterministic: the same config gives the same sequences.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import DataConfig, SourceConfig, expand_path
# CorpusError, Where, detect_format and iter_records are also imported from here (teacher, cache, tests)
from .corpus_formats import CorpusError, Where, detect_format, iter_records, read_records, table_rows  # noqa: F401
from .model import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass
class PackedSequence:
    corpus: str
    subset: str
    split: str
    input_ids: np.ndarray  # [L] int32


@dataclass
class SourceReport:
    """What was read from one source; goes into the cache manifest."""

    path: str
    corpus: str
    subset: str
    sha256: str
    records: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    documents: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    tokens: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    sequences: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    capped_sequences: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})

    def merge(self, other: "SourceReport") -> "SourceReport":
        """This segment's report followed by the next segment's."""
        out = dataclasses.replace(self, records=self.records + other.records, skipped=self.skipped + other.skipped,
                                  skipped_examples=(self.skipped_examples + other.skipped_examples)[:5])
        for name in ("documents", "tokens", "sequences", "capped_sequences"):
            setattr(out, name, {s: getattr(self, name)[s] + getattr(other, name)[s] for s in SPLITS})
        return out


def source_fingerprint(path: Path) -> str:
    """sha256 of the source's bytes (every file of a folder, in sorted order)."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(path)


@dataclass
class Segment:
    """A contiguous part of one source's records, packed on its own. `start`/`end` are byte
    offsets (JSONL), decompressed offsets (JSONL.zst) or row indices (Parquet, datasets);
    end None = to the end of the source."""

    index: int
    start: int
    end: int | None


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def source_caps(src: SourceConfig, data: DataConfig) -> dict:
    """The caps that apply to a source: its own, else the data section's sequence caps."""
    return {"max_records": src.max_records,
            "max_train_sequences": src.max_train_sequences if src.max_train_sequences is not None else data.max_train_sequences,
            "max_val_sequences": src.max_val_sequences if src.max_val_sequences is not None else data.max_val_sequences}


def source_segments(src: SourceConfig, data: DataConfig) -> list[Segment]:
    """A source's segments under `data`: one when any cap applies (a cap is a prefix)."""
    return plan_segments(src, data.segment_bytes, any(v is not None for v in source_caps(src, data).values()))


def plan_segments(src: SourceConfig, segment_bytes: int, capped: bool) -> list[Segment]:
    """Cut a source into segments of about `segment_bytes` of input (one segment when capped, or
    for formats that cannot be entered in the middle). Depends only on the file, so every worker
    of a sharded pass computes the same plan."""
    path = expand_path(src.path)
    fmt = detect_format(path, src.format)
    if capped or fmt in ("jsonl.zst", "text"):
        return [Segment(0, 0, None)]
    if fmt == "jsonl":
        size = path.stat().st_size
        n = max(1, math.ceil(size / segment_bytes))
        return [Segment(i, i * segment_bytes, (i + 1) * segment_bytes if i < n - 1 else None) for i in range(n)]
    rows, size = table_rows(path, fmt), (_folder_bytes(path) if path.is_dir() else path.stat().st_size)
    n = max(1, min(rows, math.ceil(size / segment_bytes)))
    per = math.ceil(rows / n) if rows else 1
    return [Segment(i, i * per, (i + 1) * per if i < n - 1 else None) for i in range(n)]


def _nonempty_str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise CorpusError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise CorpusError(f"{where}: field {key!r} is empty")
    return v


def _encodable(text: str, where: str) -> str:
    """JSON's \\u escapes can spell half of a UTF-16 surrogate pair alone: valid JSON, but not
    text. UTF-8 (the tokenizer, the validation split's hash) cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CorpusError(f"{where}: invalid Unicode: lone surrogate \\u{ord(text[e.start]):04x} "
                          f"(half of a UTF-16 pair; UTF-8 cannot encode it)") from None
    return text


def record_to_text(rec: object, where: str, tokenizer, template_kwargs: dict) -> str:
    """One document's text. Chat and QA records go through the chat template."""
    if isinstance(rec, CorpusError):
        raise rec
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "text" in rec:
        return _encodable(_nonempty_str(rec, "text", where), where)
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise CorpusError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise CorpusError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    elif "question" in rec or "answer" in rec:
        msgs = [
            {"role": "user", "content": _nonempty_str(rec, "question", where)},
            {"role": "assistant", "content": _nonempty_str(rec, "answer", where)},
        ]
    else:
        raise CorpusError(f"{where}: no 'text', 'messages' or 'question'/'answer' field (keys: {sorted(rec)})")
    if tokenizer.chat_template is None:
        raise CorpusError(f"{where}: chat/QA record but the tokenizer has no chat template")
    # checked once rendered: whatever field of a message the template puts in the text
    return _encodable(tokenizer.apply_chat_template(msgs, tokenize=False, **template_kwargs), where)


def is_val_document(text: str, val_fraction: float) -> bool:
    """Held-out membership from a hash of the text: stable across runs, machines and Python versions."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def pack_array(a) -> str:
    """A 1-D int array as compact text (the resume record lives in JSON)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<i4").tobytes()).decode()


def unpack_array(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<i4").astype(np.int32)


_READ_BATCH = 64  # records rendered and tokenized together (the fast tokenizer batches in Rust)


class SegmentPacker:
    """Reads one segment of a source, renders, splits, tokenizes and packs it, yielding
    PackedSequence as they fill, in bounded memory.

    Documents are joined with EOS and cut into max_seq_len sequences per split; the final short
    tail of each split is flushed at the segment's end. Caps stop reading once both splits are
    full. Between two yields everything is in `state()` (reader position, the partial sequences,
    sequences packed but not yet yielded, counters), so a pass resumed from a saved state yields
    exactly what the uninterrupted one would have.
    """

    def __init__(self, src: SourceConfig, data: DataConfig, tokenizer, template_kwargs: dict, segment: Segment,
                 caps: dict, state: dict | None = None):
        self.src, self.data, self.tokenizer, self.template_kwargs = src, data, tokenizer, template_kwargs
        self.segment, self.caps = segment, caps
        self.path = expand_path(src.path)
        self.eos = tokenizer.eos_token_id
        if state is None:
            self.pos, self.line, self.fresh, self.done = segment.start, 1 if segment.start == 0 else None, True, False
            self.bufs = {s: np.zeros(0, np.int32) for s in SPLITS}
            self.pending: deque = deque()
            self.report = SourceReport(path=str(self.path), corpus=src.corpus, subset=src.subset, sha256="")
        else:
            self.pos, self.line, self.fresh, self.done = state["pos"], state["line"], False, state["done"]
            self.bufs = {s: unpack_array(state["bufs"][s]) for s in SPLITS}
            self.pending = deque((sp, unpack_array(a)) for sp, a in state["pending"])
            self.report = SourceReport(**state["report"])

    def state(self) -> dict:
        return {"pos": self.pos, "line": self.line, "done": self.done,
                "bufs": {s: pack_array(b) for s, b in self.bufs.items()},
                "pending": [[sp, pack_array(a)] for sp, a in self.pending],
                "report": dataclasses.asdict(self.report)}

    def _cap(self, split: str):
        return self.caps["max_train_sequences" if split == "train" else "max_val_sequences"]

    def _full(self, split: str) -> bool:
        cap = self._cap(split)
        return cap is not None and self.report.sequences[split] >= cap

    def _emit(self, split: str, ids: np.ndarray) -> None:
        if self._full(split):
            self.report.capped_sequences[split] += 1
        else:
            self.report.sequences[split] += 1
            self.pending.append((split, ids))

    def _add(self, split: str, ids) -> None:
        L = self.data.max_seq_len
        buf = np.concatenate([self.bufs[split], np.asarray(ids, np.int32), np.array([self.eos], np.int32)])
        a = 0
        while len(buf) - a >= L:
            self._emit(split, buf[a:a + L].copy())
            a += L
        self.bufs[split] = buf[a:].copy()

    def _finish(self) -> None:
        """Flush each split's short tail; a 1-token tail has no target and is reported."""
        for split in SPLITS:
            buf = self.bufs[split]
            if len(buf) >= 2:
                self._emit(split, buf)
            elif len(buf):
                log.info("%s [%s]: final %d-token tail has no next-token target; not stored", self.path, split, len(buf))
            self.bufs[split] = np.zeros(0, np.int32)
        self.done = True

    def _fill(self) -> None:
        """Read, render and tokenize up to _READ_BATCH records, then pack them in order."""
        rep, max_records = self.report, self.caps["max_records"]
        batch = []  # (text or CorpusError, split)
        reader = read_records(self.src, self.pos, self.segment.end, self.line, self.fresh)
        self.fresh = False
        exhausted = True
        for where, rec, pos, line in reader:
            try:
                text = record_to_text(rec, where, self.tokenizer, self.template_kwargs)
                held = self.src.heldout or is_val_document(text, self.data.val_fraction)
                batch.append((text, "val" if held else "train"))
            except CorpusError as e:
                batch.append((e, None))
            self.pos, self.line = pos, line
            if len(batch) >= _READ_BATCH:
                exhausted = False
                break
        if hasattr(reader, "close"):
            reader.close()
        # a split full before the batch stays full: its documents are never tokenized
        todo = [i for i, (_, sp) in enumerate(batch) if sp is not None and not self._full(sp)]
        tokens = self.tokenizer([batch[i][0] for i in todo], add_special_tokens=False)["input_ids"] if todo else []
        doc_ids = dict(zip(todo, tokens))
        for i, (text, split) in enumerate(batch):
            if max_records is not None and rep.records >= max_records:
                exhausted = True
                break
            if split is None:
                if self.data.on_bad_record == "error":
                    raise text
                rep.skipped += 1
                if len(rep.skipped_examples) < 5:
                    rep.skipped_examples.append(str(text))
                continue
            rep.records += 1
            if self._full(split):
                if self._full("train") and self._full("val"):
                    exhausted = True
                    break
                continue
            doc = doc_ids[i]
            rep.documents[split] += 1
            rep.tokens[split] += len(doc) + 1
            self._add(split, doc)
        if exhausted:
            self._finish()

    def __iter__(self) -> Iterator[PackedSequence]:
        while True:
            while self.pending:
                split, ids = self.pending.popleft()
                yield PackedSequence(self.src.corpus, self.src.subset, split, ids)
            if self.done:
                return
            self._fill()


def pack_source(src: SourceConfig, data: DataConfig, tokenizer, template_kwargs: dict) -> tuple[list[PackedSequence], SourceReport]:
    """Read, render, split, tokenize and pack one whole source in memory (one segment; small
    inputs and tests: Stage 1 streams segments through SegmentPacker instead)."""
    path = expand_path(src.path)
    packer = SegmentPacker(src, data, tokenizer, template_kwargs, Segment(0, 0, None), source_caps(src, data))
    seqs = list(packer)
    report = packer.report
    report.sha256 = source_fingerprint(path) if path.exists() else ""
    check_report(report, src)
    return seqs, report


def check_report(report: SourceReport, src: SourceConfig) -> None:
    """A source that gave no usable record is an error; skipped records are worth a warning."""
    if report.records == 0:
        raise CorpusError(f"{report.path}: no usable records (corpus {src.corpus}, subset {src.subset})")
    if report.skipped:
        log.warning("%s: skipped %d bad records (on_bad_record=skip); first: %s",
                    report.path, report.skipped, report.skipped_examples[0])


def pack_corpora(data: DataConfig, tokenizer, template_kwargs: dict) -> tuple[list[PackedSequence], list[SourceReport]]:
    """All sources → packed sequences, in memory, ordered by source. Each source packs alone."""
    seqs, reports = [], []
    for src in data.sources:
        s, r = pack_source(src, data, tokenizer, template_kwargs)
        seqs += s
        reports.append(r)
        log.info("%s/%s: %d records -> train %d seqs, val %d seqs", src.corpus, src.subset,
                 r.records, r.sequences["train"], r.sequences["val"])
    if not any(s.split == "train" for s in seqs):
        raise CorpusError("the corpora gave no training sequences")
    return seqs, reports
