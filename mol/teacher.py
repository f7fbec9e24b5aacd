"""Stage 1: run the frozen base model once and store its top-k soft labels in the cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import cache as C
from .config import ConfigError, MolConfig, dump_config
from .corpora import CorpusError, Segment, SegmentPacker, SourceReport, check_report, source_caps, source_segments
from .files import try_lock
from .model import load_model, load_tokenizer, pick_device, pick_dtype

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
MakeBar = Callable[[Optional[int], str], Progress]  # (total or None when unknown, description)


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


def config_vocab_size(model_path: Path, tokenizer) -> int:
    """Vocabulary size from the tokenizer and the model's config.json, without loading weights."""
    n = len(tokenizer)
    try:
        mc = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return n
    v = mc.get("vocab_size") or (mc.get("text_config") or {}).get("vocab_size")
    return max(n, v) if isinstance(v, int) else n


@torch.no_grad()
def measure_fidelity(model, unit: C.CacheUnit, n_sequences: int, chunk: int, device, temperature: float = 1.5) -> dict:
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


def _prepare(cfg: MolConfig):
    """Resolve the cache key (file hashes only) and check k against the vocabulary, before any packing."""
    from .model import resolve_model_path

    model_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    k = cfg.teacher.top_k
    # checked before hashing, packing or loading anything: the top-k must leave a residual bucket
    vocab = config_vocab_size(model_path, tokenizer)
    if k >= vocab:
        raise ConfigError([f"teacher.top_k = {k} must be < the model's vocabulary size {vocab}"])
    with _input_errors():
        rk = C.resolve_cache_key(cfg, tokenizer)
    return rk, tokenizer, vocab


def teacher_backend(cfg: MolConfig, model_path: Path, device, pad_id: int):
    """(transformers model or None, label(batch of token lists) -> [(ids, probs, residual)]). A vLLM
    labeller also has `vocab_size` (rows of its output projection) and `close()`."""
    k, chunk = cfg.teacher.top_k, cfg.teacher.chunk_positions
    if cfg.teacher.backend == "vllm":
        from .vllm_teacher import VllmTeacher

        return None, VllmTeacher(model_path, k, chunk, device=device, dtype=cfg.model.dtype,
                                 max_model_len=cfg.data.max_seq_len, engine_kwargs=cfg.teacher.vllm_kwargs)
    model = load_model(model_path, cfg.model, device=device).eval()
    return model, lambda batch: teacher_labels(model, batch, k, chunk, pad_id, device)


@contextmanager
def cache_lock(folder: Path, worker: int | None = None, shared: bool = False, what: str = "cache"):
    """One writer per folder: an exclusive lock refuses a second. Workers of a sharded pass take
    the folder's lock shared (so they exclude a single pass and a finalize, not each other) plus
    an exclusive lock of their own index."""
    folder.mkdir(parents=True, exist_ok=True)
    fds = []
    try:
        for name, share in ([(".lock", shared)] + ([(f".lock-worker-{worker:04d}", False)] if worker is not None else [])):
            try:
                fds.append(try_lock(folder / name, shared=share))
            except BlockingIOError:
                who = (f"another process as worker {worker}" if name != ".lock"
                       else "another teacher pass" if not shared else "a single (unsharded) pass or a finalize")
                raise C.CacheError(f"{folder}: {who} is writing this {what} (lock held)") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def residual_stats(codes: np.ndarray, limit: int = 64) -> dict:
    """One shard's residuals summarised for the manifest, from the stored codes (so the record is
    as deterministic as the shard). The fp16 counts say what schema 2 would have lost."""
    r = C.decode_residual(codes).astype(np.float64)
    pick = np.linspace(0, len(r) - 1, min(limit, len(r))).astype(np.int64) if len(r) else []
    return {"sum": float(r.sum()), "n": int(len(r)), "below_floor": int((codes == C.RESIDUAL_LEVELS).sum()),
            "fp16_zero": int((r.astype(np.float16) == 0).sum()),
            "fp16_subnormal": int(((r > 0) & (r < 2.0 ** -14)).sum()),
            "sample": [float(f"{v:.4g}") for v in r[pick]]}


@dataclass
class _Group:
    """rows_per_shard packed sequences and the packer's state right after the last of them."""

    seqs: list
    state: dict
    end: bool  # the segment's last group


def _produce(packer: SegmentPacker, rows: int, out: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: read, tokenize and pack one segment into groups of `rows` sequences.
    The last group (possibly empty) carries the final state (done = True)."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        it = iter(packer)
        group, nxt = [], next(it, None)
        while nxt is not None:
            group.append(nxt)
            state = packer.state() if len(group) == rows else None
            nxt = next(it, None)
            if state is not None and nxt is not None:
                if not put(_Group(group, state, False)):
                    return
                group = []
        put(_Group(group, packer.state(), True))
    except BaseException as e:  # handed to the consumer, which raises it
        put(e)


def _segment_progress(unit: C.ResolvedUnit, segment: int) -> tuple[int, dict | None]:
    """(next part to write, resume record of the part before it) from the shards on disk.

    Parts are renamed by parallel writer threads, so a kill can leave part p+1 without part p:
    the pass resumes after the contiguous prefix (and rewrites the same bytes after it). A shard
    whose resume record does not name this unit, segment and part, or whose rows contradict its
    record (row count, seq_ids, splits, counts: a record forged or copied from another shard), is
    refused, never trusted. The prefix ends at the part that ends the segment: a file after it is
    no part of the segment (the finalize refuses it)."""
    parts = sorted(p for p in (C.parse_shard_name(f.name) for f in unit.dir.glob(f"shard-{segment:05d}-*.parquet"))
                   if p is not None)
    nxt, last = 0, None
    for seg, part in parts:
        if part != nxt or (last is not None and last.get("end")):
            break
        path = unit.dir / C.shard_name(seg, part)
        rec = C.shard_resume(path)
        if not isinstance(rec, dict) or (rec.get("unit"), rec.get("segment"), rec.get("part")) != (unit.fingerprint, seg, part):
            said = (str(rec.get("unit"))[:16], rec.get("segment"), rec.get("part")) if isinstance(rec, dict) else None
            raise C.CacheError(f"{path}: not a shard this pass wrote for unit {unit.fingerprint[:16]} segment {seg} "
                               f"part {part} (its resume record says {said}); remove it and run again")
        first = seg * C.SEGMENT_STRIDE + part * unit.key["rows_per_shard"]
        problems = C.shard_record_problems(path, rec, first)
        if problems:
            raise C.CacheError(f"{path}: its rows contradict its resume record ({'; '.join(problems[:3])}); "
                               f"not resuming from it: remove it and run again")
        nxt, last = part + 1, rec
    return nxt, last


@dataclass
class _Labeller:
    """The teacher, loaded on first use: a pass whose units are all reused loads no model."""

    cfg: MolConfig
    model_path: Path
    device: torch.device
    pad_id: int
    vocab: int
    model: object = None
    label: object = None
    seconds: float = 0.0
    tokens: int = 0

    def probe_model(self, any_backend: bool):
        """The teacher as a transformers model, for the fidelity probe: the labelling model when it
        is one, else loaded once (a sharded vLLM pass's finalize: any_backend) or None."""
        if self.model is None and (any_backend or self.cfg.teacher.backend == "transformers"):
            self.model = load_model(self.model_path, self.cfg.model, device=self.device).eval()
            self.vocab = max(self.vocab, self.model.get_output_embeddings().weight.shape[0])
        return self.model

    @property
    def dtype(self) -> str:
        """The labelling model's compute dtype, for the manifest."""
        if self.cfg.teacher.backend == "vllm":
            from .vllm_teacher import engine_dtype

            return str(getattr(torch, engine_dtype(self.cfg.model.dtype, self.device.type == "cuda")))
        return str(pick_dtype(self.cfg.model.dtype, self.device))

    @property
    def defers_finalize(self) -> bool:
        """vLLM: every unit is labelled first, then the engine is shut down and a transformers model
        measures each unit's fidelity (the engine holds the device's memory; vLLM and an independent
        forward pass are never resident together)."""
        return self.cfg.teacher.backend == "vllm"

    def close(self) -> None:
        close = getattr(self.label, "close", None)
        if close is not None:
            close()
        self.label = None

    def __call__(self, batch: list[np.ndarray]):
        if self.label is None:
            self.model, self.label = teacher_backend(self.cfg, self.model_path, self.device, self.pad_id)
            if self.model is not None:
                self.vocab = max(self.vocab, self.model.get_output_embeddings().weight.shape[0])
            self.vocab = max(self.vocab, getattr(self.label, "vocab_size", 0))
            if self.cfg.teacher.top_k >= self.vocab:
                raise ConfigError([f"teacher.top_k = {self.cfg.teacher.top_k} must be < the model's vocabulary size {self.vocab}"])
        t0 = time.time()
        out = self.label(batch)
        self.seconds += time.time() - t0
        self.tokens += sum(len(s) for s in batch)
        return out


def _shard_data(group: _Group, unit: C.ResolvedUnit, segment: int, part: int, labels, vocab: int) -> C.ShardData:
    seqs = group.seqs
    lens = np.array([len(s.input_ids) for s in seqs], dtype=np.int64)
    tok_off = np.zeros(len(seqs) + 1, dtype=np.int64)
    tok_off[1:] = np.cumsum(lens)
    first = part * unit.key["rows_per_shard"]
    d = C.ShardData(
        seq_id=segment * C.SEGMENT_STRIDE + first + np.arange(len(seqs), dtype=np.int64),
        corpus=unit.source.corpus, subset=unit.source.subset, split=[s.split for s in seqs],
        input_ids=np.concatenate([s.input_ids for s in seqs]) if seqs else np.zeros(0, np.int32), tok_off=tok_off)
    counts = {sp: [int(sum(1 for s in seqs if s.split == sp)), int(sum(len(s.input_ids) for s in seqs if s.split == sp))]
              for sp in ("train", "val")}
    record = {"unit": unit.fingerprint, "segment": segment, "part": part, "rows": len(seqs), "end": group.end,
              "counts": counts, "val_rows": [j for j, s in enumerate(seqs) if s.split == "val"], "state": group.state}
    if labels is not None:
        ids = np.concatenate([x[0] for x in labels]) if labels else np.zeros((0, unit.key["top_k"]), np.int64)
        probs = np.concatenate([x[1] for x in labels]) if labels else np.zeros((0, unit.key["top_k"]), np.float32)
        resid = np.concatenate([x[2] for x in labels]) if labels else np.zeros(0, np.float32)
        d.topk_ids, d.topk_probs, d.residual = C.encode_labels(ids, probs, resid, vocab)
        record["residual"] = residual_stats(d.residual)
    d.metadata = {C.RESUME_KEY: json.dumps(record, separators=(",", ":")).encode()}
    return d


def _label_segment(cfg: MolConfig, unit: C.ResolvedUnit, segment: Segment, labeller: _Labeller, tokenizer,
                   writer_factory, bar) -> tuple[int, bool]:
    """Label one segment from its first missing shard. Returns (tokens labelled, resumed?)."""
    for p in unit.dir.glob(f"shard-{segment.index:05d}-*.parquet.tmp*"):  # a killed writer's leftovers
        p.unlink(missing_ok=True)
    part, last = _segment_progress(unit, segment.index)
    if last is not None and last.get("end"):
        return 0, True  # written by an earlier pass that stopped before the unit's manifest
    packer = SegmentPacker(unit.source, cfg.data, tokenizer, cfg.model.chat_template_kwargs, segment,
                           source_caps(unit.source, cfg.data), None if last is None else last["state"])
    groups: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(packer, cfg.teacher.rows_per_shard, groups, stop),
                                name="mol-packer", daemon=True)
    producer.start()
    writer = writer_factory()
    labelled, bs = 0, cfg.teacher.batch_size
    try:
        while True:
            g = groups.get()
            if isinstance(g, BaseException):
                raise g
            labels = None
            if unit.labelled:
                labels = []
                for b in range(0, len(g.seqs), bs):
                    labels += labeller([s.input_ids for s in g.seqs[b:b + bs]])
                labelled += sum(len(s.input_ids) for s in g.seqs)
            writer.submit(unit.dir / C.shard_name(segment.index, part), _shard_data(g, unit, segment.index, part, labels, labeller.vocab))
            bar(sum(len(s.input_ids) for s in g.seqs))
            part += 1
            if g.end:
                break
        writer.close()
    finally:
        stop.set()
        writer.close_quietly()
        producer.join()
    return labelled, last is not None


def _plan(cfg: MolConfig, rk: C.ResolvedKey) -> list[tuple[int, Segment]]:
    """Every (unit index, segment) of the config, in order: item j belongs to worker j % N."""
    items = []
    for i, u in enumerate(rk.units):
        with _input_errors():
            items += [(i, s) for s in source_segments(u.source, cfg.data)]
    return items


def _unit_items(plan: list[tuple[int, Segment]], i: int) -> tuple[list[Segment], int]:
    """Unit i's segments, and the plan index of its first (which worker owns which follows)."""
    return [s for j, s in plan if j == i], next(n for n, (j, _) in enumerate(plan) if j == i)


def _reuse_unit(u: C.ResolvedUnit) -> C.CacheUnit:
    """A complete unit (built here or copied from elsewhere) is used only once its checks pass."""
    unit = C.CacheUnit(u.dir, u.fingerprint)
    for name in ("model_fingerprint", "tokenizer_fingerprint", "top_k"):
        if unit.key[name] != u.key[name]:
            raise C.CacheError(f"unit {u.dir}: {name} {str(unit.key[name])[:12]} != this run's "
                               f"{str(u.key[name])[:12]}; it was built by another model or tokenizer: remove it")
    # checksums and footers, not every value: reusing a unit must not cost a decode of all of it, and
    # the reader checks each row group's values before they reach a step
    problems = unit.verify(contents=False)
    if problems:
        raise C.CacheError(f"unit {u.dir} failed verification; remove it to rebuild it:\n  " + "\n  ".join(problems))
    return unit


def run_teacher_pass(cfg: MolConfig, make_bar: Optional[MakeBar] = None) -> tuple[Path, str]:
    """Build (or resume, or reuse) every cache unit of `cfg`, then its set manifest. Returns
    (set folder, status) with status in {"built", "resumed", "reused", "up-to-date", "worker-done"}:
    "reused" when every unit already existed (nothing labelled).

    With teacher.num_workers = N > 1 this process labels only the (unit, segment) items j with
    j % N == teacher.worker_index and returns "worker-done"; `finalize_cache` checks that every
    segment is complete and writes the manifests. Segments and shards do not depend on N.
    """
    make_bar = make_bar or (lambda total, desc: (lambda n: None))
    t0 = time.time()
    device = pick_device(cfg.model.device)
    rk, tokenizer, vocab = _prepare(cfg)
    n_workers, me = cfg.teacher.num_workers, cfg.teacher.worker_index
    if (rk.cache_dir / C.MANIFEST).is_file():
        log.info("cache %s is complete for this config: nothing to do", rk.cache_dir)
        return rk.cache_dir, "up-to-date"
    sharded = n_workers > 1
    labeller = _Labeller(cfg, rk.model_path, device, tokenizer.pad_token_id, vocab)
    done = {i: (rk.units[i].dir / C.MANIFEST).is_file() for i in range(len(rk.units))}
    items = [(i, s) for j, (i, s) in enumerate(_plan(cfg, rk)) if j % n_workers == me and not done[i]]
    outcome = {i: {"status": "reused", "labelled_tokens": 0} for i in range(len(rk.units))}
    for i in range(len(rk.units)):
        if done[i]:
            _reuse_unit(rk.units[i])
            log.info("unit %s (%s/%s): reused", rk.units[i].name, rk.units[i].source.corpus, rk.units[i].source.subset)
    # streaming: the token total is unknown until the end, so the bar counts tokens and their rate
    bar = make_bar(None, "teacher pass" if not sharded else f"teacher pass, worker {me}/{n_workers}")
    k = cfg.teacher.top_k
    deferred: list[tuple[C.ResolvedUnit, dict]] = []

    def writer():
        return C.ShardWriter(k, labeller.vocab, cfg.teacher.zstd_level, cfg.teacher.writer_threads,
                             C.row_group_rows(cfg))

    with cache_lock(rk.cache_dir, me if sharded else None, shared=sharded):
        if me == 0:
            dump_config(cfg, rk.cache_dir / "config.yaml")
        for i, u in enumerate(rk.units):
            mine = [s for j, s in items if j == i]
            if not mine:
                continue
            with cache_lock(u.dir, me if sharded else None, shared=sharded, what="unit"):
                if (u.dir / C.MANIFEST).is_file():  # finished by another config's pass meanwhile
                    continue
                resumed, secs0, toks0, u0 = False, labeller.seconds, labeller.tokens, time.time()
                for seg in mine:
                    with _input_errors():
                        n, r = _label_segment(cfg, u, seg, labeller, tokenizer, writer, bar)
                    outcome[i]["labelled_tokens"] += n
                    resumed |= r
                outcome[i]["status"] = "resumed" if resumed else "built"
                stats = {"worker": me, "workers": n_workers, "forward_tokens": labeller.tokens - toks0,
                         "forward_seconds": labeller.seconds - secs0, "seconds": time.time() - u0,
                         "device": str(device), "host": platform.node()}
                if sharded:
                    C.write_atomic(u.dir / f"worker-{me:04d}.json", (json.dumps(stats) + "\n").encode())
                elif labeller.defers_finalize:
                    deferred.append((u, stats))
                else:
                    _finalize_unit(cfg, u, tokenizer, labeller, device, [stats])
            log.info("unit %s (%s/%s): %s, %d tokens labelled", u.name, u.source.corpus, u.source.subset,
                     outcome[i]["status"], outcome[i]["labelled_tokens"])
        if sharded:
            log.info("worker %d of %d done; when every worker is, run the finalize step "
                     "(python -m stages.teacher_cache CONFIG teacher.num_workers=%d --finalize)", me, n_workers, n_workers)
            return rk.cache_dir, "worker-done"
        labeller.close()
        for u, stats in deferred:
            with cache_lock(u.dir, what="unit"):
                if not (u.dir / C.MANIFEST).is_file():  # another config's pass may have finalized it meanwhile
                    _finalize_unit(cfg, u, tokenizer, labeller, device, [stats], finalizing=True)
        _write_set(cfg, rk, outcome, device, t0)
    statuses = {o["status"] for o in outcome.values()}
    status = "resumed" if "resumed" in statuses else "built" if "built" in statuses else "reused"
    return rk.cache_dir, status


def _unit_shards(u: C.ResolvedUnit, segments: list[Segment], n_workers: int, first_item: int) -> list[tuple[int, int, dict]]:
    """(segment, part, resume record) of every shard of a unit whose segments are all complete;
    a CacheError names each incomplete segment and the worker that owns it."""
    out, missing = [], []
    for j, seg in enumerate(segments):
        nxt, last = _segment_progress(u, seg.index)
        if last is None or not last.get("end"):
            missing.append(f"{C.UNITS_DIR}/{u.name} segment {seg.index}: {nxt} part(s) written, not finished "
                           f"(worker {(first_item + j) % n_workers})")
            continue
        out += [(seg.index, p, C.shard_resume(u.dir / C.shard_name(seg.index, p))) for p in range(nxt)]
    if missing:
        raise C.CacheError(f"{len(missing)} segment(s) unfinished with teacher.num_workers = {n_workers}: "
                           + "; ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
                           + "; run those workers (they resume)")
    return out


def _finalize_unit(cfg: MolConfig, u: C.ResolvedUnit, tokenizer, labeller: "_Labeller", device,
                   stats: list[dict], segments: list[Segment] | None = None, n_workers: int = 1,
                   first_item: int = 0, finalizing: bool = False) -> None:
    """Every segment of the unit is written: checksum, gather statistics, measure fidelity, write
    the dataset card, then the manifest last. `finalizing`: the finalize step of a sharded pass,
    which measures fidelity with a transformers model whatever the backend."""
    if segments is None:
        segments = source_segments(u.source, cfg.data)
    shards = _unit_shards(u, segments, n_workers, first_item)
    listed = {C.shard_name(seg, part) for seg, part, _ in shards}
    stray = sorted(p.name for p in u.dir.glob(C.SHARD_GLOB) if p.name not in listed)
    if stray:  # verify would refuse the unit for it on every later use: refuse it now, naming it
        raise C.CacheError(f"{u.dir / stray[0]}: a shard file that is no part of this unit's segments "
                           + (f"(and {len(stray) - 1} more: {', '.join(stray[1:6])}) " if len(stray) > 1 else "")
                           + "(left from another pass, or copied here); no manifest written: remove it and run again")
    report = None
    counts = {sp: {"sequences": 0, "tokens": 0} for sp in ("train", "val")}
    resid = {"sum": 0.0, "n": 0, "below_floor": 0, "fp16_zero": 0, "fp16_subnormal": 0}
    sample, meta = [], []
    for seg, part, rec in shards:
        path = u.dir / C.shard_name(seg, part)
        for sp, (rows, toks) in rec["counts"].items():
            counts[sp]["sequences"] += rows
            counts[sp]["tokens"] += toks
        if "residual" in rec:
            for f in resid:
                resid[f] += rec["residual"][f]
            sample += rec["residual"]["sample"]
        if rec["end"]:
            seg_report = SourceReport(**rec["state"]["report"])
            report = seg_report if report is None else report.merge(seg_report)
        meta.append(C.shard_entry(file=path.name, segment=seg, part=part, rows=rec["rows"],
                                  tokens=sum(c[1] for c in rec["counts"].values()), bytes=path.stat().st_size,
                                  sha256=C.sha256_path(path), rows_per_group=C.row_group_rows(cfg),
                                  val_rows=rec["val_rows"]))
    report.sha256 = u.key["source"]["sha256"]
    check_report(report, u.source)
    probe = (labeller.probe_model(any_backend=finalizing)
             if cfg.teacher.fidelity_sequences and u.labelled and counts["train"]["sequences"] else None)
    facts = dict(fingerprint=u.fingerprint, key=u.key, model_name=cfg.model.name, vocab_size=labeller.vocab,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                 source=dataclasses.asdict(report), segments=len(segments), counts=counts, shards=meta,
                 residual=resid, residual_sample=sample, device=str(device),
                 dtype=labeller.dtype,
                 host=platform.node(), torch_version=torch.__version__, worker_stats=stats)
    manifest = C.unit_manifest(**facts)
    # fidelity reads the shards; the manifest is written only after it, so "manifest exists" == complete
    if cfg.teacher.fidelity_sequences and u.labelled and counts["train"]["sequences"]:
        if probe is None:
            log.info("fidelity not measured: the %s backend holds no transformers model (the finalize step of a "
                     "sharded pass measures it with one)", cfg.teacher.backend)
        else:
            fidelity = measure_fidelity(probe, C.CacheUnit.from_manifest(u.dir, manifest, hashed=True),
                                        cfg.teacher.fidelity_sequences, cfg.teacher.chunk_positions, device)
            manifest = C.unit_manifest(**facts, fidelity=fidelity)
    C.write_card(u.dir, manifest)
    C.write_manifest(u.dir, manifest)
    for p in u.dir.glob("worker-*.json"):
        p.unlink(missing_ok=True)
    log.info("unit %s complete: %d sequences, %d tokens, %.1f bytes/token", u.name,
             manifest["totals"]["sequences"], manifest["totals"]["tokens"], manifest["totals"]["bytes_per_token"])


def _write_set(cfg: MolConfig, rk: C.ResolvedKey, outcome: dict, device, t0: float) -> None:
    """Every unit is complete: write the set manifest that names them (last)."""
    units = [C.CacheUnit(u.dir, u.fingerprint).manifest for u in rk.units]
    if not any(m["counts"]["train"]["sequences"] for m in units):
        raise CorpusError("the corpora gave no training sequences")
    manifest = C.set_manifest(fingerprint=rk.fingerprint, key=rk.key, model_name=cfg.model.name,
                              model_path=str(rk.model_path), units=units, unit_names=[u.name for u in rk.units],
                              this_pass=[outcome[i] for i in range(len(rk.units))], device=str(device),
                              this_pass_seconds=time.time() - t0)
    C.write_manifest(rk.cache_dir, manifest)
    totals = manifest["totals"]
    log.info("cache %s complete: %d units, %d sequences, %d tokens, %.1f bytes/token", rk.cache_dir, len(units),
             totals["sequences"], totals["tokens"], totals["bytes_per_token"])


def finalize_cache(cfg: MolConfig) -> tuple[Path, str]:
    """After sharded workers: check every segment of every unit is complete, then write each unit's
    manifest (checksums, fidelity) and the set manifest, last. Returns (set folder, "finalized" |
    "up-to-date"); a CacheError names each unfinished segment and the worker that owns it."""
    t0 = time.time()
    device = pick_device(cfg.model.device)
    rk, tokenizer, vocab = _prepare(cfg)
    if (rk.cache_dir / C.MANIFEST).is_file():
        return rk.cache_dir, "up-to-date"
    n_workers = cfg.teacher.num_workers
    labeller = _Labeller(cfg, rk.model_path, device, tokenizer.pad_token_id, vocab)
    plan = _plan(cfg, rk)
    with cache_lock(rk.cache_dir):
        pending = [u for u in rk.units if not (u.dir / C.MANIFEST).is_file()]
        problems = []
        for u in pending:  # every unit checked before any manifest is written
            segs, first = _unit_items(plan, rk.units.index(u))
            try:
                _unit_shards(u, segs, n_workers, first)
            except C.CacheError as e:
                problems.append(str(e))
        if problems:
            raise C.CacheError(f"{rk.cache_dir}: not every segment is written:\n  " + "\n  ".join(problems))
        outcome = {}
        for i, u in enumerate(rk.units):
            outcome[i] = {"status": "reused" if u not in pending else "built", "labelled_tokens": 0}
            if u not in pending:
                _reuse_unit(u)
                continue
            with cache_lock(u.dir, what="unit"):
                for p in u.dir.glob(C.MANIFEST + ".tmp*"):  # a killed finalize's
                    p.unlink(missing_ok=True)
                stats = [json.loads(p.read_text()) for p in sorted(u.dir.glob("worker-*.json"))]
                outcome[i]["labelled_tokens"] = sum(s["forward_tokens"] for s in stats)
                segs, first = _unit_items(plan, i)
                _finalize_unit(cfg, u, tokenizer, labeller, device, stats, segs, n_workers, first, finalizing=True)
        _write_set(cfg, rk, outcome, device, t0)
    return rk.cache_dir, "finalized"
