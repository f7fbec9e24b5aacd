"""Stage 2 with the real model: the trainer's micro-step per loss mode against an online teacher,
the cache reader against training, the step ratio by length, and each mode's peak memory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from .. import cache as C
from ..batching import collate, loss_weights, micro_batch_loss, model_hidden, output_weight
from ..config import MolConfig, config_to_dict, load_config
from ..losses import mol_weights, per_sequence
from .sizes import BenchSizes
from .timing import child_setup, interleaved, med, run_children

log = logging.getLogger(__name__)


def _online_chunk(h: torch.Tensor, t_h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    logits = h.float() @ weight.float().t()
    logp = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        t_logp = torch.log_softmax(t_h.float() @ weight.float().t(), dim=-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = (logp.exp() * (logp - t_logp)).sum(-1)
    return ce, kl


def online_teacher_loss(hidden, teacher_hidden, weight, target_ids, mask, w_ce, w_kl, chunk_size: int = 1024):
    """MoL with a live teacher: full-vocabulary reverse KL against the teacher's hidden states.

    The strongest online baseline we could write: the same chunking and recomputation as
    chunked_mol_loss (the teacher keeps only its [N, H] hidden states, its logits are rebuilt per
    chunk), so the difference with the cached path is the teacher forward and the full-vocab KL.
    """
    batch, seq_len, width = hidden.shape
    flat_valid = mask.reshape(-1).nonzero().squeeze(-1)
    seq_index = torch.div(flat_valid, seq_len, rounding_mode="floor")
    h = hidden.reshape(-1, width).index_select(0, flat_valid)
    t_h = teacher_hidden.reshape(-1, width).index_select(0, flat_valid)
    targets = target_ids.reshape(-1).index_select(0, flat_valid)
    ce_parts, kl_parts = [], []
    for a in range(0, max(h.shape[0], 1), chunk_size):
        sl = slice(a, a + chunk_size)
        ce_c, kl_c = checkpoint(_online_chunk, h[sl], t_h[sl], weight, targets[sl], use_reentrant=False,
                                preserve_rng_state=False)
        ce_parts.append(ce_c)
        kl_parts.append(kl_c)
    return per_sequence(torch.cat(ce_parts), torch.cat(kl_parts), seq_index, mask.sum(dim=1), w_ce, w_kl)


class Stage2:
    """The trainer's student (build_student: LoRA, train mode) and its micro-step, per loss mode."""

    def __init__(self, cfg: MolConfig, model_path: Path, device: torch.device, k: int):
        from ..train import build_student

        torch.manual_seed(cfg.train.seed)
        self.cfg, self.device, self.k = cfg, device, k
        self.model = build_student(cfg, model_path, device)
        self.weight = output_weight(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, rows: list[dict], mode: str) -> int:
        """collate + model_hidden + chunked_mol_loss + backward, as train() runs one micro-batch."""
        t = self.cfg.train
        self.model.zero_grad(set_to_none=True)
        b = collate(rows, self.k, self.device, with_teacher=mode == "mol")
        w_ce, w_kl = loss_weights(b, t.alpha, mode)
        out = micro_batch_loss(self.model, b, w_ce=w_ce, w_kl=w_kl, chunk_size=t.loss_chunk)
        (out.loss_sum / t.global_batch).backward()
        return int(b["attention_mask"].sum())

    def online_step(self, rows: list[dict]) -> int:
        """The same step with the teacher run live: the student with its adapter disabled, no grad."""
        t = self.cfg.train
        self.model.zero_grad(set_to_none=True)
        b = collate(rows, self.k, self.device, with_teacher=False)
        w_ce, w_kl = mol_weights(b["is_domain"], t.alpha, "mol")
        with torch.no_grad(), self.model.disable_adapter():
            t_h = model_hidden(self.model, b)[:, :-1]
        h = model_hidden(self.model, b)[:, :-1]
        out = online_teacher_loss(h, t_h, self.weight, b["target_ids"], b["mask"], w_ce.to(self.device),
                                  w_kl.to(self.device), chunk_size=t.loss_chunk)
        (out.loss_sum / t.global_batch).backward()
        return int(b["attention_mask"].sum())

    def optimizer(self):
        return torch.optim.AdamW(self.params, lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay)


def stage2_rows(seqs: C.Sequences, n: int) -> list[dict]:
    """n training rows, alternating domain and general (the trainer's batches mix both)."""
    dom = [i for i in range(len(seqs)) if seqs.corpus[i] == "domain" and seqs.has_teacher[i]]
    gen = [i for i in range(len(seqs)) if seqs.corpus[i] == "general" and seqs.has_teacher[i]]
    picked = [x for pair in zip(dom, gen) for x in pair][:n]
    if len(picked) < n:
        picked += [i for i in range(len(seqs)) if seqs.has_teacher[i] and i not in picked][: n - len(picked)]
    return [seqs.row(i) for i in picked]


def long_rows(seqs: C.Sequences, length: int, n: int) -> list[dict]:
    """Rows of `length` tokens cut from the concatenated general rows (for lengths beyond the cache's).

    The teacher labels are the concatenated positions, so they are off by one position at row
    seams: irrelevant for timing, which is all these rows are for. Sequences hold the ids decoded
    and the probabilities and residual as stored codes: decoded here, as Sequences.row does.
    """
    gen = [i for i in range(len(seqs)) if seqs.corpus[i] == "general" and seqs.has_teacher[i]]
    a0, p0 = seqs.tok_off[gen[0]], seqs.pos_off[gen[0]]
    total = seqs.pos_off[gen[-1] + 1] - p0
    if n * length > total:
        raise ValueError(f"the cache's general rows hold {total} positions; {n} x {length} needed")
    out = []
    for j in range(n):
        a, p = a0 + j * length, p0 + j * length
        out.append({C.SEQ_ID: j, C.CORPUS: "general", C.SUBSET: "bench", C.INPUT_IDS: seqs.input_ids[a:a + length],
                    C.TOPK_IDS: seqs.teacher_topk_ids[p:p + length - 1],
                    C.TOPK_PROBS: C.decode_probs(seqs.teacher_topk_probs[p:p + length - 1]),
                    C.RESIDUAL: C.decode_residual(seqs.teacher_residual[p:p + length - 1])})
    return out


def reader_pass(cache_dir: Path, k: int, micro_batch: int, max_cache_bytes: int = 256 << 20, **checks) -> int:
    """The trainer's data path over the whole train split: one mol.cache.StreamingSequences per
    corpus, opened as train() opens them (index, same decoded row-group budget), the next
    micro-batch prefetched while this one is read, rows + collate. Returns tokens. `checks`:
    StreamingSequences' check_values / check_sha256 (both on unless turned off, as in training)."""
    from ..cache.stream import StreamingSequences

    cache = C.TeacherCache(cache_dir)
    cpu = torch.device("cpu")
    tokens = 0
    for corpus in ("domain", "general"):
        if not any(u.corpus == corpus for u in cache.units):
            continue
        seqs = StreamingSequences(cache, "train", corpus, max_cache_bytes=max_cache_bytes, **checks)
        try:
            n = len(seqs)
            for a in range(0, n, micro_batch):
                if a + micro_batch < n:
                    seqs.prefetch(range(a + micro_batch, min(a + 2 * micro_batch, n)))
                b = collate([seqs.row(i) for i in range(a, min(a + micro_batch, n))], k, cpu)
                tokens += int(b["attention_mask"].sum())
        finally:
            seqs.close()
    return tokens


def reader_pass_load(cache_dir: Path, k: int, micro_batch: int) -> int:
    """The same over TeacherCache.load (the whole split in memory; evaluation's path). Returns tokens."""
    seqs = C.TeacherCache(cache_dir).load("train")
    tokens = 0
    cpu = torch.device("cpu")
    for a in range(0, len(seqs), micro_batch):
        b = collate([seqs.row(i) for i in range(a, min(a + micro_batch, len(seqs)))], k, cpu)
        tokens += int(b["attention_mask"].sum())
    return tokens


@child_setup("stage2")
def _stage2_child(config: dict, model_path: str, cache_dir: str, n_rows: int, mode: str, steps: int = 2):
    cfg = load_config(data=config)
    cache = C.TeacherCache(cache_dir)
    rows = stage2_rows(cache.load("train"), n_rows)
    s2 = Stage2(cfg, Path(model_path), torch.device("cpu"), cache.k)
    opt = s2.optimizer()

    def run():
        # whole trainer steps, the optimizer included: its state is part of Stage 2's peak
        for _ in range(steps):
            s2.step(rows, mode)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def stage2_steps(s2: Stage2, train_seqs: C.Sequences, cache_dir: Path, sz: BenchSizes) -> dict:
    """One micro-step per loss mode (CE, MoL from the cache, MoL with the online teacher) and the
    trainer's reader over the whole train split (streaming, and TeacherCache.load), interleaved."""
    cfg, k = s2.cfg, s2.k
    mb = cfg.train.micro_batch
    rows = stage2_rows(train_seqs, mb)
    reader_tokens = []

    def reader():
        reader_tokens.append(reader_pass(cache_dir, k, mb, cfg.train.reader_cache_mb << 20))

    t2 = interleaved({"ce": lambda: s2.step(rows, "ce"), "mol": lambda: s2.step(rows, "mol"),
                      "online": lambda: s2.online_step(rows), "reader": reader,
                      "reader_load": lambda: reader_pass_load(cache_dir, k, mb)}, sz.reps, sz.warmup)
    step_tokens = sum(len(r[C.INPUT_IDS]) for r in rows)
    stage2 = {"micro_batch": mb, "seq_len": max(len(r[C.INPUT_IDS]) for r in rows), "tokens": step_tokens,
              "times": t2, "ratio_mol_ce": med(t2["mol"]) / med(t2["ce"]),
              "ratio_mol_online": med(t2["mol"]) / med(t2["online"]),
              "training_tokens_per_s": step_tokens / med(t2["mol"]),
              "reader_tokens": reader_tokens[-1], "reader_tokens_per_s": reader_tokens[-1] / med(t2["reader"]),
              "reader_load_tokens_per_s": reader_tokens[-1] / med(t2["reader_load"])}
    stage2["reader_over_training"] = stage2["reader_tokens_per_s"] / stage2["training_tokens_per_s"]
    log.info("stage 2: MoL/CE %.3f, MoL/online %.3f, reader/training %.0f", stage2["ratio_mol_ce"],
             stage2["ratio_mol_online"], stage2["reader_over_training"])
    return stage2


def stage2_step_ratio(s2: Stage2, train_seqs: C.Sequences, sz: BenchSizes) -> list[dict]:
    """MoL ÷ CE step time at batch 1 and each of sz.step_seq_lens (rows cut by long_rows)."""
    step_scaling = []
    for T in sz.step_seq_lens:
        lr_rows = long_rows(train_seqs, T, 1)
        t = interleaved({"ce": lambda: s2.step(lr_rows, "ce"), "mol": lambda: s2.step(lr_rows, "mol")},
                        sz.scale_reps, warmup=0)
        step_scaling.append({"batch": 1, "seq_len": T, "ce_s": med(t["ce"]), "mol_s": med(t["mol"]),
                             "ratio": med(t["mol"]) / med(t["ce"])})
        log.info("step B=1 T=%d: MoL/CE %.3f", T, step_scaling[-1]["ratio"])
    return step_scaling


def stage2_peak_memory(cfg: MolConfig, model_path: Path, cache_dir: Path, sz: BenchSizes) -> dict:
    """Peak RSS of whole trainer steps (the optimizer's state included), MoL and CE, each in a fresh child."""
    cfg_dict = config_to_dict(cfg)
    specs = [{"kind": "stage2", "args": {"config": cfg_dict, "model_path": str(model_path),
                                         "cache_dir": str(cache_dir), "n_rows": cfg.train.micro_batch, "mode": m}}
             for m in ("mol", "ce")]
    mem2 = run_children(specs, sz.parallel_children, sz.threads)
    return {"mol": mem2[0], "ce": mem2[1], "ratio": mem2[0]["peak_bytes"] / max(mem2[1]["peak_bytes"], 1)}
