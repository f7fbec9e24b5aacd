"""Cached sequences -> padded tensors, one micro-batch's loss, and the no-grad per-subset loss used by
validation and eval.

Batch keys are the cache's column names (`input_ids`, `teacher_topk_ids`, `teacher_topk_probs`,
`teacher_residual`), which are also the loss function's argument names: `micro_batch_loss` passes
them by keyword, so a renamed column cannot silently reach the wrong argument.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from . import cache as C
from .losses import MolLossOutput, chunked_mol_loss, mol_weights


def collate(rows: list[dict], k: int, device: torch.device, with_teacher: bool = True) -> dict:
    """Rows from `Sequences.row` -> tensors, right-padded to the longest sequence.

    input_ids [B, L], target_ids [B, L-1], mask [B, L-1] bool, has_teacher [B] bool,
    is_domain [B] bool, teacher_topk_ids [B, L-1, k] int64, teacher_topk_probs [B, L-1, k] fp32,
    teacher_residual [B, L-1] fp32. Rows without teacher labels get all their mass in the residual
    bucket (finite, and weighted 0 by the caller), so a mixed batch never carries NaN.
    """
    B, L = len(rows), max(len(r[C.INPUT_IDS]) for r in rows)
    ids = np.zeros((B, L), dtype=np.int64)
    attn = np.zeros((B, L), dtype=bool)
    for i, r in enumerate(rows):
        n = len(r[C.INPUT_IDS])
        ids[i, :n] = r[C.INPUT_IDS]
        attn[i, :n] = True
    out = {
        C.INPUT_IDS: torch.from_numpy(ids).to(device),
        "attention_mask": torch.from_numpy(attn).to(device),
        "target_ids": torch.from_numpy(ids[:, 1:]).to(device),
        "mask": torch.from_numpy(attn[:, 1:] & attn[:, :-1]).to(device),
        "is_domain": torch.tensor([r[C.CORPUS] == "domain" for r in rows], device=device),
        "has_teacher": torch.tensor([r[C.TOPK_IDS] is not None for r in rows], device=device),
    }
    if with_teacher:
        tid = np.zeros((B, L - 1, k), dtype=np.int64)
        tpr = np.zeros((B, L - 1, k), dtype=np.float32)
        res = np.ones((B, L - 1), dtype=np.float32)
        for i, r in enumerate(rows):
            if r[C.TOPK_IDS] is not None:
                n = len(r[C.RESIDUAL])
                tid[i, :n] = r[C.TOPK_IDS]
                tpr[i, :n] = r[C.TOPK_PROBS]
                res[i, :n] = r[C.RESIDUAL]
        out[C.TOPK_IDS] = torch.from_numpy(tid).to(device)
        out[C.TOPK_PROBS] = torch.from_numpy(tpr).to(device)
        out[C.RESIDUAL] = torch.from_numpy(res).to(device)
    return out


def model_hidden(model, batch: dict) -> torch.Tensor:
    """Final post-norm hidden states [B, L, H] (no logits), through LoRA/peft wrappers too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = batch["attention_mask"]
    return base.get_decoder()(input_ids=batch[C.INPUT_IDS],
                              attention_mask=None if bool(attn.all()) else attn.long()).last_hidden_state


def output_weight(model) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight


def loss_weights(batch: dict, alpha: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (w_ce, w_kl) [B] of a collated batch on its device: MoL's routing (or CE only),
    with no KL weight on a sequence the cache holds no teacher labels for."""
    w_ce, w_kl = mol_weights(batch["is_domain"], alpha, mode)
    device = batch["is_domain"].device
    return w_ce.to(device), w_kl.to(device) * batch["has_teacher"]


def micro_batch_loss(model, batch: dict, *, w_ce: torch.Tensor, w_kl: torch.Tensor, chunk_size: int,
                     hidden: torch.Tensor | None = None) -> MolLossOutput:
    """The loss of one collated micro-batch: the student's final hidden states (or `hidden` [B, L, H]
    when the caller computed them, e.g. through DDP's wrapper), then the chunked MoL loss over
    positions 0..L-2 with the teacher tensors passed by their cache names. `loss_sum` is the
    unnormalised sum over sequences: the trainer divides it once by the global batch."""
    h = (model_hidden(model, batch) if hidden is None else hidden)[:, :-1]
    return chunked_mol_loss(h, output_weight(model), target_ids=batch["target_ids"], mask=batch["mask"],
                            teacher_topk_ids=batch.get(C.TOPK_IDS), teacher_topk_probs=batch.get(C.TOPK_PROBS),
                            teacher_residual=batch.get(C.RESIDUAL), w_ce=w_ce, w_kl=w_kl, chunk_size=chunk_size)


@torch.no_grad()
def subset_losses(model, seqs: C.Sequences, k: int, device: torch.device, batch_size: int = 4,
                  chunk: int = 1024, max_per_subset: int | None = None, per_sequence: bool = False) -> dict:
    """Token-weighted CE per subset, and KL-to-base per subset where the cache has teacher labels.

    Returns {"ce/<subset>": float, "kl_to_base/<subset>": float, "tokens/<subset>": int,
    "ce/<corpus>": float, "kl_to_base/<corpus>": float}. CE is the mean next-token NLL (exp of it
    is the perplexity); KL is the truncated reverse KL to the cached teacher (0 for the base model
    up to the cache's quantisation). With `per_sequence`, also "ce_seq/<subset>": each sequence's
    mean CE in cache order, so that two models' figures on the same sequences can be compared
    pair by pair (a paired standard error; the step-0 validation is the base model's).
    """
    was_training = model.training
    model.eval()
    idx_by_subset = defaultdict(list)
    for i in range(len(seqs)):
        idx_by_subset[seqs.subset[i]].append(i)
    sums = defaultdict(float)
    seq_ce: dict[str, list[float]] = {}
    for subset, idx in idx_by_subset.items():
        idx = idx[:max_per_subset] if max_per_subset else idx
        for a in range(0, len(idx), batch_size):
            rows = [seqs.row(i) for i in idx[a:a + batch_size]]
            b = collate(rows, k, device)
            has = b["has_teacher"]
            out = micro_batch_loss(model, b, w_ce=torch.ones_like(has, dtype=torch.float32), w_kl=has.float(),
                                   chunk_size=chunk)
            n = out.n_tokens.double()
            corpus = rows[0][C.CORPUS]
            if per_sequence:
                seq_ce.setdefault(subset, []).extend(round(float(v), 6) for v in out.ce)
            for key in (subset, corpus):
                sums[f"ce_sum/{key}"] += float((out.ce.double() * n).sum())
                sums[f"n/{key}"] += float(n.sum())
                if bool(has.any()):
                    sums[f"kl_sum/{key}"] += float((out.kl.double() * n * has).sum())
                    sums[f"nkl/{key}"] += float((n * has).sum())
    model.train(was_training)
    res = {}
    for key in sorted({k.split("/", 1)[1] for k in sums}):
        res[f"ce/{key}"] = sums[f"ce_sum/{key}"] / max(sums[f"n/{key}"], 1)
        res[f"tokens/{key}"] = int(sums[f"n/{key}"])
        if sums.get(f"nkl/{key}"):
            res[f"kl_to_base/{key}"] = sums[f"kl_sum/{key}"] / sums[f"nkl/{key}"]
    res.update({f"ce_seq/{subset}": v for subset, v in seq_ce.items()})
    return res
