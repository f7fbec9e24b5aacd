"""Deterministic synthetic corpora and an instant teacher, for measuring Stage 1's own costs.

The benchmark's pipeline figure, the memory-growth test and `make scale` need corpora of a chosen
size and a teacher that costs nothing, so what they measure is reading, tokenizing, packing,
encoding, compressing and writing: the part of Stage 1 that must keep up with a GPU.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
          "patient dose renal cardiac therapy acute chronic protein cell clinical trial river market town "
          "harbour history century music science energy water light system model data").split()


def write_corpus(path: Path, tokens: int, seed: int = 0, words_per_record: int = 180) -> Path:
    """A JSONL file of {"text": ...} records of about `tokens` tokens in all (~1.3 tokens a word
    with a BPE vocabulary), the same bytes for the same arguments."""
    rng = np.random.default_rng(seed)
    n_words = int(tokens / 1.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        i = 0
        while n_words > 0:
            n = min(n_words, int(words_per_record * (0.5 + rng.random())))
            words = np.asarray(WORDS)[rng.integers(0, len(WORDS), n)]
            f.write(json.dumps({"text": f"Record {i}. " + " ".join(words) + "."}) + "\n")
            n_words -= n
            i += 1
    return path


class InstantTeacher:
    """Labels any batch at once from a pool of valid top-k rows (distinct ids, probabilities that
    sum below 1, the residual that completes them), cycled over the positions."""

    def __init__(self, k: int, vocab: int, pool: int = 4096, seed: int = 0):
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal((pool, 1024)) * 2.5
        top = np.argsort(-logits, axis=1)[:, :k]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True) * 1.05  # 1/21 of the mass outside the top-k pool space
        self.ids = rng.permutation(vocab)[:1024][top].astype(np.int64)
        self.probs = np.take_along_axis(p, top, 1).astype(np.float32)
        self.resid = (1.0 - self.probs.astype(np.float64).sum(1)).astype(np.float32)

    def __call__(self, batch: list) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        out, n = [], len(self.ids)
        for s in batch:
            idx = np.arange(len(s) - 1) % n
            out.append((self.ids[idx], self.probs[idx], self.resid[idx]))
        return out


@contextmanager
def instant_teacher(k: int, vocab: int):
    """Within the block, Stage 1 labels with an InstantTeacher instead of loading the model (a pass
    can also be handed one: `run_teacher_pass(cfg, backend=...)`)."""
    from .teacher import use_backend

    stub = InstantTeacher(k, vocab)
    with use_backend(lambda cfg, model_path, device, pad_id: (None, stub)):
        yield stub
