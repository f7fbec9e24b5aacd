"""Stage 1: run the frozen base model once and store its top-k soft labels in the cache."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from . import cache as C
from .config import ConfigError, MolConfig, dump_config
from .corpora import CorpusError, PackedSequence, pack_corpora
from .model import load_model, load_tokenizer, pick_device

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
MakeBar = Callable[[int, str], Progress]


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
    (tests/test_teacher_cache.py compares it with a float64 dense softmax).
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
def teacher_labels(model, batch: list[list[int]], k: int, chunk: int, pad_id: int, device: torch.device):
    """Label a batch of sequences: per sequence (ids [L-1, k], probs [L-1, k], residual [L-1]) numpy."""
    lens = [len(s) for s in batch]
    L = max(lens)
    x = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, s in enumerate(batch):
        x[i, : len(s)] = torch.tensor(s)
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


@contextmanager
def cache_lock(cache_dir: Path, worker: int | None = None):
    """One teacher pass per cache (or per worker of a sharded pass) at a time: a second is refused."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = ".lock" if worker is None else f".lock-worker-{worker:04d}"
    fd = os.open(cache_dir / name, os.O_CREAT | os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = "another teacher pass" if worker is None else f"another process as worker {worker}"
            raise C.CacheError(f"{cache_dir}: {who} is writing this cache (lock held)") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def _input_errors():
    """An input that cannot be opened (a folder where a file belongs, no read permission) is a bad
    input like any other: a CorpusError naming the file (the CLI's exit 2), not a traceback."""
    try:
        yield
    except FileNotFoundError:
        raise  # already worded by the callers, with the source it belongs to
    except OSError as e:
        if e.filename is None:
            raise
        raise CorpusError(f"{e.filename}: cannot read ({e.strerror})") from None


def _config_vocab_size(model_path: Path, tokenizer) -> int:
    """Vocabulary size from the tokenizer and the model's config.json, without loading weights."""
    n = len(tokenizer)
    try:
        mc = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return n
    v = mc.get("vocab_size") or (mc.get("text_config") or {}).get("vocab_size")
    return max(n, v) if isinstance(v, int) else n


def _shard_rows(seqs: list[PackedSequence], rows_per_shard: int):
    for s in range(0, len(seqs), rows_per_shard):
        yield s // rows_per_shard, s, seqs[s:s + rows_per_shard]


def _residual_sample(resid: np.ndarray, limit: int = 4096) -> np.ndarray:
    if len(resid) <= limit:
        return resid
    return resid[np.linspace(0, len(resid) - 1, limit).astype(np.int64)]


@torch.no_grad()
def measure_fidelity(model, cache: C.TeacherCache, n_sequences: int, chunk: int, device, temperature: float = 1.5) -> dict:
    """Re-run the teacher on a few cached sequences and compare the KL the cache gives with the exact one.

    Probe student: the teacher's own logits at `temperature` (a drifted, fully known student).
    - kl_quantisation: mean |KL_trunc(cached, quantised labels) - KL_trunc(exact fp32 labels, same ids)|
    - kl_truncation:   mean |KL_trunc(cached labels) - KL_dense(full vocabulary)|
    All references in float64.
    """
    from .losses import truncated_reverse_kl

    seqs = cache.load("train", corpus="general")
    if not seqs.has_teacher.any():
        return {}
    rows = [seqs.row(i) for i in range(len(seqs)) if seqs.has_teacher[i]][:n_sequences]
    w = model.get_output_embeddings().weight.double()
    quant, trunc, dense_all, id_match, n_pos = [], [], [], 0, 0
    for r in rows:
        x = torch.as_tensor(r[C.INPUT_IDS], device=device)[None]
        h = final_hidden(model, x)[0, :-1].double()
        for a in range(0, h.shape[0], chunk):
            t_logits = h[a:a + chunk] @ w.T
            s_logits = t_logits / temperature
            ids = torch.as_tensor(r[C.TOPK_IDS][a:a + chunk].astype(np.int64), device=device)
            probs_c = torch.as_tensor(r[C.TOPK_PROBS][a:a + chunk].astype(np.float64), device=device)
            resid_c = torch.as_tensor(r[C.RESIDUAL][a:a + chunk].astype(np.float64), device=device)
            t_logp = torch.log_softmax(t_logits, -1)
            probs_x = t_logp.gather(-1, ids).exp()
            resid_x = (1 - probs_x.sum(-1)).clamp_min(0)
            exact_ids = torch.topk(t_logits, ids.shape[1], dim=-1).indices
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


def _prepare(cfg: MolConfig):
    """Resolve the cache key (file hashes only) and check k against the vocabulary, before any packing."""
    from .model import resolve_model_path

    model_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    k = cfg.teacher.top_k
    # checked before hashing, packing or loading anything: the top-k must leave a residual bucket
    vocab = _config_vocab_size(model_path, tokenizer)
    if k >= vocab:
        raise ConfigError([f"teacher.top_k = {k} must be < the model's vocabulary size {vocab}"])
    with _input_errors():
        rk = C.resolve_cache_key(cfg, tokenizer)
    return rk, tokenizer, vocab


def _teacher_backend(cfg: MolConfig, model_path: Path, device, pad_id: int):
    """(transformers model or None, label(batch of token lists) -> [(ids, probs, residual)])."""
    k, chunk = cfg.teacher.top_k, cfg.teacher.chunk_positions
    if cfg.teacher.backend == "vllm":
        from .vllm_teacher import VllmTeacher

        engine = VllmTeacher(model_path, k, cfg.model.dtype, cfg.teacher.vllm_kwargs)
        return None, engine.labels
    model = load_model(model_path, cfg.model, device=device).eval()
    return model, lambda batch: teacher_labels(model, batch, k, chunk, pad_id, device)


def _worker_stats_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"worker-{index:04d}.json"


def run_teacher_pass(cfg: MolConfig, make_bar: Optional[MakeBar] = None) -> tuple[Path, str]:
    """Build (or resume, or reuse) the cache for `cfg`. Returns (cache_dir, status) with status in
    {"built", "resumed", "up-to-date", "worker-done"}.

    With teacher.num_workers = N > 1 this process writes only the shards i with i % N ==
    teacher.worker_index (disjoint across workers, each under its own lock), and returns
    "worker-done" without a manifest: `finalize_cache` checks that every shard exists and writes it.
    Shard boundaries and batches do not depend on N, so the shards are those a single worker writes.
    """
    make_bar = make_bar or (lambda total, desc: (lambda n: None))
    t0 = time.time()
    device = pick_device(cfg.model.device)
    rk, tokenizer, vocab = _prepare(cfg)
    k = cfg.teacher.top_k
    n_workers, me = cfg.teacher.num_workers, cfg.teacher.worker_index
    cache_dir = rk.cache_dir
    if (cache_dir / C.MANIFEST).is_file():
        log.info("cache %s is complete for this config: nothing to do", cache_dir)
        return cache_dir, "up-to-date"

    with cache_lock(cache_dir, None if n_workers == 1 else me):
        with _input_errors():
            seqs, reports = pack_corpora(cfg.data, tokenizer, cfg.model.chat_template_kwargs)
        shards = list(_shard_rows(seqs, cfg.teacher.rows_per_shard))
        mine = [sh for sh in shards if sh[0] % n_workers == me]
        # a killed writer's leftovers (never visible under a final name); a worker of a sharded pass
        # removes only its own, since the others may be writing theirs right now
        if n_workers == 1:
            stale = list(cache_dir.glob("*.tmp*"))
        else:
            stale = [p for idx, _, _ in mine for p in cache_dir.glob(C.SHARD_PATTERN.format(idx) + ".tmp*")]
            stale += list(cache_dir.glob(_worker_stats_path(cache_dir, me).name + ".tmp*"))
        for p in stale:
            p.unlink(missing_ok=True)
        model, label = _teacher_backend(cfg, rk.model_path, device, tokenizer.pad_token_id)
        if model is not None:
            vocab = max(vocab, model.get_output_embeddings().weight.shape[0])
        if k >= vocab:
            raise ConfigError([f"teacher.top_k = {k} must be < the model's vocabulary size {vocab}"])
        schema = C.arrow_schema(k, vocab)
        if me == 0:
            dump_config(cfg, cache_dir / "config.yaml")
        existing = [i for i, _, _ in mine if (cache_dir / C.SHARD_PATTERN.format(i)).is_file()]
        status = "resumed" if existing else "built"
        if existing:
            log.info("resuming: %d of %d shards already written", len(existing), len(mine))
        if n_workers > 1:
            log.info("worker %d of %d: %d of %d shards", me, n_workers, len(mine), len(shards))
        total_tokens = sum(len(s.input_ids) for _, _, rows in mine for s in rows)
        done_tokens = sum(len(s.input_ids) for i, _, rows in mine if i in existing for s in rows)
        bar = make_bar(total_tokens, "teacher pass" if n_workers == 1 else f"teacher pass, worker {me}/{n_workers}")
        bar(done_tokens)
        t_fwd, fwd_tokens = 0.0, 0
        for idx, start, rows in mine:
            path = cache_dir / C.SHARD_PATTERN.format(idx)
            if path.is_file():
                continue
            out_rows: list[dict] = []
            for b in range(0, len(rows), cfg.teacher.batch_size):
                batch = rows[b:b + cfg.teacher.batch_size]
                need = [s for s in batch if s.corpus == "general" or cfg.teacher.label_domain]
                tb = time.time()
                labels = iter(label([s.input_ids for s in need])) if need else iter(())
                t_fwd += time.time() - tb
                fwd_tokens += sum(len(s.input_ids) for s in need)
                for j, s in enumerate(batch):
                    row = {C.SEQ_ID: start + b + j, C.CORPUS: s.corpus, C.SUBSET: s.subset, C.SPLIT: s.split,
                           C.INPUT_IDS: s.input_ids}
                    if s.corpus == "general" or cfg.teacher.label_domain:
                        ids, probs, resid = next(labels)
                        row[C.TOPK_IDS], row[C.TOPK_PROBS], row[C.RESIDUAL] = C.encode_labels(ids, probs, resid, vocab)
                    out_rows.append(row)
                    bar(len(s.input_ids))
            C.write_shard(path, C.rows_to_table(out_rows, schema), cfg.teacher.zstd_level)
        stats = {"worker": me, "workers": n_workers, "forward_tokens": fwd_tokens, "forward_seconds": t_fwd,
                 "seconds": time.time() - t0, "device": str(device), "host": platform.node()}
        if n_workers > 1:
            C.write_atomic(_worker_stats_path(cache_dir, me), (json.dumps(stats) + "\n").encode())
            log.info("worker %d of %d done; when every worker is, run the finalize step "
                     "(python -m stages.teacher_cache CONFIG --finalize)", me, n_workers)
            return cache_dir, "worker-done"
        _finalize(cfg, rk, tokenizer, seqs, reports, shards, model, device, vocab, [stats], t0)
    return cache_dir, status


def finalize_cache(cfg: MolConfig) -> tuple[Path, str]:
    """After sharded workers: check every shard exists, then checksum, measure fidelity and write
    the manifest (last). Returns (cache_dir, "finalized" | "up-to-date"); a CacheError names each
    missing shard and the worker that owns it."""
    t0 = time.time()
    device = pick_device(cfg.model.device)
    rk, tokenizer, vocab = _prepare(cfg)
    cache_dir = rk.cache_dir
    if (cache_dir / C.MANIFEST).is_file():
        return cache_dir, "up-to-date"
    with cache_lock(cache_dir):
        with _input_errors():
            seqs, reports = pack_corpora(cfg.data, tokenizer, cfg.model.chat_template_kwargs)
        shards = list(_shard_rows(seqs, cfg.teacher.rows_per_shard))
        n_workers = cfg.teacher.num_workers
        missing = [i for i, _, _ in shards if not (cache_dir / C.SHARD_PATTERN.format(i)).is_file()]
        if missing:
            names = ", ".join(f"{C.SHARD_PATTERN.format(i)} (worker {i % n_workers})" for i in missing[:20])
            raise C.CacheError(f"{cache_dir}: {len(missing)} of {len(shards)} shards missing, with "
                               f"teacher.num_workers = {n_workers}: {names}"
                               + (" ..." if len(missing) > 20 else "") + "; run those workers (they resume)")
        for p in cache_dir.glob(C.MANIFEST + ".tmp*"):  # a killed finalize's
            p.unlink(missing_ok=True)
        stats = [json.loads(p.read_text()) for p in sorted(cache_dir.glob("worker-*.json"))]
        model = None
        if cfg.teacher.fidelity_sequences:
            model = load_model(rk.model_path, cfg.model, device=device).eval()
            vocab = max(vocab, model.get_output_embeddings().weight.shape[0])
        _finalize(cfg, rk, tokenizer, seqs, reports, shards, model, device, vocab, stats, t0)
    return cache_dir, "finalized"


def _finalize(cfg, rk, tokenizer, seqs, reports, shards, model, device, vocab, stats: list[dict], t0: float) -> None:
    """Every shard exists: checksum, gather statistics, measure fidelity, then write the manifest last."""
    cache_dir = rk.cache_dir
    shard_meta, resid_sample, resid_sum, resid_n = [], [], 0.0, 0
    counts: dict = {}
    for idx, start, rows in shards:
        path = cache_dir / C.SHARD_PATTERN.format(idx)
        t = pq.read_table(path, columns=[C.RESIDUAL])
        r = t.column(C.RESIDUAL).combine_chunks().flatten().to_numpy()
        resid_sum += float(r.astype(np.float64).sum())
        resid_n += len(r)
        resid_sample.append(_residual_sample(r, 512))
        shard_meta.append({"file": path.name, "rows": len(rows), "tokens": sum(len(s.input_ids) for s in rows),
                           "bytes": path.stat().st_size, "sha256": C.sha256_path(path),
                           "seq_id_range": [start, start + len(rows) - 1]})
        for s in rows:
            c = counts.setdefault(f"{s.corpus}/{s.subset}/{s.split}", {"sequences": 0, "tokens": 0})
            c["sequences"] += 1
            c["tokens"] += len(s.input_ids)
    rs = np.concatenate(resid_sample) if resid_sample else np.zeros(1)
    total_tokens = sum(len(s.input_ids) for s in seqs)
    total_bytes = sum(s["bytes"] for s in shard_meta)
    fwd_tokens = sum(s.get("forward_tokens", 0) for s in stats)
    fwd_seconds = sum(s.get("forward_seconds", 0.0) for s in stats)
    manifest = {
        "schema_version": C.SCHEMA_VERSION,
        "fingerprint": rk.fingerprint,
        "key": rk.key,
        "model": {"name": cfg.model.name, "path": str(rk.model_path), "vocab_size": vocab},
        "tokenizer": {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        "sources": [r.__dict__ for r in reports],
        "counts": counts,
        "totals": {"sequences": len(seqs), "tokens": total_tokens, "bytes": total_bytes,
                   "bytes_per_token": total_bytes / max(total_tokens, 1)},
        "residual": {"mean": resid_sum / max(resid_n, 1), "median": float(np.median(rs)),
                     "p90": float(np.quantile(rs, 0.9)), "p99": float(np.quantile(rs, 0.99)),
                     "max_sampled": float(rs.max()), "positions": resid_n},
        "shards": shard_meta,
        "run": {"device": str(device), "dtype": str(next(model.parameters()).dtype) if model is not None else None,
                "host": platform.node(), "torch": torch.__version__, "workers": len(stats) or 1,
                # per worker process: the figure one process reaches, comparable across worker counts
                "teacher_tokens_per_s": fwd_tokens / fwd_seconds if fwd_seconds else None,
                "forward_tokens": fwd_tokens, "seconds": None},
    }
    # fidelity reads the shards; the manifest is written only after it, so "manifest exists" == complete
    if cfg.teacher.fidelity_sequences and model is None:
        log.info("fidelity not measured: the %s backend holds no transformers model (the finalize step of a "
                 "sharded pass measures it with one)", cfg.teacher.backend)
    if cfg.teacher.fidelity_sequences and model is not None:
        view = C.TeacherCache.__new__(C.TeacherCache)
        view.path, view.manifest = cache_dir, manifest
        manifest["fidelity"] = measure_fidelity(model, view, cfg.teacher.fidelity_sequences,
                                                cfg.teacher.chunk_positions, device)
    manifest["run"]["seconds"] = time.time() - t0
    C.write_manifest(cache_dir, manifest)
    log.info("cache %s complete: %d sequences, %d tokens, %.1f bytes/token", cache_dir,
             len(seqs), total_tokens, manifest["totals"]["bytes_per_token"])
