"""The leakage check: which evaluation questions occur inside training text. Texts are compared
normalised (lowercase, whitespace runs collapsed); an index over interior word k-grams finds the few
candidate questions of a text without scanning them all. Knows nothing of where the texts come from
(mol.default_data builds the default data with it, and refuses or drops what leaks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

# Normalised questions shorter than this are not leak-checked: short stems ("hands", "dresser" in
# PIQA, "Which is true?") occur by coincidence in unrelated text and do not identify an item on their
# own -- the choices do. Checking them would only drop innocent training records.
MIN_LEAK_CHARS = 30


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """`text` cut after each . ! or ? that whitespace follows: what the held-out checks compare
    (a held-out text counts as seen where one of its sentences occurs inside training text)."""
    return _SENTENCE_END.split(text)


def normalise(text: str) -> str:
    """Lowercase and collapse all whitespace runs to one space (the leakage check's notion of equal)."""
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class Leak:
    eval_file: str
    eval_id: str
    question: str
    train_file: str
    record: int  # 1-based line in the training file
    field: str


class QuestionIndex:
    """Finds which of many normalised questions occur in a normalised text, without a full scan each.

    In a normalised text, words are the maximal runs between single spaces. If a question
    w0 w1 ... wn occurs in a text, its interior words w1..w(n-1) occur there as consecutive whole
    words (only w0 and wn may be cut). So each question is filed under one interior word k-gram
    (k <= 3, the longest, hence the rarest); a text is split into words once, its k-grams are
    intersected with the index in C, and only the few candidates are confirmed with a substring test.
    Questions of one or two words have no interior and fall back to a plain substring test.
    """

    def __init__(self, questions: Iterable[str]):
        self.by_gram: dict[int, dict[tuple[str, ...], list[str]]] = {1: {}, 2: {}, 3: {}}
        self.plain: list[str] = []
        for q in set(questions):
            interior = q.split(" ")[1:-1]
            k = min(3, len(interior))
            if k == 0:
                self.plain.append(q)
                continue
            grams = [tuple(interior[i:i + k]) for i in range(len(interior) - k + 1)]
            best = max(grams, key=lambda g: (sum(map(len, g)), g))
            self.by_gram[k].setdefault(best, []).append(q)
        self.keys = {k: set(v) for k, v in self.by_gram.items() if v}
        self.plain.sort()

    def find(self, text: str) -> list[str]:
        words = text.split(" ")
        found = [q for q in self.plain if q in text]
        for k, keys in self.keys.items():
            grams = zip(*(words[i:] for i in range(k))) if k > 1 else ((w,) for w in words)
            for gram in keys.intersection(grams):
                found.extend(q for q in self.by_gram[k][gram] if q in text)
        return found


def eval_questions(evals: dict[str, list[tuple[str, str]]]) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """{normalised question: [(eval file, id), ...]} for questions long enough to check; and the skipped count."""
    owners: dict[str, list[tuple[str, str]]] = {}
    short = 0
    for eval_file, items in evals.items():
        for item_id, question in items:
            q = normalise(question)
            if len(q) < MIN_LEAK_CHARS:
                short += 1
                continue
            owners.setdefault(q, []).append((eval_file, item_id))
    return owners, short


def find_leaks(train: dict[str, list[dict]], evals: dict[str, list[tuple[str, str]]]) -> tuple[list[Leak], int]:
    owners, short = eval_questions(evals)
    index = QuestionIndex(owners)
    leaks = []
    for train_file, records in train.items():
        for n, rec in enumerate(records, start=1):
            for field in ("text", "question", "answer"):
                value = rec.get(field)
                if not isinstance(value, str):
                    continue
                for q in sorted(index.find(normalise(value))):
                    leaks.extend(Leak(ef, eid, q, train_file, n, field) for ef, eid in owners[q])
    return leaks, short


def describe(leak: Leak) -> str:
    q = leak.question if len(leak.question) <= 80 else leak.question[:77] + "..."
    return (f"{leak.eval_file} item {leak.eval_id}: question occurs in {leak.train_file} "
            f"record {leak.record} ({leak.field}): {q!r}")
