"""The loss path on synthetic inputs: the trainer's chunked loss against the naive full-logits
loss, peak memory (one child each) and time, at the headline size and along the scaling sweeps."""

from __future__ import annotations

import gc
import logging
import math
from typing import Callable

import torch

from .. import cache as C
from ..losses import chunked_mol_loss, dense_reference_loss, mol_weights
from ..machine import mem_available
from .sizes import BenchSizes
from .timing import child_setup, interleaved, med, run_children

log = logging.getLogger(__name__)


def synthetic_loss_inputs(batch: int, seq_len: int, vocab: int, hidden: int, k: int = 31, seed: int = 0) -> dict:
    """Random hidden states, output weights and teacher labels with the trainer's shapes and dtypes."""
    g = torch.Generator().manual_seed(seed)
    stride = vocab // k
    base = torch.randint(0, vocab, (batch, seq_len, 1), generator=g)
    # one id per disjoint stride-wide window: distinct within a position, as a real top-k is
    ids = (base + torch.arange(k) * stride + torch.randint(0, stride, (batch, seq_len, k), generator=g)) % vocab
    e = -torch.rand(batch, seq_len, k, generator=g).clamp_min(1e-6).log()
    resid = torch.rand(batch, seq_len, generator=g) * 0.45 + 0.05
    return {
        "hidden": torch.randn(batch, seq_len, hidden, generator=g),
        "weight": torch.randn(vocab, hidden, generator=g) * (2.0 / math.sqrt(hidden)),
        "target_ids": torch.randint(0, vocab, (batch, seq_len), generator=g),
        "mask": torch.ones(batch, seq_len, dtype=torch.bool),
        "is_domain": torch.arange(batch) % 2 == 0,
        C.TOPK_IDS: ids,
        C.TOPK_PROBS: e / e.sum(-1, keepdim=True) * (1 - resid).unsqueeze(-1),
        C.RESIDUAL: resid,
    }


def loss_path_work(inp: dict, variant: str, mode: str = "mol", chunk: int = 1024) -> Callable[[], None]:
    """One forward + backward of the loss from hidden states (gradient to the hidden states only,
    as with a frozen output layer under LoRA). variant: "chunked" (the trainer's) | "naive"."""
    w_ce, w_kl = mol_weights(inp["is_domain"], 0.01, mode)
    # the cache's column names are the loss's argument names: passed by keyword, they must agree
    batch = {key: inp[key] for key in ("target_ids", "mask", C.TOPK_IDS, C.TOPK_PROBS, C.RESIDUAL)}

    def run():
        h = inp["hidden"].detach().requires_grad_(True)
        if variant == "chunked":
            out = chunked_mol_loss(h, inp["weight"], **batch, w_ce=w_ce, w_kl=w_kl, chunk_size=chunk)
        elif variant == "naive":
            out = dense_reference_loss(h @ inp["weight"].t(), **batch, w_ce=w_ce, w_kl=w_kl)
        else:
            raise ValueError(variant)
        out.loss_sum.backward()

    return run


@child_setup("loss")
def _loss_child(batch: int, seq_len: int, vocab: int, hidden: int, variant: str, chunk: int, mode: str = "mol"):
    return loss_path_work(synthetic_loss_inputs(batch, seq_len, vocab, hidden), variant, mode, chunk)


def _loss_spec(batch, seq_len, vocab, hidden, variant, chunk) -> dict:
    return {"kind": "loss", "args": {"batch": batch, "seq_len": seq_len, "vocab": vocab, "hidden": hidden,
                                     "variant": variant, "chunk": chunk}}


def _naive_fits(n_tokens: int, vocab: int, sz: BenchSizes) -> bool:
    # a conservative 8 fp32 [N, V] copies: logits, the masked copy, two log-softmaxes, their grads
    return 8 * n_tokens * vocab * 4 < sz.memory_fraction * mem_available()


def loss_path_points(sz: BenchSizes) -> tuple[list[tuple], list[tuple]]:
    """(headline ladder, scaling points) as (batch, seq_len, vocab, sweep) tuples.

    The headline's naive path holds several [N, V] fp32 copies, so it is measured on a ladder of
    1, 2, 4 ... sequences of sz.loss_seq_len tokens up to the target, as far as it fits.
    """
    T, V = sz.loss_seq_len, sz.loss_vocab
    B = max(1, sz.loss_tokens // T)
    ladder, b = [], 1
    while b < B:
        ladder.append((b, T, V, "headline"))
        b *= 2
    ladder.append((B, T, V, "headline"))
    scaling = [(sz.scale_batch, t, sz.scale_seq_vocab, "seq_len") for t in sz.scale_seq_lens]
    scaling += [(sz.scale_batch, sz.scale_vocab_seq_len, v, "vocab") for v in sz.scale_vocabs]
    return ladder, scaling


def loss_path_memory(sz: BenchSizes, chunk: int) -> dict:
    """Peak RSS of every loss-path child: {(batch, seq_len, vocab, variant): result}, one process each.

    A naive point whose conservative prediction does not fit in memory is skipped (logged).
    """
    ladder, scaling = loss_path_points(sz)
    B, T, V, _ = ladder[-1]
    keys = [(B, T, V, "chunked")]
    for b, t, v, _ in ladder + scaling:
        if _naive_fits(b * t, v, sz):
            keys.append((b, t, v, "naive"))
        else:
            log.info("naive loss at %d tokens x %d vocab does not fit in memory: not run", b * t, v)
    keys += [(b, t, v, "chunked") for b, t, v, _ in scaling]
    keys = list(dict.fromkeys(keys))
    specs = [_loss_spec(b, t, v, sz.loss_hidden, variant, chunk) for b, t, v, variant in keys]
    return dict(zip(keys, run_children(specs, sz.parallel_children, sz.threads)))


def loss_path_headline(sz: BenchSizes, chunk: int, mem: dict) -> dict:
    """Loss-path peak at sz.loss_tokens x sz.loss_vocab, chunked vs naive.

    When the naive path does not fit at the target it is extrapolated linearly (its peak is
    affine in the token count) from the two largest points of the ladder that were measured.
    """
    ladder, _ = loss_path_points(sz)
    B, T, V, _ = ladder[-1]
    chunked = mem[(B, T, V, "chunked")]
    pts = [(b * t, mem[(b, t, v, "naive")]["peak_bytes"]) for b, t, v, _ in ladder if (b, t, v, "naive") in mem]
    n_target = B * T
    if pts and pts[-1][0] == n_target:
        naive, how = float(pts[-1][1]), "measured"
    elif len(pts) >= 2:
        (n1, p1), (n2, p2) = pts[-2:]
        naive = p2 + (p2 - p1) / (n2 - n1) * (n_target - n2)
        how = f"extrapolated linearly from {n1} and {n2} tokens (at {n_target} tokens it does not fit in memory)"
    elif pts:
        n1, p1 = pts[-1]
        naive, how = p1 * n_target / n1, f"scaled proportionally from {n1} tokens"
    else:
        raise RuntimeError("not even the smallest naive loss fits in memory")
    return {"tokens": n_target, "vocab": V, "hidden": sz.loss_hidden, "chunk": chunk, "batch": B, "seq_len": T,
            "chunked_peak_bytes": chunked["peak_bytes"], "chunked_seconds": chunked["seconds"],
            "naive_peak_bytes": naive, "naive_how": how, "naive_points": pts,
            "peak_reset": chunked["peak_reset"], "ratio": chunked["peak_bytes"] / naive}


def loss_path_scaling(sz: BenchSizes, chunk: int, mem: dict) -> list[dict]:
    """Time (in process, interleaved) and peak memory (from `mem`) of the loss path per (tokens, vocab)."""
    _, points = loss_path_points(sz)
    rows = []
    for B, T, V, sweep in points:
        inp = synthetic_loss_inputs(B, T, V, sz.loss_hidden)
        naive = (B, T, V, "naive") in mem
        tasks = {"chunked_ce": loss_path_work(inp, "chunked", "ce", chunk),
                 "chunked_mol": loss_path_work(inp, "chunked", "mol", chunk)}
        if naive:
            tasks["naive_mol"] = loss_path_work(inp, "naive", "mol", chunk)
        # no warm-up round: at these sizes every run maps fresh pages anyway, and the order rotates
        t = interleaved(tasks, sz.scale_reps, warmup=0)
        del inp, tasks
        gc.collect()
        row = {"sweep": sweep, "batch": B, "seq_len": T, "tokens": B * T, "vocab": V,
               "chunked_s": med(t["chunked_mol"]), "chunked_ce_s": med(t["chunked_ce"]),
               "chunked_peak_bytes": mem[(B, T, V, "chunked")]["peak_bytes"]}
        row["mol_over_ce_time"] = row["chunked_s"] / row["chunked_ce_s"]
        if naive:
            row.update(naive_s=med(t["naive_mol"]), naive_peak_bytes=mem[(B, T, V, "naive")]["peak_bytes"])
            row["time_ratio"] = row["chunked_s"] / row["naive_s"]
            row["memory_ratio"] = row["chunked_peak_bytes"] / row["naive_peak_bytes"]
        rows.append(row)
        log.info("loss path %s B=%d T=%d V=%d: %s", sweep, B, T, V,
                 {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return rows
