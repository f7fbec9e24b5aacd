"""Corpora in: records from every supported format (mol/corpus_formats.py), rendered to text, tokenized and packed.

Every record becomes one document: `{"text": ...}` as is, chat (`{"messages": [...]}`) and QA
(`{"question": ..., "answer": ...}`) records through the tokenizer's chat template, so text and QA
train in one pipeline. Documents are joined with EOS and cut into `max_seq_len` sequences within
one (corpus, subset, split). Everything is deterministic: the same config gives the same sequences.

A long document (a text file, or a text of more than PIECE_CHARS characters, plain or rendered) is
tokenized in pieces cut at the end of a word, one piece per step of the packer, so memory is bounded
by a piece and the packer's window, not by the document (see `piece_end` for why the ids are those
of one call).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import math
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import DataConfig, SourceConfig, expand_path
# CorpusError, Where, detect_format and iter_records are also imported from here (teacher, cache, tests)
from .corpus_formats import (CorpusError, TextFile, Where, check_source_path, detect_format,  # noqa: F401
                             iter_records, read_records, table_rows)
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
    check_source_path(path)  # hashing a FIFO would wait for a writer forever
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
    if not v or v.isspace():  # not v.strip(): a copy of a 200 MB text
        raise CorpusError(f"{where}: field {key!r} is empty")
    return v


def _utf8_pieces(text: str) -> Iterator[tuple[int, bytes]]:
    """The UTF-8 of `text`, PIECE_CHARS characters at a time (with the offset of each), so a long
    text is never encoded whole: a copy of it as large as itself."""
    for i in range(0, len(text), PIECE_CHARS):
        yield i, text[i:i + PIECE_CHARS].encode("utf-8")


def _encodable(text: str, where: str) -> str:
    """JSON's \\u escapes can spell half of a UTF-16 surrogate pair alone: valid JSON, but not
    text. UTF-8 (the tokenizer, the validation split's hash) cannot encode it."""
    try:
        for _ in _utf8_pieces(text):
            pass
    except UnicodeEncodeError as e:
        raise CorpusError(f"{where}: invalid Unicode: lone surrogate \\u{ord(e.object[e.start]):04x} "
                          f"(half of a UTF-16 pair; UTF-8 cannot encode it)") from None
    return text


def record_to_text(rec: object, where: str, tokenizer, template_kwargs: dict) -> str | TextFile:
    """One document's text. Chat and QA records go through the chat template. A text file's
    document stays a TextFile (checked and hashed by its reader), read a window at a time."""
    if isinstance(rec, CorpusError):
        raise rec
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("text"), TextFile):
        return rec["text"]
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


def is_val_document(text: str | TextFile, val_fraction: float) -> bool:
    """Held-out membership from a sha256 of the text's UTF-8: stable across runs, machines and
    Python versions. Hashed a piece at a time (a text file's hash is its reader's)."""
    if val_fraction <= 0:
        return False
    if isinstance(text, TextFile):
        digest = text.digest
    else:
        sha = hashlib.sha256()
        for _, b in _utf8_pieces(text):
            sha.update(b)
        digest = sha.digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


PIECE_CHARS = 1 << 20
"""A document longer than this (characters of text, or bytes of a text file) is tokenized in pieces
of at most this size. The fast tokenizer holds ~100 bytes a token for one call (ids, offsets, token
strings) and the packer all sequences of a document at once: a 200 MB text asked for 3.4 GB and
aborted. 1 MiB keeps a piece's cost near 30 MB, and a call long enough that splitting costs no speed."""

_WORD_END = re.compile(r"[^\W_](?=\s)")        # a letter or digit before whitespace
_WORD_BEFORE_MARK = re.compile(r"[^\W_](?=[^\w\s])")  # ... before punctuation (text without spaces)


def piece_end(window: str, last: bool, added_tokens: tuple[str, ...] = ()) -> int:
    """Where the piece that starts `window` ends: all of it when it is the document's rest, else
    after the last letter or digit that whitespace follows, else that punctuation follows, never
    inside an added (special) token's text; else after the last special token; else the whole
    window (a hard cut), or up to the special token it would cut.

    Why the ids equal one call's: a byte-level BPE tokenizer merges only within the pieces its
    pre-tokenizer's regex cuts (SmolLM2, GPT-2, Llama 3, Qwen: `?\\p{L}+`, `\\p{N}`, punctuation runs,
    whitespace runs), and no such piece runs from a letter or digit into whitespace or punctuation:
    the split is one the tokenizer makes anyway. The regex looks only ahead, so the next piece,
    starting at that boundary (with the space that begins its first word), is cut as in the whole
    text; the last word of this piece ends at the end of the string as it ended before the space.
    Not covered: a hard cut (a window of PIECE_CHARS with no word end: one long run of symbols) may
    merge differently at the cut; tokenizers whose pre-tokenizer adds a prefix space to every call
    (SentencePiece `prepend_scheme: always`), normalizers that look across characters, and added
    tokens with lstrip/rstrip may differ at the cut."""
    if last:
        return len(window)
    for rule in (_WORD_END, _WORD_BEFORE_MARK):
        for lo in (len(window) - 4096, len(window) - 65536, 0):  # the last match, found near the end first
            cuts = [m.end() for m in rule.finditer(window, max(lo, 0))]
            for cut in reversed(cuts):
                if all(_straddles(window, cut, t) is None for t in added_tokens):
                    return cut
            if lo <= 0:
                break
    ends = [i + len(t) for t in added_tokens if (i := window.rfind(t)) >= 0]
    if ends:  # special tokens are split out before anything else: their ends are cuts too
        return max(ends)
    cut = len(window)
    for t in added_tokens:  # a hard cut still leaves special tokens whole
        start = _straddles(window, cut, t)
        cut = start if start else cut
    return cut


def _straddles(window: str, cut: int, token: str) -> int | None:
    """The start of an occurrence of `token` that has characters on both sides of `cut`, if one
    does; one that runs past the window's end counts (what follows is not known yet). A start of 0
    reads as none where it moves a cut: a piece cannot be empty."""
    for i in range(max(0, cut - len(token) + 1), cut):
        seen = window[i:i + len(token)]
        if i + len(token) > cut and seen == token[:len(seen)]:
            return i
    return None


class _StrDoc:
    """A document held as a str, read a window at a time as a TextFile is (offsets in characters)."""

    def __init__(self, text: str):
        self.text = text

    def window(self, offset: int, n: int) -> tuple[str, bool]:
        return self.text[offset:offset + n], offset + n >= len(self.text)

    @staticmethod
    def advance(offset: int, piece: str) -> int:
        return offset + len(piece)


def document_pieces(doc: str | TextFile, tokenizer, start: int = 0, limit: int | None = None):
    """A document's pieces from offset `start` (characters of a str, bytes of a TextFile): (piece,
    the offset after it, whether it is the last). Each depends only on the text from its offset, so a
    pass resumed at an offset cuts what the uninterrupted one did."""
    doc, limit = _StrDoc(doc) if isinstance(doc, str) else doc, limit or PIECE_CHARS
    added = tuple(t for t in tokenizer.get_added_vocab() if len(t) > 1)
    offset, last = start, False
    while not last:
        window, rest = doc.window(offset, limit)
        cut = piece_end(window, rest, added)
        piece, last = window[:cut], rest and cut == len(window)
        offset = doc.advance(offset, piece)
        yield piece, offset, last


def _is_long(text: str | TextFile) -> bool:
    return isinstance(text, TextFile) or len(text) > PIECE_CHARS


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

    A long document (`_is_long`) ends its batch and is then tokenized one piece per `_fill`, so what
    is pending is one piece's sequences, never a whole document's. Meanwhile `doc` in the state
    says where it is: the reader's position before it, its split and the offset of its next piece;
    a resumed pass reads that record again and goes on from the offset.
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
            self.doc = None
        else:
            self.pos, self.line, self.fresh, self.done = state["pos"], state["line"], False, state["done"]
            self.bufs = {s: unpack_array(state["bufs"][s]) for s in SPLITS}
            self.pending = deque((sp, unpack_array(a)) for sp, a in state["pending"])
            self.report = SourceReport(**state["report"])
            self.doc = state.get("doc")  # a record written before long documents had none
        self.doc_text = None  # the open long document, read again (from doc["at"]) after a resume

    def state(self) -> dict:
        return {"pos": self.pos, "line": self.line, "done": self.done, "doc": self.doc,
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

    def _add(self, split: str, ids, eos: bool = True) -> None:
        L = self.data.max_seq_len
        buf = np.concatenate([self.bufs[split], np.asarray(ids, np.int32), np.array([self.eos][:eos], np.int32)])
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
        """Read, render and tokenize up to _READ_BATCH records, then pack them in order; or, while
        a long document is open, tokenize and pack its next piece."""
        if self.doc is not None:
            return self._fill_piece()
        rep, max_records = self.report, self.caps["max_records"]
        batch = []  # (text or CorpusError, split)
        at = [self.pos, self.line, self.fresh]  # where the reader is before each record
        reader = read_records(self.src, self.pos, self.segment.end, self.line, self.fresh)
        self.fresh = False
        exhausted, long_at = True, None
        for where, rec, pos, line in reader:
            try:
                text = record_to_text(rec, where, self.tokenizer, self.template_kwargs)
                held = self.src.heldout or is_val_document(text, self.data.val_fraction)
                batch.append((text, "val" if held else "train"))
                if _is_long(text):
                    long_at = at  # it ends the batch: tokenized a piece at a time by the next _fills
            except CorpusError as e:
                batch.append((e, None))
            self.pos, self.line = pos, line
            at = [pos, line, False]
            if len(batch) >= _READ_BATCH or long_at is not None:
                exhausted = False
                break
        if hasattr(reader, "close"):
            reader.close()
        # a split full before the batch stays full: its documents are never tokenized
        todo = [i for i, (t, sp) in enumerate(batch) if sp is not None and not self._full(sp) and not _is_long(t)]
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
            rep.documents[split] += 1
            if i not in doc_ids:  # the long document that ends the batch
                self.doc, self.doc_text = {"at": long_at, "split": split, "offset": 0}, text
                break
            doc = doc_ids[i]
            rep.tokens[split] += len(doc) + 1
            self._add(split, doc)
        if exhausted:
            self._finish()

    def _reopen_doc(self) -> str | TextFile:
        """The open long document after a resume: its record read and rendered again."""
        pos, line, fresh = self.doc["at"]
        reader = read_records(self.src, pos, self.segment.end, line, fresh)
        where, rec, _, _ = next(reader)
        reader.close()
        return record_to_text(rec, where, self.tokenizer, self.template_kwargs)

    def _fill_piece(self) -> None:
        """Tokenize and pack the open long document's next piece (EOS after the last). The document
        is left where its split fills: what follows would only be counted, not stored."""
        if self.doc_text is None:
            self.doc_text = self._reopen_doc()
        split, rep = self.doc["split"], self.report
        piece, offset, last = next(document_pieces(self.doc_text, self.tokenizer, self.doc["offset"]))
        ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        rep.tokens[split] += len(ids) + last
        self._add(split, ids, eos=last)
        self.doc["offset"] = offset
        if last or self._full(split):
            self.doc, self.doc_text = None, None
            if self._full("train") and self._full("val"):
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
