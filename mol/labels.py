"""The teacher's labels: a frozen model's final hidden states -> per position the top-k next-token
ids, their probabilities and the exact residual mass outside them (`topk_from_hidden`, which the
vLLM backend runs too), a batch of sequences labelled at once (`teacher_labels`), and the fidelity
probe that compares a unit's cached labels with exact ones (`measure_fidelity`). Stage 1's pass
(mol/teacher.py) drives these; nothing here writes a cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .cache import INPUT_IDS, RESIDUAL, TOPK_IDS, TOPK_PROBS, CacheUnit
from .config import ConfigError


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] ids -> [B, L, H] post-norm hidden states, without computing any logits."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@torch.no_grad()
def topk_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk: int):
    """Top-k soft labels from hidden states, one chunk of positions at a time.

    hidden [N, H], weight [V, H] -> ids [N, k] int64, probs [N, k] fp32, residual [N] fp32.
    Logits are fp32 whatever the model dtype. One exp pass, in place: the top-k entries are
    zeroed before the sum, so the sum is the residual's own numerator, accurate to fp32's relative
    precision however tiny it is (1 - Σp would be pure noise there); the top-k terms and the
    normaliser are float64. 3× cheaper than two log-sum-exps over the vocabulary and more exact
    (tests/test_teacher.py compares it with a float64 dense softmax).
    """
    n = hidden.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    probs = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    resid = torch.empty(n, dtype=torch.float32, device=hidden.device)
    w = weight.float()
    for a in range(0, n, chunk):
        logits = hidden[a:a + chunk].float() @ w.T
        top_v, top_i = torch.topk(logits, k, dim=-1)
        row_max = top_v[:, :1]  # topk is sorted: its first value is the row's max
        e = logits.sub_(row_max).exp_()
        e.scatter_(-1, top_i, 0.0)
        outside = e.sum(dim=-1).double()
        top_e = torch.exp((top_v - row_max).double())
        total = outside + top_e.sum(dim=-1)
        ids[a:a + chunk] = top_i
        probs[a:a + chunk] = (top_e / total[:, None]).float()
        resid[a:a + chunk] = (outside / total).float()
    return ids, probs, resid


@torch.no_grad()
def teacher_labels(model, batch: list, k: int, chunk: int, pad_id: int, device: torch.device):
    """Label a batch of token sequences (lists or int arrays): per sequence (ids [L-1, k], probs [L-1, k],
    residual [L-1]) numpy."""
    lens = [len(s) for s in batch]
    L = max(lens)
    x = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, s in enumerate(batch):
        x[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[i, : len(s)] = 1
    x, mask = x.to(device), mask.to(device)
    h = final_hidden(model, x, mask if min(lens) < L else None)
    # position t < len-1 predicts token t+1; right padding leaves the valid positions untouched
    sel = torch.zeros((len(batch), L), dtype=torch.bool, device=device)
    for i, n in enumerate(lens):
        sel[i, : n - 1] = True
    ids, probs, resid = topk_from_hidden(h[sel], model.get_output_embeddings().weight, k, chunk)
    ids, probs, resid = ids.cpu().numpy(), probs.cpu().numpy(), resid.cpu().numpy()
    out, a = [], 0
    for n in lens:
        out.append((ids[a:a + n - 1], probs[a:a + n - 1], resid[a:a + n - 1]))
        a += n - 1
    return out


def config_vocab_size(model_path: Path, tokenizer) -> int:
    """Vocabulary size from the tokenizer and the model's config.json, without loading weights."""
    n = len(tokenizer)
    try:
        mc = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return n
    v = mc.get("vocab_size") or (mc.get("text_config") or {}).get("vocab_size")
    return max(n, v) if isinstance(v, int) else n


def check_top_k(k: int, vocab: int) -> None:
    """The top-k must leave a residual bucket: k < the model's vocabulary (a ConfigError otherwise)."""
    if k >= vocab:
        raise ConfigError([f"teacher.top_k = {k} must be < the model's vocabulary size {vocab}"])


@torch.no_grad()
def measure_fidelity(model, unit: CacheUnit, n_sequences: int, chunk: int, device, temperature: float = 1.5) -> dict:
    """Re-run the teacher on a few of a unit's cached training sequences and compare the KL the cache gives with the exact one.

    Probe student: the teacher's own logits at `temperature` (a drifted, fully known student).
    - kl_quantisation: mean |KL_trunc(cached, quantised labels) - KL_trunc(exact fp32 labels, same ids)|
    - kl_truncation:   mean |KL_trunc(cached labels) - KL_dense(full vocabulary)|
    All references in float64.
    """
    from .losses import truncated_reverse_kl

    seqs = unit.load("train")
    if seqs is None or not seqs.has_teacher.any():
        return {}
    rows = [seqs.row(i) for i in range(len(seqs)) if seqs.has_teacher[i]][:n_sequences]
    w = model.get_output_embeddings().weight.double()
    quant, trunc, dense_all, id_match, n_pos = [], [], [], 0, 0
    for r in rows:
        x = torch.as_tensor(r[INPUT_IDS], device=device)[None]
        h = final_hidden(model, x)[0, :-1].double()
        for a in range(0, h.shape[0], chunk):
            t_logits = h[a:a + chunk] @ w.T
            s_logits = t_logits / temperature
            ids = torch.as_tensor(r[TOPK_IDS][a:a + chunk].astype(np.int64), device=device)
            probs_c = torch.as_tensor(r[TOPK_PROBS][a:a + chunk].astype(np.float64), device=device)
            resid_c = torch.as_tensor(r[RESIDUAL][a:a + chunk].astype(np.float64), device=device)
            t_logp = torch.log_softmax(t_logits, -1)
            probs_x = t_logp.gather(-1, ids).exp()
            resid_x = (1 - probs_x.sum(-1)).clamp_min(0)
            # the cache stores each position's ids ascending (schema 3), so compare as sorted sets
            exact_ids = torch.topk(t_logits, ids.shape[1], dim=-1).indices.sort(dim=-1).values
            id_match += (exact_ids == ids).all(-1).sum().item()
            kl_c = truncated_reverse_kl(s_logits, ids, probs_c, resid_c)
            kl_x = truncated_reverse_kl(s_logits, ids, probs_x, resid_x)
            s_logp = torch.log_softmax(s_logits, -1)
            kl_d = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
            quant.append((kl_c - kl_x).abs().cpu())
            trunc.append((kl_c - kl_d).abs().cpu())
            dense_all.append(kl_d.cpu())
            n_pos += ids.shape[0]
    return {
        "probe": f"student = teacher logits / {temperature}",
        "sequences": len(rows),
        "positions": n_pos,
        "topk_ids_exact_match": id_match / max(n_pos, 1),
        "kl_quantisation_mean_abs": float(torch.cat(quant).mean()),
        "kl_quantisation_max_abs": float(torch.cat(quant).max()),
        "kl_truncation_mean_abs": float(torch.cat(trunc).mean()),
        "kl_dense_mean": float(torch.cat(dense_all).mean()),
    }
