"""Corpora in: read records from every supported format, render them to text, tokenize and pack.

Every record becomes one document: `{"text": ...}` as is, chat (`{"messages": [...]}`) and QA
(`{"question": ..., "answer": ...}`) records through the tokenizer's chat template, so text and QA
train in one pipeline. Documents are joined with EOS and cut into `max_seq_len` sequences within
one (corpus, subset, split). Everything is deterministic: the same config gives the same sequences.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .config import DataConfig, SourceConfig, expand_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


class CorpusError(ValueError):
    """A bad input record; the message names the file and line."""


@dataclass
class PackedSequence:
    corpus: str
    subset: str
    split: str
    input_ids: list[int]


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


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    if name.endswith(".jsonl.zst") or name.endswith(".json.zst"):
        return "jsonl.zst"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".md")):
        return "text"
    raise CorpusError(f"{path}: cannot tell the format from the name; set format: jsonl|jsonl.zst|parquet|datasets|text")


def source_fingerprint(path: Path) -> str:
    """sha256 of the source's bytes (every file of a folder, in sorted order)."""
    from .model import sha256_file

    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(path)


def _iter_json_lines(path: Path, stream: io.BufferedIOBase) -> Iterator[tuple[str, object]]:
    # A bad line is yielded as a CorpusError (not raised) so on_bad_record=skip can count it.
    for lineno, raw in enumerate(stream, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, CorpusError(f"{where}: invalid UTF-8 at byte {e.start}")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rec = CorpusError(f"{where}: invalid JSON ({e.msg}; column {e.colno})")
        yield where, rec


def iter_records(src: SourceConfig) -> Iterator[tuple[str, object]]:
    """Yield (location, record) for every record of a source; location is `file:line` or `file:row`.

    A line that is not a record (bad JSON or UTF-8) comes as a CorpusError in place of the record."""
    path = expand_path(src.path)
    if not path.exists():
        raise CorpusError(f"{path}: source file does not exist (corpus {src.corpus}, subset {src.subset})")
    fmt = detect_format(path, src.format)
    if fmt == "jsonl":
        with open(path, "rb") as f:
            yield from _iter_json_lines(path, f)
    elif fmt == "jsonl.zst":
        import zstandard

        with open(path, "rb") as raw:
            try:
                reader = zstandard.ZstdDecompressor().stream_reader(raw)
                yield from _iter_json_lines(path, io.BufferedReader(reader))
            except zstandard.ZstdError as e:
                raise CorpusError(f"{path}: not a valid zstd stream ({e})") from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
        row = 0
        for batch in pf.iter_batches():
            for rec in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", rec
    elif fmt == "datasets":
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:
            raise CorpusError(f"{path}: not a datasets folder saved with save_to_disk ({e})") from None
        if hasattr(ds, "keys") and not hasattr(ds, "features"):
            raise CorpusError(f"{path}: is a DatasetDict ({list(ds.keys())}); point at one split's folder")
        for row, rec in enumerate(ds, start=1):
            yield f"{path}:row {row}", rec
    elif fmt == "text":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise CorpusError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from None
        yield f"{path}:1", {"text": text}
    else:
        raise CorpusError(f"{path}: unknown format {fmt!r}")


def _nonempty_str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise CorpusError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise CorpusError(f"{where}: field {key!r} is empty")
    return v


def record_to_text(rec: object, where: str, tokenizer, template_kwargs: dict) -> str:
    """One document's text. Chat and QA records go through the chat template."""
    if isinstance(rec, CorpusError):
        raise rec
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "text" in rec:
        return _nonempty_str(rec, "text", where)
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
    return tokenizer.apply_chat_template(msgs, tokenize=False, **template_kwargs)


def is_val_document(text: str, val_fraction: float) -> bool:
    """Held-out membership from a hash of the text: stable across runs, machines and Python versions."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


class _Packer:
    def __init__(self, max_seq_len: int, eos_id: int):
        self.max_seq_len = max_seq_len
        self.eos_id = eos_id
        self.buf: list[int] = []
        self.out: list[list[int]] = []

    def add(self, ids: list[int]) -> None:
        self.buf.extend(ids)
        self.buf.append(self.eos_id)
        while len(self.buf) >= self.max_seq_len:
            self.out.append(self.buf[: self.max_seq_len])
            self.buf = self.buf[self.max_seq_len:]

    def finish(self) -> int:
        """Flush the short tail as a final sequence; a 1-token tail has no target and is reported."""
        dropped = 0
        if len(self.buf) >= 2:
            self.out.append(self.buf)
        else:
            dropped = len(self.buf)
        self.buf = []
        return dropped


def pack_source(src: SourceConfig, data: DataConfig, tokenizer, template_kwargs: dict) -> tuple[list[PackedSequence], SourceReport]:
    """Read, render, split, tokenize and pack one source. Stops reading once both caps are met."""
    path = expand_path(src.path)
    report = SourceReport(path=str(path), corpus=src.corpus, subset=src.subset,
                          sha256=source_fingerprint(path) if path.exists() else "")
    packers = {s: _Packer(data.max_seq_len, tokenizer.eos_token_id) for s in SPLITS}
    caps = {
        "train": src.max_train_sequences if src.max_train_sequences is not None else data.max_train_sequences,
        "val": src.max_val_sequences if src.max_val_sequences is not None else data.max_val_sequences,
    }

    def full(split: str) -> bool:
        return caps[split] is not None and len(packers[split].out) >= caps[split]

    for where, rec in iter_records(src):
        if src.max_records is not None and report.records >= src.max_records:
            break
        try:
            text = record_to_text(rec, where, tokenizer, template_kwargs)
        except CorpusError as e:
            if data.on_bad_record == "error":
                raise
            report.skipped += 1
            if len(report.skipped_examples) < 5:
                report.skipped_examples.append(str(e))
            continue
        report.records += 1
        split = "val" if is_val_document(text, data.val_fraction) else "train"
        if full(split):
            if full("train") and full("val"):
                break
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        report.documents[split] += 1
        report.tokens[split] += len(ids) + 1
        packers[split].add(ids)

    if report.records == 0:
        raise CorpusError(f"{path}: no usable records (corpus {src.corpus}, subset {src.subset})")
    if report.skipped:
        log.warning("%s: skipped %d bad records (on_bad_record=skip); first: %s",
                    path, report.skipped, report.skipped_examples[0])
    seqs = []
    for split in SPLITS:
        p = packers[split]
        tail = p.finish()
        if tail:
            log.info("%s [%s]: final %d-token tail has no next-token target; not stored", path, split, tail)
        if caps[split] is not None and len(p.out) > caps[split]:
            report.capped_sequences[split] = len(p.out) - caps[split]
            p.out = p.out[: caps[split]]
        report.sequences[split] = len(p.out)
        seqs += [PackedSequence(src.corpus, src.subset, split, ids) for ids in p.out]
    return seqs, report


def pack_corpora(data: DataConfig, tokenizer, template_kwargs: dict) -> tuple[list[PackedSequence], list[SourceReport]]:
    """All sources → packed sequences, ordered by (source order, split). Each source packs alone."""
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
