"""Held-out text is never trained on.

A source marked `heldout: true` is text that no run trains on: every drift figure (KL-to-base and
CE on unseen text) rests on that. mol.config refuses two sources that read one file; this module
compares what they hold, before Stage 1 labels anything:

- a held-out document whose normalised text (lowercase, whitespace runs collapsed) is also a
  training-split document of another source is refused (HeldoutLeak, exit 2), naming both places;
- a held-out document that shares a sentence of MIN_LEAK_CHARS or more characters with a training
  document is counted, and warned about or refused as `data.heldout_overlap` says (one shared
  sentence does not make a document seen, and text of one field quotes the same sources).

A training source's documents that go to its own validation split (by the hash of their text, as
the packer decides) are not training text and are not compared. Records are read and rendered as
the packer reads them (chat template included), one at a time: memory holds the held-out side only.
A training text file many times larger than every held-out document cannot be one of them; it is
read in the packer's pieces (never whole) and compared by its sentences (a sentence cut by a piece
boundary, one a MiB, is not seen).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from .config import MolConfig, SourceConfig
from .corpora import document_pieces, is_val_document, record_to_text
from .corpus_formats import CorpusError, iter_records
from .errors import MolError
from .leakage import MIN_LEAK_CHARS, QuestionIndex, normalise, sentences

log = logging.getLogger(__name__)

EXAMPLES = 5


class HeldoutLeak(MolError):
    """A held-out document is also training text."""


@dataclass
class HeldoutCheck:
    """What the comparison found: exact duplicates and shared sentences, with a few examples each."""

    heldout_documents: int = 0
    training_documents: int = 0
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    overlapping: set = field(default_factory=set)  # held-out documents that share a sentence
    overlap_examples: list[str] = field(default_factory=list)


def _digest(text: str) -> bytes:
    return hashlib.sha256(normalise(text).encode("utf-8")).digest()


def _documents(src: SourceConfig, tokenizer, template_kwargs: dict):
    """(where, text or TextFile) of every readable record, within the source's max_records (bad
    records are the packer's to report)."""
    for n, (where, rec) in enumerate(iter_records(src)):
        if src.max_records is not None and n >= src.max_records:
            return
        try:
            yield where, record_to_text(rec, where, tokenizer, template_kwargs)
        except CorpusError:
            continue


def check_heldout_disjoint(cfg: MolConfig, tokenizer) -> HeldoutCheck | None:
    """Compare every held-out document with every training-split document of the config's other
    sources; raise HeldoutLeak for an exact duplicate (or a shared sentence under
    data.heldout_overlap: error). None when the config has no held-out source."""
    sources = cfg.data.sources
    held = [(i, s) for i, s in enumerate(sources) if s.heldout]
    if not held:
        return None
    kwargs = cfg.model.chat_template_kwargs
    res = HeldoutCheck()
    by_digest: dict[bytes, str] = {}
    owners: dict[str, set[str]] = {}  # normalised sentence -> the held-out documents it is in
    largest = 0  # bytes of the largest held-out document
    for i, src in held:
        for where, doc in _documents(src, tokenizer, kwargs):
            text = doc if isinstance(doc, str) else doc.read()  # held-out sets are read whole
            largest = max(largest, len(text.encode("utf-8")))
            res.heldout_documents += 1
            name = f"data.sources[{i}] {where}"
            by_digest.setdefault(_digest(text), name)
            for sentence in sentences(text):
                s = normalise(sentence)
                if len(s) >= MIN_LEAK_CHARS:
                    owners.setdefault(s, set()).add(name)
    index = QuestionIndex(owners)
    for j, src in enumerate(sources):
        if src.heldout:
            continue
        for where, doc in _documents(src, tokenizer, kwargs):
            if is_val_document(doc, cfg.data.val_fraction):
                continue
            res.training_documents += 1
            if isinstance(doc, str) or doc.size <= 4 * largest:
                text = doc if isinstance(doc, str) else doc.read()
                hit = by_digest.get(_digest(text))
                if hit is not None:
                    res.duplicates += 1
                    if len(res.duplicate_examples) < EXAMPLES:
                        res.duplicate_examples.append(f"{hit} is data.sources[{j}] {where}")
                    continue
                pieces = [text]
            else:
                pieces = (piece for piece, _, _ in document_pieces(doc, tokenizer))
            for piece in pieces:
                for s in index.find(normalise(piece)):
                    new = owners[s] - res.overlapping
                    res.overlapping |= owners[s]
                    if new and len(res.overlap_examples) < EXAMPLES:
                        res.overlap_examples.append(f"{sorted(new)[0]} shares {s[:60]!r} with data.sources[{j}] {where}")
    _judge(res, cfg.data.heldout_overlap)
    return res


def _judge(res: HeldoutCheck, overlap: str) -> None:
    if res.duplicates:
        raise HeldoutLeak(
            f"{res.duplicates} held-out document(s) are also training documents, so a run would train on text "
            f"its drift figures call unseen: {'; '.join(res.duplicate_examples)}. Remove them from one side "
            f"(a held-out source's documents must not feed any training split)")
    if not res.overlapping:
        log.info("held-out text: %d documents, none inside the %d training documents", res.heldout_documents,
                 res.training_documents)
        return
    what = (f"{len(res.overlapping)} of {res.heldout_documents} held-out documents share a sentence "
            f"(>= {MIN_LEAK_CHARS} characters) with training text, e.g. {'; '.join(res.overlap_examples)}")
    if overlap == "error":
        raise HeldoutLeak(f"{what} (data.heldout_overlap: error; 'warn' accepts them with this warning)")
    log.warning("%s (data.heldout_overlap: warn)", what)
