"""Stage 1 on vLLM (`teacher.backend: vllm`, extra `[vllm]`, CUDA only): top-k labels from prompt log-probs.

vLLM returns, for every prompt position t >= 1, the log-probabilities of the k most likely tokens
at t given the prefix (`prompt_logprobs[t]`, a mapping token id -> Logprob(logprob, rank, ...)),
plus the actual prompt token as an extra entry when it is not among them. Position 0 carries no
distribution. With `logprobs_mode="raw_logprobs"` the values are the log-softmax of the raw logits
(no temperature, penalties or processors), i.e. what the transformers backend computes.

The cache's row for position t (predicting token t+1) is `prompt_logprobs[t + 1]` restricted to
its entries of rank <= k; the residual is 1 - Σ p over them, computed in log space in float64
(log1mexp of their log-sum-exp), so it stays accurate when it is tiny.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import ConfigError

log = logging.getLogger(__name__)


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate at both ends; -inf at x = 0."""
    x = np.minimum(x, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def parse_prompt_logprobs(prompt_logprobs: Sequence[Mapping[int, Any] | None], k: int):
    """One request's `prompt_logprobs` -> (ids [L-1, k] int64, probs [L-1, k] float32, residual [L-1] float32),
    ids most probable first, as `mol.teacher.teacher_labels` returns them.

    Raises ValueError when a position has fewer than k entries of rank <= k (max_logprobs below k,
    or the request asked for fewer).
    """
    if len(prompt_logprobs) < 2:
        raise ValueError("a prompt of fewer than 2 tokens has no next-token distribution to store")
    n = len(prompt_logprobs) - 1
    ids = np.empty((n, k), dtype=np.int64)
    logp = np.empty((n, k), dtype=np.float64)
    for t, pos in enumerate(prompt_logprobs[1:]):
        if pos is None:
            raise ValueError(f"prompt position {t + 1} has no log-probs (prefix caching on?)")
        entries = []
        for tid, lp in pos.items():
            rank = getattr(lp, "rank", None)
            # the actual prompt token is added with its true rank when it is outside the top-k
            if rank is None or rank <= k:
                entries.append((float(lp.logprob), int(tid)))
        if len(entries) < k:
            raise ValueError(f"prompt position {t + 1}: {len(entries)} log-probs of rank <= {k}, expected {k} "
                             f"(LLM(max_logprobs) and SamplingParams(prompt_logprobs) must be >= k)")
        entries.sort(key=lambda e: -e[0])
        for j, (v, tid) in enumerate(entries[:k]):
            logp[t, j], ids[t, j] = v, tid
    lse = np.logaddexp.reduce(logp, axis=1)
    resid = np.exp(_log1mexp(lse))
    return ids, np.exp(logp).astype(np.float32), resid.astype(np.float32)


class VllmTeacher:
    """A vLLM engine set up for one scoring pass: token-id prompts, one generated token, top-k prompt log-probs."""

    def __init__(self, model_path: Path, k: int, dtype: str = "auto", engine_kwargs: dict | None = None):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ConfigError([f"teacher.backend = vllm needs vLLM (pip install -e '.[vllm]', CUDA only): {e}"]) from None
        self.k = k
        kwargs = {"dtype": "bfloat16" if dtype == "auto" else dtype, **(engine_kwargs or {})}
        # max_logprobs defaults to 20 (< 31); prefix caching would skip the cached positions' log-probs
        self.llm = LLM(model=str(model_path), max_logprobs=k, logprobs_mode="raw_logprobs",
                       enable_prefix_caching=False, **kwargs)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)

    def labels(self, batch: list[list[int]]):
        """Same contract as mol.teacher.teacher_labels: per sequence (ids, probs, residual) numpy."""
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in batch],
                                 self.params, use_tqdm=False)
        return [parse_prompt_logprobs(o.prompt_logprobs, self.k) for o in outs]
