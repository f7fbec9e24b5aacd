"""Benchmarks: every cost of the pipeline as a ratio against its floor, measured in one run.

Absolute timings mean little on a shared machine, so every timed figure is a ratio of variants
run in the same process, interleaved round by round (the order rotates each round so drift hits
every variant alike), median against median. Peak memory is measured per variant in a fresh
child process: the kernel's RSS high-water mark is reset right before the work (so imports and
model loading never count), and the figure is ``ru_maxrss`` after the work minus the RSS before.

One figure is absolute by design: the whole Stage 1 pipeline's tokens/s with an instant stub
teacher (:func:`stage1_pipeline`), the rate Stage 1 must sustain to keep up with a GPU teacher.
Its report says how busy the machine was meanwhile (other processes' cores, from /proc/stat) and
where the CPU went per thread, so a slow run on a shared machine can be told from a slow pipeline.

:func:`run_all` runs everything and returns one JSON-able dict; ``stages/bench.py`` prints it and
writes ``bench.json`` and ``bench.md``. Children run :func:`_child_entry` (see :func:`run_children`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.checkpoint import checkpoint

from . import cache as C
from .batching import collate, loss_weights, micro_batch_loss, model_hidden, output_weight
from .config import MolConfig, config_to_dict, load_config
from .losses import _per_sequence, chunked_mol_loss, dense_reference_loss, mol_weights, truncated_reverse_kl

log = logging.getLogger(__name__)

PROBE_TEMPERATURE = 1.5


# --------------------------------------------------------------------------- sizes


@dataclass
class BenchSizes:
    """What each measurement runs on. Batch shapes of Stage 1/2 come from the config."""

    reps: int = 4
    """Timed rounds per interleaved comparison (after `warmup` untimed ones)."""
    warmup: int = 1
    scale_reps: int = 2
    """Rounds per point of the scaling tables (already warm)."""
    storage_sequences: int = 16
    """Real sequences labelled for the storage study (half domain, half general where possible)."""
    loss_tokens: int = 8192
    loss_vocab: int = 151936
    loss_hidden: int = 128
    loss_seq_len: int = 1024
    """Sequence length of the synthetic loss-path batches (tokens = batch x this)."""
    scale_seq_lens: tuple = (128, 256, 512, 1024)
    scale_batch: int = 4
    scale_seq_vocab: int = 49152
    """Vocabulary of the sequence-length sweep (the default model's)."""
    scale_vocabs: tuple = (32768, 65536, 151936)
    scale_vocab_seq_len: int = 256
    step_seq_lens: tuple = (128, 256, 512, 1024)
    """Real-model MoL/CE step ratio at batch 1 and these lengths."""
    memory_fraction: float = 0.55
    """A naive-loss child runs only when its predicted peak is below this share of MemAvailable."""
    parallel_children: int = 1
    pipeline_tokens: int = 2_000_000
    """Tokens of the synthetic corpus the whole Stage 1 runs over with a stub teacher."""
    rss_tokens: int = 500_000
    """Stage 1 peak memory: the stub pass over this many tokens and over 10x as many."""
    pipeline_seq_len: int = 2048
    pipeline_rows_per_shard: int = 64
    zstd_levels: tuple = (1, 3, 5, 6, 7, 9, 12, 19)
    """Levels of the zstd table (the config's own level is added when missing)."""
    threads: Optional[int] = None
    """torch threads in the children (run_all sets it to the parent's)."""
    quick: bool = False


FULL = BenchSizes()
# quick: the headline point doubles as a scaling point, so 6 loss children in all
QUICK = BenchSizes(reps=2, warmup=1, scale_reps=1, storage_sequences=2, loss_tokens=32, loss_vocab=8192,
                   loss_hidden=64, loss_seq_len=32, scale_seq_lens=(32, 64), scale_batch=1, scale_seq_vocab=4096,
                   scale_vocabs=(4096, 8192), scale_vocab_seq_len=32, step_seq_lens=(16, 32),
                   parallel_children=2, pipeline_tokens=20_000, rss_tokens=3_000, quick=True)


def quick_config(cfg: MolConfig, cache_root: Path) -> MolConfig:
    """Tiny sizes for --quick: short sequences, a few records, a private cache folder."""
    d = config_to_dict(cfg)
    d["data"]["max_seq_len"] = 32
    d["data"]["max_train_sequences"] = 4
    d["data"]["max_val_sequences"] = 1
    for s in d["data"]["sources"]:
        s["max_records"] = 40
        s["max_train_sequences"] = 4
        s["max_val_sequences"] = 1
    d["teacher"].update(batch_size=2, rows_per_shard=8, fidelity_sequences=1, cache_root=str(cache_root))
    d["train"]["micro_batch"] = 2
    d["train"]["global_batch"] = 2
    d["train"]["loss_chunk"] = 32
    return load_config(data=d)


# --------------------------------------------------------------------------- timing and memory primitives


def interleaved(tasks: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every task once per round for warmup + reps rounds; wall seconds of the timed rounds.

    A task may return a dict of its own sub-timings (seconds); they are kept as "name/key".
    """
    names = list(tasks)
    out: dict[str, list[float]] = defaultdict(list)
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            res = tasks[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                out[name].append(dt)
                if isinstance(res, dict):
                    for key, v in res.items():
                        out[f"{name}/{key}"].append(float(v))
    return dict(out)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _status_bytes(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    return _maxrss_bytes() if rss is None else rss


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux reports KiB


def _reset_peak() -> bool:
    # Linux >= 4.0: "5" resets the mm's RSS high-water mark, which ru_maxrss reads, so the peak
    # that follows belongs to the measured work and not to imports or model loading.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def measure_peak(work: Callable[[], Any]) -> dict:
    """The work's own peak RSS: the high-water mark after it minus the RSS right before it.

    The high-water mark is ru_maxrss, except that a child started by fork/vfork + exec inherits
    in ru_maxrss the RSS its parent had at the fork (the kernel folds the old mm's peak into the
    signal struct at exec), which the reset cannot clear; the mm's own mark, VmHWM, is what the
    reset clears, so it is used whenever the reset worked.
    """
    gc.collect()
    reset = _reset_peak()
    before = _rss_bytes()
    t0 = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - t0
    ru = _maxrss_bytes()
    hwm = _status_bytes("VmHWM")
    peak = hwm if reset and hwm is not None else ru
    out = {"peak_bytes": max(peak - before, 0), "rss_before_bytes": before, "high_water_bytes": peak,
           "ru_maxrss_bytes": ru, "peak_reset": reset, "seconds": seconds}
    if result is not None:  # what the work reports about itself (a JSON-able dict)
        out["result"] = result
    return out


def _child_entry(spec: dict, conn) -> None:
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        work = _CHILD_SETUPS[spec["kind"]](**spec["args"])
        conn.send(("ok", measure_peak(work)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _context():
    # forkserver: every child is forked from a server that has only imported these modules and
    # never run a torch op (so no OpenMP pool exists at the fork), which makes a child fresh, with
    # its own peak, for a few ms instead of the seconds that importing torch/transformers takes
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mol.bench", "mol.train", "transformers", "peft"])
    return ctx


def run_children(specs: list[dict], parallel: int = 1, threads: Optional[int] = None,
                 timeout: float = 900) -> list[dict]:
    """Run each spec ({"kind", "args"}) in its own fresh process; measure_peak results in order."""
    ctx = _context()

    def one(spec):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_entry, args=({**spec, "threads": threads}, send), daemon=True)
        proc.start()
        send.close()
        try:
            if not recv.poll(timeout):
                proc.kill()
                raise RuntimeError(f"benchmark child {spec['kind']} {spec['args']}: no result in {timeout:.0f} s")
            status, payload = recv.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"benchmark child {spec['kind']} {spec['args']} died (exit code {proc.exitcode}; "
                               f"killed for memory?)") from None
        finally:
            recv.close()
        proc.join()
        if status != "ok":
            raise RuntimeError(f"benchmark child {spec['kind']} {spec['args']} failed:\n{payload}")
        return payload

    if parallel > 1:
        with ThreadPoolExecutor(parallel) as ex:
            return list(ex.map(one, specs))
    return [one(x) for x in specs]


# --------------------------------------------------------------------------- the loss path (synthetic)


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
    teacher = (inp[C.TOPK_IDS], inp[C.TOPK_PROBS], inp[C.RESIDUAL])

    def run():
        h = inp["hidden"].detach().requires_grad_(True)
        if variant == "chunked":
            out = chunked_mol_loss(h, inp["weight"], inp["target_ids"], inp["mask"], *teacher, w_ce, w_kl,
                                   chunk_size=chunk)
        elif variant == "naive":
            out = dense_reference_loss(h @ inp["weight"].t(), inp["target_ids"], inp["mask"], *teacher, w_ce, w_kl)
        else:
            raise ValueError(variant)
        out.loss_sum.backward()

    return run


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


# --------------------------------------------------------------------------- Stage 2 steps (real model)


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
    return _per_sequence(torch.cat(ce_parts), torch.cat(kl_parts), seq_index, mask.sum(dim=1), w_ce, w_kl)


class Stage2:
    """The trainer's student (build_student: LoRA, train mode) and its micro-step, per loss mode."""

    def __init__(self, cfg: MolConfig, model_path: Path, device: torch.device, k: int):
        from .train import build_student

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


def reader_pass(cache_dir: Path, k: int, micro_batch: int, max_cache_bytes: int = 256 << 20) -> int:
    """The trainer's data path over the whole train split: one mol.reader.StreamingSequences per
    corpus, opened as train() opens them (index, same decoded row-group budget), the next
    micro-batch prefetched while this one is read, rows + collate. Returns tokens."""
    from .reader import StreamingSequences

    cache = C.TeacherCache(cache_dir)
    cpu = torch.device("cpu")
    tokens = 0
    for corpus in ("domain", "general"):
        if not any(u.corpus == corpus for u in cache.units):
            continue
        seqs = StreamingSequences(cache, "train", corpus, max_cache_bytes=max_cache_bytes)
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


# --------------------------------------------------------------------------- Stage 1 (real model)


def shard_data(rows: list[dict], labels: Optional[list[tuple]], vocab: int, *, subset: Optional[str] = None,
               record: Optional[dict] = None) -> C.ShardData:
    """Cache rows + exact labels (ids, probs, residual per row, as the teacher gives them) -> the
    ShardData Stage 1 builds for them: C.encode_labels's codes, and, given a resume `record`, the
    residual summary and the Parquet metadata the pass writes with each shard."""
    tok_off = np.zeros(len(rows) + 1, dtype=np.int64)
    tok_off[1:] = np.cumsum([len(r[C.INPUT_IDS]) for r in rows])
    d = C.ShardData(seq_id=np.array([r[C.SEQ_ID] for r in rows], dtype=np.int64), corpus=rows[0][C.CORPUS],
                    subset=subset or rows[0][C.SUBSET], split=["train"] * len(rows),
                    input_ids=np.concatenate([np.asarray(r[C.INPUT_IDS]) for r in rows]), tok_off=tok_off)
    if labels is not None:
        d.topk_ids, d.topk_probs, d.residual = C.encode_labels(np.concatenate([x[0] for x in labels]),
                                                               np.concatenate([x[1] for x in labels]),
                                                               np.concatenate([x[2] for x in labels]), vocab)
    if record is not None:
        from .teacher import _residual_stats

        if labels is not None:
            record = {**record, "residual": _residual_stats(d.residual)}
        d.metadata = {C.RESUME_KEY: json.dumps(record, separators=(",", ":")).encode()}
    return d


def write_table(d: C.ShardData, path: Path, k: int, vocab: int, zstd_level: int,
                row_group_rows: Optional[int] = None) -> None:
    """What a writer thread does with one shard: build the Arrow table, then compress, write, fsync, rename."""
    C.write_shard(path, C.shard_table(d, k, vocab), zstd_level, row_group_rows=row_group_rows)


def bench_stage1(model, tokenizer, rows: list[dict], k: int, chunk: int, zstd_level: int, vocab: int,
                 workdir: Path, sz: BenchSizes, writer_threads: int = 2, row_group_rows: Optional[int] = None) -> dict:
    """Stage 1's per-shard work against a bare forward pass of the same batch.

    Stage 1 side, as the pass runs it: teacher_labels, then C.encode_labels + C.ShardData (+ the
    resume record) on the main thread, then the shard handed to a C.ShardWriter that builds the
    table, compresses and writes it on its own threads while the next batch is labelled. The
    write itself is also timed alone (same data, one thread) to show what it would add in series.
    """
    from .teacher import teacher_labels

    device = next(model.parameters()).device
    seqs = [np.asarray(r[C.INPUT_IDS]) for r in rows]
    x = torch.as_tensor(np.stack(seqs).astype(np.int64), device=device)
    writer = C.ShardWriter(k, vocab, zstd_level, writer_threads, row_group_rows)
    part, last = [0], {}

    @torch.no_grad()
    def bare():
        model(input_ids=x).logits

    def stage1():
        t0 = time.perf_counter()
        labels = teacher_labels(model, seqs, k, chunk, tokenizer.pad_token_id, device)
        t1 = time.perf_counter()
        d = shard_data(rows, labels, vocab, record={"unit": "bench", "segment": 0, "part": part[0],
                                                    "rows": len(rows), "end": False})
        t2 = time.perf_counter()
        writer.submit(workdir / C.shard_name(0, part[0]), d)
        part[0] += 1
        last["data"] = d
        return {"labels": t1 - t0, "encode": t2 - t1, "submit": time.perf_counter() - t2}

    try:
        t = interleaved({"bare": bare, "stage1": stage1}, sz.reps, sz.warmup)
        writer.close()
    finally:
        writer.close_quietly()
    write_s = []
    for i in range(max(sz.reps, 3)):
        path = workdir / f"stage1-write-{i}.parquet"
        t0 = time.perf_counter()
        write_table(last["data"], path, k, vocab, zstd_level, row_group_rows)
        write_s.append(time.perf_counter() - t0)
    for p in list(workdir.glob("shard-00000-*.parquet")) + list(workdir.glob("stage1-write-*.parquet")):
        p.unlink()
    tokens = int(x.numel())
    out = {"batch": x.shape[0], "seq_len": x.shape[1], "tokens": tokens, "times": t, "write_s": write_s,
           "writer_threads": writer_threads, "zstd_level": zstd_level,
           "bare_tokens_per_s": tokens / med(t["bare"]), "stage1_tokens_per_s": tokens / med(t["stage1"]),
           "labels_tokens_per_s": tokens / med(t["stage1/labels"]),
           "ratio": med(t["bare"]) / med(t["stage1"]), "ratio_labels_only": med(t["bare"]) / med(t["stage1/labels"]),
           "ratio_serial_write": med(t["bare"]) / (med(t["stage1"]) + med(write_s)),
           "encode_share": med(t["stage1/encode"]) / med(t["stage1"]),
           "write_share_if_serial": med(write_s) / (med(t["stage1"]) + med(write_s))}
    return out


# --------------------------------------------------------------------------- Stage 1 at scale (stub teacher)


def synthetic_corpus(path: Path, tokens: int, tokenizer, seed: int = 0) -> int:
    """mol.synthetic.write_corpus at about `tokens` tokens of this tokenizer (EOS included):
    write_corpus sizes by words, so its words-to-tokens rate is measured on a 50k-token sample
    first. Returns the records written."""
    from .synthetic import write_corpus

    with tempfile.TemporaryDirectory(prefix="mol-bench-synth-") as tmp:
        sample = write_corpus(Path(tmp) / "sample.jsonl", 50_000, seed=seed)
        texts = [json.loads(line)["text"] for line in sample.read_text().splitlines()]
    got = sum(len(x) + 1 for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    write_corpus(path, max(1, round(tokens * 50_000 / got)), seed=seed)
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def stub_labels(cache: C.TeacherCache) -> dict:
    """A pool of real labels for the stub teacher: every labelled position of the cache (the real
    model's labels), decoded, most probable first as the teacher gives them (ids int64 [P, k],
    probs fp32 [P, k], residual fp32 [P]).

    The default cache holds ~30k positions, more than one Parquet page of a 31-wide column holds
    (~17k positions a 1 MiB page): zstd, which compresses page by page, never sees the pool repeat
    within a page, so the stub's shards compress (size and speed) like real ones. A small pool
    (one sequence tiled) would compress several times better and faster than real labels."""
    parts = [s for split in ("train", "val") for u in cache.units if u.labelled
             if (s := u.load(split)) is not None and s.teacher_topk_ids is not None]
    ids = np.concatenate([s.teacher_topk_ids for s in parts]).astype(np.int64)
    probs = C.decode_probs(np.concatenate([s.teacher_topk_probs for s in parts]))
    order = np.argsort(-probs, axis=1, kind="stable")
    return {"ids": np.take_along_axis(ids, order, 1), "probs": np.take_along_axis(probs, order, 1),
            "resid": C.decode_residual(np.concatenate([s.teacher_residual for s in parts]))}


def make_stub_teacher(pool: dict, max_len: int) -> Callable[[list], list]:
    """label(batch) -> [(ids [L-1, k], probs [L-1, k], residual [L-1])] per sequence, instantly:
    consecutive windows of the pool (tiled so that every window is one slice, a view)."""
    n = len(pool["resid"])
    reps = 1 + math.ceil(max_len / n)
    ids, probs, resid = (np.concatenate([pool[name]] * reps) for name in ("ids", "probs", "resid"))
    at = [0]

    def label(batch: list) -> list:
        out = []
        for s in batch:
            m, o = len(s) - 1, at[0]
            at[0] = (o + m) % n
            out.append((ids[o:o + m], probs[o:o + m], resid[o:o + m]))
        return out

    return label


class _Timers:
    """Wall and thread-CPU seconds per named function, summed over calls and threads; also which
    OS thread id belongs to which Python thread (for _ThreadCPU)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acc: dict = defaultdict(lambda: {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0, "threads": set()})
        self.tids: dict[int, str] = {threading.get_native_id(): threading.current_thread().name}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a, **kw):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                with self.lock:
                    self.tids[threading.get_native_id()] = threading.current_thread().name
                    x = self.acc[name]
                    x["wall_s"] += dt
                    x["cpu_s"] += dc
                    x["calls"] += 1
                    x["threads"].add(threading.current_thread().name.split("_")[0])
        return timed

    def patch(self, owner, attr: str, name: str) -> None:
        setattr(owner, attr, self.wrap(name, getattr(owner, attr)))

    def report(self) -> dict:
        return {k: {**v, "threads": sorted(v["threads"])} for k, v in self.acc.items()}


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


class _ThreadCPU:
    """CPU seconds of every thread of this process, sampled from /proc/self/task every `interval`
    seconds (the last sample of a thread that exits is kept), and the machine's busy cores meanwhile.

    Native pool threads (the tokenizer's Rayon workers, Arrow's) are seen too, which the calling
    thread's thread_time() never is."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.ticks, self.comm = interval, {}, {}
        self.hz = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)

    def _sample(self) -> None:
        me = threading.get_native_id()
        for d in os.scandir("/proc/self/task"):
            tid = int(d.name)
            if tid == me:
                continue
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:  # exited meanwhile
                continue
            rest = stat[stat.rindex(")") + 2:].split()
            self.ticks[tid] = int(rest[11]) + int(rest[12])  # utime + stime (fields 14 and 15)
            self.comm.setdefault(tid, stat[stat.index("(") + 1:stat.rindex(")")])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self.start_ticks = dict(self.ticks)
        self.t0, self.machine0 = time.perf_counter(), _machine_ticks()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0
        busy, total = _machine_ticks()
        self.machine_busy_cores = (busy - self.machine0[0]) / max(total - self.machine0[1], 1) * (os.cpu_count() or 1)

    def report(self, names: dict[int, str]) -> dict:
        """CPU seconds per thread group: Python threads by name (numbered suffixes merged), native
        threads by their OS name; plus this process's and the machine's busy cores."""
        out: dict = defaultdict(float)
        for tid, t in self.ticks.items():
            name = names.get(tid)
            name = name.split("_")[0] if name else f"native thread '{self.comm.get(tid, '?')}'"
            out[name] += (t - self.start_ticks.get(tid, 0)) / self.hz
        mine = sum(out.values())
        return {"threads_cpu_s": dict(sorted(out.items(), key=lambda kv: -kv[1])), "process_cpu_s": mine,
                "process_busy_cores": mine / self.wall, "machine_busy_cores": self.machine_busy_cores,
                "others_busy_cores": max(self.machine_busy_cores - mine / self.wall, 0.0), "cores": os.cpu_count()}


class _TimedTokenizer:
    """The tokenizer, its __call__ (the packer's batch tokenization) timed."""

    def __init__(self, tok, timers: _Timers):
        self._tok = tok
        self._call = timers.wrap("tokenize", tok.__call__)

    def __call__(self, *a, **kw):
        return self._call(*a, **kw)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _instrument_stage1() -> _Timers:
    """Time the pass's parts where they run: packer thread, main thread, writer threads."""
    import queue

    from . import corpora, teacher

    tm = _Timers()
    load = teacher.load_tokenizer
    teacher.load_tokenizer = lambda path: _TimedTokenizer(load(path), tm)
    tm.patch(corpora.SegmentPacker, "_fill", "packer: read + render + tokenize + pack (_fill)")
    tm.patch(corpora, "record_to_text", "render (record_to_text)")
    tm.patch(corpora.SegmentPacker, "state", "packer state (resume record)")
    tm.patch(queue.Queue, "get", "main: waiting for packed groups (queue get)")
    tm.patch(teacher, "_shard_data", "main: shard data (_shard_data: encode + resume record)")
    tm.patch(C, "encode_labels", "encode_labels")
    tm.patch(teacher, "_residual_stats", "residual stats")
    tm.patch(C.ShardWriter, "submit", "main: submit (waits for a free writer slot)")
    tm.patch(C, "shard_table", "writer: shard_table")
    tm.patch(C, "write_shard", "writer: write_shard (Parquet encode + zstd + write + fsync)")
    tm.patch(teacher, "_prepare", "prepare (tokenizer, fingerprints)")
    tm.patch(teacher, "_finalize_unit", "finalize unit (checksums, card, manifest)")
    tm.patch(teacher, "_write_set", "set manifest")
    return tm


def stage1_pipeline_config(cfg: MolConfig, model_path: Path, corpus: Path, cache_root: Path,
                           max_seq_len: int, rows_per_shard: int) -> dict:
    """A config for the whole Stage 1 over one synthetic general source: the defaults (writer
    threads, zstd level, batch size, segments) except sequence length, rows per shard, no fidelity."""
    return {"model": {"name": str(model_path), "chat_template_kwargs": cfg.model.chat_template_kwargs},
            "data": {"max_seq_len": max_seq_len,
                     "sources": [{"path": str(corpus), "corpus": "general", "subset": "synthetic"}]},
            "teacher": {"top_k": cfg.teacher.top_k, "rows_per_shard": rows_per_shard, "fidelity_sequences": 0,
                        "cache_root": str(cache_root)}}


def _stage1_pipeline_child(config: dict, pool: str, instrument: bool = False):
    """The whole Stage 1 (mol.teacher.run_teacher_pass) with the teacher replaced by an instant stub."""
    from . import teacher

    cfg = load_config(data=config)
    with np.load(pool) as z:
        stub = make_stub_teacher({k: z[k] for k in z.files}, cfg.data.max_seq_len)
    timers = _instrument_stage1() if instrument else None
    if timers is not None:
        stub = timers.wrap("main: teacher stub", stub)
    teacher._teacher_backend = lambda *a, **kw: (None, stub)

    def run() -> dict:
        marks = []
        sampler = _ThreadCPU() if timers is not None else contextlib.nullcontext()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with sampler:
            cache_dir, status = teacher.run_teacher_pass(
                cfg, make_bar=lambda total, desc: (lambda n: marks.append((time.perf_counter(), n))))
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cache = C.TeacherCache(cache_dir)
        m = cache.manifest
        out = {"status": status, "tokens": m["totals"]["tokens"], "sequences": m["totals"]["sequences"],
               "bytes": m["totals"]["bytes"], "bytes_per_token": m["totals"]["bytes_per_token"],
               "shards": cache.shard_count, "segments": sum(u.manifest["segments"] for u in cache.units),
               "wall_s": wall, "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
               "first_shard_s": marks[0][0] - t0 if marks else None,
               "last_shard_s": marks[-1][0] - t0 if marks else None,
               # from the first shard handed to the writer to the last: the pass without its
               # start (tokenizer, fingerprints, first group) and end (drain, checksums, manifests)
               "loop_tokens_per_s": (sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0])
                                     if len(marks) > 1 and marks[-1][0] > marks[0][0] else None),
               "writer_threads": cfg.teacher.writer_threads, "zstd_level": cfg.teacher.zstd_level,
               "batch_size": cfg.teacher.batch_size, "rows_per_shard": cfg.teacher.rows_per_shard,
               "max_seq_len": cfg.data.max_seq_len, "threads_at_end": threading.active_count()}
        if timers is not None:
            out["split"] = timers.report()
            out["cpu"] = sampler.report(timers.tids)
        return out

    return run


def stage1_pipeline(cfg: MolConfig, model_path: Path, tokenizer, cache: C.TeacherCache, workdir: Path,
                    sz: BenchSizes) -> dict:
    """(a) the whole Stage 1 with a stub teacher over sz.pipeline_tokens, instrumented, in a child;
    (b) the same pass, uninstrumented, over sz.rss_tokens and 10x that: peak RSS of each child."""
    import shutil

    root = workdir / "stage1-pipeline"
    root.mkdir(parents=True, exist_ok=True)
    pool = root / "stub-labels.npz"
    labels = stub_labels(cache)
    np.savez(pool, **labels)
    runs = {"pipeline": sz.pipeline_tokens, "rss_1x": sz.rss_tokens, "rss_10x": 10 * sz.rss_tokens}
    files = {}
    for name, tokens in runs.items():
        path = root / f"{name}.jsonl"
        files[name] = (path, synthetic_corpus(path, tokens, tokenizer))

    def spec(name: str, instrument: bool) -> dict:
        conf = stage1_pipeline_config(cfg, model_path, files[name][0], root / f"cache-{name}",
                                      sz.pipeline_seq_len, sz.pipeline_rows_per_shard)
        return {"kind": "stage1_pipeline", "args": {"config": conf, "pool": str(pool), "instrument": instrument}}

    def one(name: str, instrument: bool = False) -> dict:
        try:
            res = run_children([spec(name, instrument)], 1, sz.threads)[0]
        finally:
            shutil.rmtree(root / f"cache-{name}", ignore_errors=True)
        r = res.pop("result")
        r.update(res, records=files[name][1], input_bytes=files[name][0].stat().st_size)
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        log.info("stage 1 pipeline %s: %d tokens in %.1f s = %.0f tokens/s, peak RSS %.0f MiB (own %.0f MiB)",
                 name, r["tokens"], r["wall_s"], r["tokens_per_s"], r["high_water_bytes"] / 2**20,
                 r["peak_bytes"] / 2**20)
        return r

    pipe = one("pipeline", instrument=True)
    small = one("rss_1x")
    big = one("rss_10x")
    for f in files.values():
        f[0].unlink(missing_ok=True)
    pool.unlink(missing_ok=True)
    return {"pipeline": pipe, "rss": {"1x": small, "10x": big,
                                      "ratio": big["high_water_bytes"] / small["high_water_bytes"],
                                      "own_ratio": big["peak_bytes"] / max(small["peak_bytes"], 1),
                                      "tokens_ratio": big["tokens"] / max(small["tokens"], 1)},
            "corpus": "mol.synthetic.write_corpus", "stub_pool_positions": len(labels["resid"])}


_CHILD_SETUPS: dict[str, Callable[..., Callable[[], Any]]] = {
    "loss": _loss_child, "stage2": _stage2_child, "stage1_pipeline": _stage1_pipeline_child}


# --------------------------------------------------------------------------- zstd levels


def shard_from_file(path: Path, unit: C.CacheUnit, vocab: int) -> tuple[C.ShardData, bool, Optional[int]]:
    """One cache shard back as the ShardData Stage 1 built for it: its rows, its labels decoded and
    re-encoded by C.encode_labels, its resume metadata. Also whether the re-encoding gave the stored
    codes, and the rows per row group it was written with (None: one row group)."""
    pf = pq.ParquetFile(path)
    rg = pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups > 1 else None
    t = pf.read().combine_chunks()
    col = t.column(C.INPUT_IDS)
    col = col.chunk(0) if col.num_chunks else pa.array([], col.type)
    off = col.offsets.to_numpy().astype(np.int64)
    src = unit.manifest["key"]["source"]
    d = C.ShardData(seq_id=t.column(C.SEQ_ID).to_numpy(), corpus=src["corpus"], subset=src["subset"],
                    split=t.column(C.SPLIT).to_pylist(), input_ids=col.flatten().to_numpy(), tok_off=off - off[0])
    exact = True
    if unit.labelled:
        k = unit.k

        def flat(name, depth):
            c = t.column(name)
            a = c.chunk(0) if c.num_chunks else pa.array([], c.type)
            for _ in range(depth):
                a = a.flatten()
            return a.to_numpy(zero_copy_only=False)

        gaps, pc, rc = flat(C.TOPK_IDS, 2).reshape(-1, k), flat(C.TOPK_PROBS, 2).reshape(-1, k), flat(C.RESIDUAL, 1)
        d.topk_ids, d.topk_probs, d.residual = C.encode_labels(C.decode_ids(gaps), C.decode_probs(pc),
                                                               C.decode_residual(rc), vocab)
        exact = (np.array_equal(d.topk_ids, gaps) and np.array_equal(d.topk_probs, pc)
                 and np.array_equal(d.residual, rc))
    md = pf.schema_arrow.metadata or {}
    d.metadata = {C.RESUME_KEY: md[C.RESUME_KEY]} if C.RESUME_KEY in md else {}
    return d, exact, rg


def zstd_levels_study(cache: C.TeacherCache, vocab: int, levels: tuple, default_level: int, workdir: Path,
                      sz: BenchSizes) -> dict:
    """Every shard of the cache (real labels of the real model, Stage 1's own grouping) rewritten
    with mol.cache's encoding at each zstd level: bytes/token and single-thread writer tokens/s
    (C.shard_table + C.write_shard), levels interleaved round by round. At the cache's own level
    the rewritten shards must be the cache's bytes (sha256 against the unit manifests)."""
    shards, exact = [], True
    for u in cache.units:
        for s in u.manifest["shards"]:
            d, ok, rg = shard_from_file(u.path / s["file"], u, vocab)
            shards.append((rg, s, d))
            exact &= ok
    tokens = sum(d.tokens for _, _, d in shards)
    levels = tuple(sorted(set(levels) | {default_level}))
    out_dir = workdir / "zstd-levels"
    out_dir.mkdir(parents=True, exist_ok=True)

    def task(level):
        def run():
            for i, (rg, _, d) in enumerate(shards):
                write_table(d, out_dir / f"l{level:02d}-{i:05d}.parquet", cache.k, vocab, level, rg)
        return run

    t = interleaved({f"zstd {lv}": task(lv) for lv in levels}, sz.reps, sz.warmup)
    rows = []
    for lv in levels:
        files = [out_dir / f"l{lv:02d}-{i:05d}.parquet" for i in range(len(shards))]
        nbytes = sum(p.stat().st_size for p in files)
        row = {"level": lv, "default": lv == default_level, "bytes": nbytes, "bytes_per_token": nbytes / tokens,
               "write_s": t[f"zstd {lv}"], "writer_tokens_per_s": tokens / med(t[f"zstd {lv}"])}
        if lv == default_level:
            same = [C.sha256_path(p) == s["sha256"] for p, (_, s, _) in zip(files, shards)]
            row["shards_identical_to_cache"] = int(sum(same))
        rows.append(row)
        for p in files:
            p.unlink()
    base = next(r for r in rows if r["default"])
    for r in rows:
        r["bytes_vs_default"] = r["bytes"] / base["bytes"]
        r["speed_vs_default"] = r["writer_tokens_per_s"] / base["writer_tokens_per_s"]
    cache_level_rows = base["shards_identical_to_cache"]
    return {"shards": len(shards), "tokens": tokens, "units": len(cache.units), "default_level": default_level,
            "reencode_exact": bool(exact), "reproduces_cache_bytes": cache_level_rows == len(shards),
            "cache_manifest_bytes_per_token": cache.manifest["totals"]["bytes_per_token"], "levels": rows}


# --------------------------------------------------------------------------- storage study


@dataclass(frozen=True)
class StorageVariant:
    """One way to store the teacher columns, as changes to the current schema (mol.cache's, v3)."""

    name: str
    probs: str = "u10_sqrt"      # fp16 | logp_fp16 | u8_sqrt | u10_sqrt | u12_sqrt (in uint16) | u8_log
    resid: str = "log16"         # log16 (schema 3's log code) | fp32 | fp16 (schema 2) | none (1 - sum of probs)
    ids_order: str = "asc_gap"   # asc_gap (ascending, stored as gaps) | asc | desc (most probable first)
    zstd: Optional[int] = None   # None: the config's teacher.zstd_level, as Stage 1 writes
    encodings: tuple = ()        # ((column, parquet encoding), ...) replacing the current one for its values
    current: bool = False        # written and read by mol.cache itself (encode_labels, shard_table, write_shard, decode_*)


_U8_LOG_STEP = 20.0 / 255  # log-prob grid: p in [2e-9, 1], relative step 8%
# sqrt(p) on a uniform grid: absolute error in p ~ sqrt(p) / levels, finest where the mass is
_SQRT_LEVELS = {"u8_sqrt": 255, "u10_sqrt": C.PROB_LEVELS, "u12_sqrt": 4095}
_IDS, _PROBS, _RES = C.TOPK_IDS, C.TOPK_PROBS, C.RESIDUAL
_BSS, _DELTA = "BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED"

_PLAIN = "PLAIN"

# The first entry is the current schema; every other one names what it changes relative to it
# (encodings too: a column not listed keeps the encoding mol.cache gives it).
_SCHEMA2 = dict(ids_order="asc", resid="fp16", encodings=((_RES, _PLAIN),))
_SCHEMA1 = dict(probs="fp16", resid="fp32", ids_order="desc")
STORAGE_VARIANTS = [
    StorageVariant("current", current=True),
    StorageVariant("PLAIN ids + probs", encodings=((_IDS, _PLAIN), (_PROBS, _PLAIN))),
    StorageVariant("PLAIN ids", encodings=((_IDS, _PLAIN),)),
    StorageVariant("PLAIN probs", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("PLAIN residual", encodings=((_RES, _PLAIN),)),
    StorageVariant("DELTA_BINARY_PACKED id gaps", encodings=((_IDS, _DELTA),)),
    StorageVariant("zstd 3", zstd=3),
    StorageVariant("zstd 19", zstd=19),
    StorageVariant("zstd 22", zstd=22),
    StorageVariant("ids ascending, not gaps (schema 2)", ids_order="asc"),
    StorageVariant("ids most probable first", ids_order="desc"),
    StorageVariant("probs fp16", probs="fp16"),
    StorageVariant("probs fp16 log-probs", probs="logp_fp16"),
    StorageVariant("probs uint12 sqrt(p) (uint16)", probs="u12_sqrt"),
    StorageVariant("probs uint8 sqrt(p)", probs="u8_sqrt", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("probs uint8 log p grid", probs="u8_log", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("residual fp16, PLAIN (schema 2)", resid="fp16", encodings=((_RES, _PLAIN),)),
    StorageVariant("residual fp32", resid="fp32"),
    StorageVariant("no residual (1 - sum probs)", resid="none"),
    StorageVariant("schema 2: ascending ids, fp16 residual (PLAIN)", **_SCHEMA2),
    StorageVariant("schema 1: ids most probable first, fp16 probs, fp32 residual", **_SCHEMA1),
    StorageVariant("schema 1 with PLAIN encodings", **_SCHEMA1,
                   encodings=((_IDS, _PLAIN), (_PROBS, _PLAIN), (_RES, _PLAIN))),
]


def _nested(values: np.ndarray, k: int, positions: list[int]) -> pa.ListArray:
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), k)
    offsets = np.concatenate([[0], np.cumsum(positions)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def encode_labels(v: StorageVariant, ids: np.ndarray, probs: np.ndarray, resid: np.ndarray, id_dtype) -> dict:
    """Exact fp32 labels [N, k] (most probable first) -> the variant's stored column values."""
    if v.ids_order in ("asc", "asc_gap"):
        order = np.argsort(ids, axis=1, kind="stable")
        ids, probs = np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1)
    stored_ids = ids.astype(id_dtype)
    if v.ids_order == "asc_gap":
        stored_ids = np.diff(stored_ids, axis=1, prepend=np.zeros((len(ids), 1), id_dtype))
    p64 = probs.astype(np.float64)
    if v.probs == "fp16":
        sp = probs.astype(np.float16)
    elif v.probs == "logp_fp16":
        sp = np.log(np.maximum(p64, 1e-30)).astype(np.float16)
    elif v.probs in _SQRT_LEVELS:
        # never 0: a zero bucket would be floored at 1e-30 and cost the student's whole mass there
        top = _SQRT_LEVELS[v.probs]
        sp = np.clip(np.rint(np.sqrt(np.clip(p64, 0.0, 1.0)) * top), 1, top).astype(np.uint8 if top < 256 else np.uint16)
    elif v.probs == "u8_log":
        sp = np.clip(np.rint(-np.log(np.maximum(p64, 1e-30)) / _U8_LOG_STEP), 0, 255).astype(np.uint8)
    else:
        raise ValueError(v.probs)
    out = {_IDS: stored_ids, _PROBS: sp}
    if v.resid == "log16":
        r = np.clip(np.asarray(resid, dtype=np.float64), C.RESIDUAL_FLOOR, 1.0)
        out[_RES] = np.rint(-np.log(r) / C.RESIDUAL_STEP).astype(np.uint16)
    elif v.resid == "fp32":
        out[_RES] = resid.astype(np.float32)
    elif v.resid == "fp16":
        out[_RES] = resid.astype(np.float16)
    elif v.resid != "none":
        raise ValueError(v.resid)
    return out


def decode_labels(v: StorageVariant, ids: np.ndarray, probs: np.ndarray, resid: Optional[np.ndarray]):
    """Stored column values -> (ids int64 [N, k], probs float64, residual float64), as a reader would."""
    if v.current:
        return (C.decode_ids(ids).astype(np.int64), C.decode_probs(probs).astype(np.float64),
                C.decode_residual(resid).astype(np.float64))
    ids = ids.astype(np.int64)
    if v.ids_order == "asc_gap":
        ids = np.cumsum(ids, axis=1)
    if v.probs == "fp16":
        p = probs.astype(np.float64)
    elif v.probs == "logp_fp16":
        p = np.exp(probs.astype(np.float64))
    elif v.probs in _SQRT_LEVELS:
        p = (probs.astype(np.float64) / _SQRT_LEVELS[v.probs]) ** 2
    else:
        p = np.exp(-probs.astype(np.float64) * _U8_LOG_STEP)
    if resid is None:
        r = np.clip(1 - p.sum(1), 0, None)
    elif v.resid == "log16":
        r = C.decode_residual(resid).astype(np.float64)
    else:
        r = resid.astype(np.float64)
    return ids, p, r


_LEAF = {C.INPUT_IDS: ".list.element", _IDS: ".list.element.list.element", _PROBS: ".list.element.list.element",
         _RES: ".list.element"}


def write_variant(v: StorageVariant, path: Path, rows: list[dict], labels: list[tuple], k: int, vocab: int,
                  zstd_level: int, base_encodings: dict) -> float:
    """rows: cache rows (input_ids etc.); labels: exact (ids, probs fp32, resid fp32) per row;
    zstd_level / base_encodings: the current schema's, which the variant changes.

    The current variant is mol.cache's own path (shard_data -> C.shard_table -> C.write_shard).
    Every other one takes that same table and replaces its teacher columns with the variant's,
    then writes it with mol.cache's Parquet options and the current encodings it does not change.
    Returns the seconds spent in the write (table build + Parquet encoding + compression + I/O)."""
    level = zstd_level if v.zstd is None else v.zstd
    d = shard_data(rows, labels, vocab, subset="storage-study")
    if v.current:
        t0 = time.perf_counter()
        write_table(d, path, k, vocab, level)
        return time.perf_counter() - t0
    id_dtype = C.id_dtype(vocab)
    enc = encode_labels(v, np.concatenate([x[0] for x in labels]), np.concatenate([x[1] for x in labels]),
                        np.concatenate([x[2] for x in labels]), id_dtype)
    positions = [len(x[2]) for x in labels]
    t0 = time.perf_counter()
    table = C.shard_table(d, k, vocab)
    for name in (_IDS, _PROBS):
        table = table.set_column(table.schema.get_field_index(name), name, _nested(enc[name], k, positions))
    if _RES in enc:
        offsets = np.concatenate([[0], np.cumsum(positions)]).astype(np.int32)
        table = table.set_column(table.schema.get_field_index(_RES), _RES,
                                 pa.ListArray.from_arrays(pa.array(offsets), pa.array(enc[_RES])))
    else:
        table = table.drop_columns([_RES])
    encodings = {**base_encodings, **dict(v.encodings)}
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", compression_level=level,
                   use_dictionary=[C.CORPUS, C.SUBSET, C.SPLIT], write_statistics=[C.SEQ_ID],
                   column_encoding={col + _LEAF[col]: e for col, e in encodings.items()
                                    if col in table.column_names} or None)
    with open(tmp, "rb") as f:  # as write_shard: the fsync is part of every write
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return time.perf_counter() - t0


def leaf_encodings(path: Path) -> dict:
    """The value encoding of input_ids and each teacher column in a shard: what mol.cache chose, to build upon."""
    md = pq.ParquetFile(path).metadata.row_group(0)
    out = {}
    for c in range(md.num_columns):
        col = md.column(c)
        top = col.path_in_schema.split(".")[0]
        if top in _LEAF:
            data = [e for e in col.encodings if e not in ("RLE", "BIT_PACKED")]
            known = [e for e in data if e in (_BSS, _DELTA, "DELTA_BYTE_ARRAY", "DELTA_LENGTH_BYTE_ARRAY")]
            if any("DICTIONARY" in e for e in data):
                log.warning("%s is dictionary-encoded by mol.cache; the variants write it PLAIN", top)
            out[top] = known[0] if known else _PLAIN
    return out


def _column_bytes(path: Path) -> dict:
    """Compressed bytes per top-level column (data pages only; the footer is not attributed)."""
    md = pq.ParquetFile(path).metadata
    out: dict = defaultdict(int)
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            out[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    return dict(out)


def read_variant(v: StorageVariant, path: Path):
    t = pq.read_table(path).combine_chunks()
    k = t.schema.field(_IDS).type.value_type.list_size
    ids = t.column(_IDS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k)
    probs = t.column(_PROBS).chunk(0).flatten().flatten().to_numpy().reshape(-1, k)
    resid = t.column(_RES).chunk(0).flatten().to_numpy() if _RES in t.column_names else None
    return decode_labels(v, ids, probs, resid)


def _bucket_logits(student_logp: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] student log-probs -> ([N, k+1] logits, ids into them) giving truncated_reverse_kl the
    same value: the k teacher ids' log-probs plus one "everything else" column already sum to 1, so
    the log-softmax over them is the identity and the KL is that of the full vocabulary, at a
    thousandth of the cost of a 49k-wide float64 log-softmax per variant."""
    top = student_logp.gather(-1, ids)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1.0)).unsqueeze(-1)
    k = ids.shape[-1]
    return torch.cat([top, rest], -1), torch.arange(k, device=ids.device).expand(ids.shape[0], k)


@torch.no_grad()
def storage_study(model, tokenizer, rows: list[dict], k: int, chunk: int, vocab: int, workdir: Path,
                  zstd_level: int, variants: list[StorageVariant] = STORAGE_VARIANTS,
                  labels: Optional[list[tuple]] = None) -> dict:
    """Bytes per token and KL fidelity of each storage variant on real teacher labels.

    variants[0] must be the current schema: the others are written as changes to what it wrote.
    `labels`: the teacher's labels of `rows` when already computed (else computed here).

    Fidelity as in mol.teacher.measure_fidelity: probe student = teacher logits / 1.5, float64,
    |KL_trunc(stored labels) - KL_trunc(exact labels: the float64 teacher's probabilities of the
    same ids, residual 1 - their sum)| per position.
    """
    from .teacher import final_hidden, teacher_labels

    device = next(model.parameters()).device
    seqs = [np.asarray(r[C.INPUT_IDS]) for r in rows]
    if labels is None:
        labels = teacher_labels(model, seqs, k, chunk, tokenizer.pad_token_id, device)
    labels_ids = np.concatenate([x[0] for x in labels])
    tokens = sum(len(s) for s in seqs)
    if not variants[0].current:
        raise ValueError("storage_study: the first variant must be the current schema")
    results = []
    decoded = []
    base: dict = {}
    for i, v in enumerate(variants):
        path = workdir / f"storage-{i:02d}.parquet"
        seconds = write_variant(v, path, rows, labels, k, vocab, zstd_level, base)
        name = v.name
        if v.current:
            base = leaf_encodings(path)
            t = pq.read_schema(path)
            name = (f"current mol.cache schema {C.SCHEMA_VERSION}: {t.field(_IDS).type.value_type.value_type} "
                    f"id gaps ({base.get(_IDS)}), {t.field(_PROBS).type.value_type.value_type} sqrt-p codes "
                    f"({base.get(_PROBS)}), {t.field(_RES).type.value_type} log-coded residual ({base.get(_RES)}), "
                    f"zstd {zstd_level}")
        results.append({"name": name, "variant": dataclasses.asdict(v), "bytes": path.stat().st_size,
                        "write_us_per_token": seconds / tokens * 1e6,
                        "bytes_per_token": path.stat().st_size / tokens,
                        "column_bytes_per_token": {c: b / tokens for c, b in _column_bytes(path).items()}})
        decoded.append(read_variant(v, path))
        if v.current:
            current_sha = C.sha256_path(path)
        path.unlink()
    # the same content through this module's variant writer, changing nothing, must give mol.cache's bytes
    check = workdir / "check.parquet"
    write_variant(StorageVariant("builder check"), check, rows, labels, k, vocab, zstd_level, base)
    builder_bytes, builder_identical = check.stat().st_size, C.sha256_path(check) == current_sha
    check.unlink()
    if not builder_identical:
        log.warning("storage study: the variant writer gives %d bytes, mol.cache %d (not the same file)",
                    builder_bytes, results[0]["bytes"])

    w = model.get_output_embeddings().weight.double()
    diffs: list[list[torch.Tensor]] = [[] for _ in variants]
    kl_exact_all = []
    pos = 0
    for s in seqs:
        x = torch.as_tensor(s.astype(np.int64), device=device)[None]
        t_logits = final_hidden(model, x)[0, :-1].double() @ w.T
        s_logp = torch.log_softmax(t_logits / PROBE_TEMPERATURE, -1)
        t_logp = torch.log_softmax(t_logits, -1)
        n = t_logits.shape[0]
        ids_x = torch.as_tensor(labels_ids[pos:pos + n], device=device)
        probs_x = t_logp.gather(-1, ids_x).exp()
        # every variant stores the same id set, and the truncated KL does not depend on their order
        kl_x = truncated_reverse_kl(*_bucket_logits(s_logp, ids_x), probs_x, (1 - probs_x.sum(-1)).clamp_min(0))
        kl_exact_all.append(kl_x.cpu())
        for j, (ids, p, r) in enumerate(decoded):
            ids_t = torch.as_tensor(ids[pos:pos + n], device=device)
            kl_c = truncated_reverse_kl(*_bucket_logits(s_logp, ids_t), torch.as_tensor(p[pos:pos + n], device=device),
                                        torch.as_tensor(r[pos:pos + n], device=device))
            diffs[j].append((kl_c - kl_x).abs().cpu())
        pos += n
    for res, d in zip(results, diffs):
        d = torch.cat(d)
        res["kl_abs_mean"] = float(d.mean())
        res["kl_abs_max"] = float(d.max())
    return {"sequences": len(seqs), "tokens": tokens, "positions": pos, "k": k,
            "kl_trunc_exact_mean": float(torch.cat(kl_exact_all).mean()),
            "probe": f"student = teacher logits / {PROBE_TEMPERATURE}", "builder_check_bytes": builder_bytes,
            "builder_check_identical": builder_identical,
            "current_encodings": base, "zstd_level": zstd_level,
            "variants": results}


def best_storage(storage: dict, max_bytes: float = 80.0, max_kl: float = 1e-3) -> dict:
    ok = [v for v in storage["variants"] if v["kl_abs_mean"] <= max_kl]
    best = min(ok, key=lambda v: v["bytes_per_token"]) if ok else None
    return {"best_meeting_fidelity": best, "meets_both": bool(best and best["bytes_per_token"] <= max_bytes)}

# --------------------------------------------------------------------------- the whole run


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "mem_available_gb_at_start": round(mem_available() / 2**30, 1)}


def ensure_cache(cfg: MolConfig, make_bar=None) -> Path:
    """The config's teacher cache, built by the real Stage 1 when it is missing."""
    from .teacher import run_teacher_pass

    cache_dir = C.resolve_cache_key(cfg).cache_dir
    if not (cache_dir / C.MANIFEST).is_file():
        log.info("no teacher cache at %s: running Stage 1 first", cache_dir)
        cache_dir, _ = run_teacher_pass(cfg, make_bar=make_bar)
    return cache_dir


def _round_range(num: list[float], den: list[float]) -> str:
    """The spread of the same ratio taken round by round: how far noise moves the median's ratio."""
    r = [a / b for a, b in zip(num, den)]
    return f"per round {min(r):.3f}–{max(r):.3f}"


def _figure(fid: str, figure: str, measured: float, op: str, goal: float, text: str, detail: dict,
            goal_text: str | None = None, also: bool = True) -> dict:
    """One row of the report; `also` is a second condition the goal carries (e.g. fidelity)."""
    met = measured >= goal if op == ">=" else measured <= goal
    return {"id": fid, "figure": figure, "measured": float(measured), "measured_text": text, "op": op,
            "goal": goal, "goal_text": goal_text or f"{op.replace('>=', '≥').replace('<=', '≤')} {goal:g}",
            "met": bool(met and also) and math.isfinite(measured), "detail": detail}


FIGURE_IDS = ("stage1_vs_forward", "stage1_pipeline_tokens_per_s", "stage1_rss_10x", "cache_bytes_per_token",
              "mol_vs_ce_step_time", "mol_vs_ce_peak_memory", "cache_vs_online_teacher_step_time",
              "loss_path_memory_vs_naive", "reader_vs_training_tokens_per_s")
SECTIONS = ("teacher cache", "stage 1 vs bare forward", "storage variants", "zstd levels",
            "stage 1 at scale (stub teacher)", "stage 2 steps", "stage 2 step ratio vs length", "stage 2 peak memory",
            "loss path peak memory", "loss path time")
"""The parts of run_all in order; `section(name)` is called as each starts."""


def build_figures(stage1: dict, at_scale: dict, storage: dict, stage2: dict, stage2_mem: dict, headline: dict,
                  k: int, cache_bytes_per_token: float) -> list[dict]:
    """The figures table, in FIGURE_IDS order, from the measurements (each figure's detail holds
    what it was computed from, so a report can be rebuilt from bench.json)."""
    t2, mem2 = stage2["times"], (stage2_mem["mol"], stage2_mem["ce"])
    cur = storage["variants"][0]
    best = storage["best_meeting_fidelity"]
    pipe, rss = at_scale["pipeline"], at_scale["rss"]
    gb, mib = 1 / 2**30, 1 / 2**20
    cpu = pipe.get("cpu") or {}
    cpu_us = 1e6 * cpu["process_cpu_s"] / pipe["tokens"] if cpu else None
    figures = [
        _figure("stage1_vs_forward", "Stage 1 tokens/s ÷ bare forward tokens/s", stage1["ratio"], ">=", 0.92,
                f"{stage1['ratio']:.3f} ({stage1['stage1_tokens_per_s']:.0f} vs {stage1['bare_tokens_per_s']:.0f} tok/s;"
                f" labels alone {stage1['ratio_labels_only']:.3f}; encode"
                f" {1e3 * med(stage1['times']['stage1/encode']):.0f} ms a round, the write on"
                f" {stage1['writer_threads']} writer thread(s), {1e3 * med(stage1['write_s']):.0f} ms alone;"
                f" {_round_range(stage1['times']['bare'], stage1['times']['stage1'])})", stage1),
        _figure("stage1_pipeline_tokens_per_s", "whole Stage 1 tokens/s, instant stub teacher (read JSONL, render, "
                f"tokenize, pack, encode, compress, write, manifests; {pipe['max_seq_len']}-token sequences, "
                f"{pipe['rows_per_shard']} rows/shard)", pipe["tokens_per_s"], ">=", 200_000.0,
                f"{pipe['tokens_per_s']:.0f} tok/s ({pipe['tokens']} tokens in {pipe['wall_s']:.1f} s, {pipe['shards']} "
                f"shards, {pipe['cpu_s'] / pipe['wall_s']:.2f} cores busy"
                + (f"; first to last shard {pipe['loop_tokens_per_s']:.0f} tok/s" if pipe.get("loop_tokens_per_s") else "")
                + (f"; CPU {cpu_us:.2f} µs/token, so at most {cpu['cores'] / cpu_us * 1e6:.0f} tok/s on"
                   f" {cpu['cores']} idle cores; other processes kept {cpu['others_busy_cores']:.2f} cores busy"
                   if cpu else "")
                + ")", pipe, goal_text="≥ 200k tokens/s"),
        _figure("stage1_rss_10x", f"Stage 1 (stub teacher) peak RSS, {rss['10x']['tokens']} ÷ {rss['1x']['tokens']} "
                "tokens", rss["ratio"], "<=", 1.15,
                f"{rss['ratio']:.3f} ({rss['10x']['high_water_bytes'] * mib:.0f} vs "
                f"{rss['1x']['high_water_bytes'] * mib:.0f} MiB, the pass's own growth "
                f"{rss['10x']['peak_bytes'] * mib:.0f} vs {rss['1x']['peak_bytes'] * mib:.0f} MiB)", rss),
        _figure("cache_bytes_per_token", f"cache bytes/token on disk, k = {k} (current schema)",
                cur["bytes_per_token"], "<=", 80.0,
                f"{cur['bytes_per_token']:.1f} B/token (|ΔKL| mean {cur['kl_abs_mean']:.1e}); "
                f"best variant with |ΔKL| ≤ 1e-3: "
                + (f"{best['bytes_per_token']:.1f} ({best['name']})" if best else "none"),
                {"current": cur, "best": best, "cache_manifest_bytes_per_token": cache_bytes_per_token},
                goal_text="≤ 80, with mean |ΔKL| ≤ 1e-3", also=cur["kl_abs_mean"] <= 1e-3),
        _figure("mol_vs_ce_step_time", "Stage 2 MoL step time ÷ CE-only step time", stage2["ratio_mol_ce"], "<=", 1.05,
                f"{stage2['ratio_mol_ce']:.3f} ({med(t2['mol']):.2f} s vs {med(t2['ce']):.2f} s, "
                f"{stage2['micro_batch']}×{stage2['seq_len']} tokens; {_round_range(t2['mol'], t2['ce'])})",
                {k_: v for k_, v in stage2.items()}),
        _figure("mol_vs_ce_peak_memory", "Stage 2 peak memory, MoL ÷ CE-only", stage2_mem["ratio"], "<=", 1.05,
                f"{stage2_mem['ratio']:.3f} ({mem2[0]['peak_bytes'] * gb:.2f} vs {mem2[1]['peak_bytes'] * gb:.2f} GiB)",
                stage2_mem),
        _figure("cache_vs_online_teacher_step_time", "MoL step from the cache ÷ online teacher step (adapter "
                "disabled, full-vocab KL)", stage2["ratio_mol_online"], "<=", 0.75,
                f"{stage2['ratio_mol_online']:.3f} ({med(t2['mol']):.2f} s vs {med(t2['online']):.2f} s; "
                f"{_round_range(t2['mol'], t2['online'])})",
                {"mol_s": t2["mol"], "online_s": t2["online"]}),
        _figure("loss_path_memory_vs_naive", f"loss-path peak memory ÷ naive full-logits loss, "
                f"{headline['tokens']} tokens × {headline['vocab']} vocab", headline["ratio"], "<=", 0.2,
                f"{headline['ratio']:.3f} ({headline['chunked_peak_bytes'] * gb:.2f} vs "
                f"{headline['naive_peak_bytes'] * gb:.1f} GiB, naive {headline['naive_how']})", headline),
        _figure("reader_vs_training_tokens_per_s", "cache reader tokens/s (the trainer's streaming reader + "
                "collate) ÷ training tokens/s", stage2["reader_over_training"], ">=", 20.0,
                f"{stage2['reader_over_training']:.0f} ({stage2['reader_tokens_per_s']:.0f} vs "
                f"{stage2['training_tokens_per_s']:.0f} tok/s"
                + (f"; whole-split TeacherCache.load {stage2['reader_load_tokens_per_s']:.0f} tok/s"
                   if "reader_load_tokens_per_s" in stage2 else "") + ")",
                {"reader_s": t2["reader"], "reader_tokens": stage2["reader_tokens"], "mol_s": t2["mol"],
                 "reader_load_s": t2.get("reader_load")}),
    ]
    assert [f["id"] for f in figures] == list(FIGURE_IDS)
    return figures


def run_all(cfg: MolConfig, *, quick: bool = False, workdir: Optional[Path] = None, threads: Optional[int] = None,
            section: Callable[[str], None] = lambda name: None, make_bar=None) -> dict:
    """Every measurement of the benchmark; returns {"meta", "figures", "storage", "zstd_levels",
    "stage1_at_scale", "scaling"}.

    `section(name)` is called as each part starts (progress for the caller). The model is the
    config's (`model.name`); with quick=True the config is shrunk by quick_config and the cache is
    built in `workdir`. `threads` sets torch's intra-op threads here and in the children (default:
    torch's own choice, as the stages run); on a machine shared with other jobs one thread per
    process avoids OpenMP barriers waiting on a descheduled thread, which swamps small ops.
    """
    from .model import load_model, load_tokenizer, pick_device, resolve_model_path

    t_start = time.time()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sz = dataclasses.replace(QUICK if quick else FULL, threads=torch.get_num_threads())
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="mol-bench-")
        workdir = Path(own_tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = quick_config(cfg, workdir / "cache") if quick else load_config(data=config_to_dict(cfg))
    cfg.train.finetune = "lora"  # the online teacher is the student with its adapter disabled
    device = pick_device(cfg.model.device)
    section_seconds: dict[str, float] = {}
    marks = [("", time.time())]

    def enter(name: str) -> None:
        assert not name or name in SECTIONS, name
        prev, t0 = marks[-1]
        if prev:
            section_seconds[prev] = time.time() - t0
        marks.append((name, time.time()))
        if name:
            section(name)

    meta = {"machine": machine_info(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "section_seconds": section_seconds, "quick": quick, "device": str(device), "model": cfg.model.name,
            "lora": {"r": cfg.train.lora.r, "alpha": cfg.train.lora.alpha},
            "sizes": dataclasses.asdict(sz), "loss_chunk": cfg.train.loss_chunk}
    try:
        enter("teacher cache")
        cache_dir = ensure_cache(cfg, make_bar)
        cache = C.TeacherCache(cache_dir)
        k = cache.k
        vocab = cache.manifest["model"]["vocab_size"]
        model_path = resolve_model_path(cfg.model.name)
        tokenizer = load_tokenizer(model_path)
        train_seqs = cache.load("train")
        meta.update(cache_dir=str(cache_dir), k=k, vocab=vocab, model_path=str(model_path),
                    cache_bytes_per_token=cache.manifest["totals"]["bytes_per_token"],
                    cache_fidelity=cache.manifest.get("fidelity"))

        enter("stage 1 vs bare forward")
        teacher = load_model(model_path, cfg.model, device=device).eval()
        full_len = int(np.max(np.diff(train_seqs.tok_off)))
        full_rows = [train_seqs.row(i) for i in range(len(train_seqs))
                     if train_seqs.tok_off[i + 1] - train_seqs.tok_off[i] == full_len]
        s1_rows = full_rows[:cfg.teacher.batch_size]
        stage1 = bench_stage1(teacher, tokenizer, s1_rows, k, cfg.teacher.chunk_positions, cfg.teacher.zstd_level,
                              vocab, workdir, sz, cfg.teacher.writer_threads, C.row_group_rows(cfg))
        log.info("stage 1: %.3f of a bare forward (labels only %.3f)", stage1["ratio"], stage1["ratio_labels_only"])

        enter("storage variants")
        dom = [r for r in full_rows if r[C.CORPUS] == "domain"]
        gen = [r for r in full_rows if r[C.CORPUS] == "general"]
        half = sz.storage_sequences // 2
        st_rows = dom[:half] + gen[:sz.storage_sequences - min(half, len(dom))]
        storage = storage_study(teacher, tokenizer, st_rows, k, cfg.teacher.chunk_positions, vocab, workdir,
                                cfg.teacher.zstd_level)
        storage.update(best_storage(storage))
        del teacher
        gc.collect()

        enter("zstd levels")
        zstd = zstd_levels_study(cache, vocab, sz.zstd_levels, cfg.teacher.zstd_level, workdir, sz)
        log.info("zstd levels: %s", ", ".join(f"{r['level']}: {r['bytes_per_token']:.1f} B/token "
                                             f"{r['writer_tokens_per_s'] / 1e3:.0f}k tok/s" for r in zstd["levels"]))

        enter("stage 1 at scale (stub teacher)")
        # the stub teacher hands out the cache's labels (the real model's)
        at_scale = stage1_pipeline(cfg, model_path, tokenizer, cache, workdir, sz)

        enter("stage 2 steps")
        s2 = Stage2(cfg, model_path, device, k)
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

        enter("stage 2 step ratio vs length")
        step_scaling = []
        for T in sz.step_seq_lens:
            lr_rows = long_rows(train_seqs, T, 1)
            t = interleaved({"ce": lambda: s2.step(lr_rows, "ce"), "mol": lambda: s2.step(lr_rows, "mol")},
                            sz.scale_reps, warmup=0)
            step_scaling.append({"batch": 1, "seq_len": T, "ce_s": med(t["ce"]), "mol_s": med(t["mol"]),
                                 "ratio": med(t["mol"]) / med(t["ce"])})
            log.info("step B=1 T=%d: MoL/CE %.3f", T, step_scaling[-1]["ratio"])
        s2 = None  # frees the student (the lambdas above close over the name)
        gc.collect()

        enter("stage 2 peak memory")
        cfg_dict = config_to_dict(cfg)
        specs = [{"kind": "stage2", "args": {"config": cfg_dict, "model_path": str(model_path),
                                             "cache_dir": str(cache_dir), "n_rows": mb, "mode": m}}
                 for m in ("mol", "ce")]
        mem2 = run_children(specs, sz.parallel_children, sz.threads)
        stage2_mem = {"mol": mem2[0], "ce": mem2[1], "ratio": mem2[0]["peak_bytes"] / max(mem2[1]["peak_bytes"], 1)}

        enter("loss path peak memory")
        loss_mem = loss_path_memory(sz, cfg.train.loss_chunk)
        headline = loss_path_headline(sz, cfg.train.loss_chunk, loss_mem)

        enter("loss path time")
        loss_scaling = loss_path_scaling(sz, cfg.train.loss_chunk, loss_mem)
    finally:
        torch.set_num_threads(threads_before)
        if own_tmp is not None:
            own_tmp.cleanup()

    figures = build_figures(stage1, at_scale, storage, stage2, stage2_mem, headline, k, meta["cache_bytes_per_token"])
    enter("")
    meta["seconds"] = time.time() - t_start
    return {"meta": meta, "figures": figures, "storage": storage, "zstd_levels": zstd, "stage1_at_scale": at_scale,
            "scaling": {"loss_path": loss_scaling, "step_ratio": step_scaling}}


def to_markdown(res: dict, command: str) -> str:
    """The report: the figures table, the machine, the storage variants and the scaling tables."""
    m = res["meta"]
    mc = m["machine"]
    lines = [f"# MoL benchmark{' (--quick: tiny sizes, not representative)' if m['quick'] else ''}", "",
             f"- date: {m['date']}", f"- command: `{command}`",
             f"- machine: {mc['cpu']}, {mc['cores']} cores ({mc['usable_cores']} usable, torch threads "
             f"{mc['torch_threads']}), {mc['mem_total_gb']} GiB RAM; torch {mc['torch']}, Python {mc['python']}",
             f"- model: {m['model']} ({m['device']}, fp32), LoRA r = {m['lora']['r']}, k = {m['k']}, vocab {m['vocab']},"
             f" loss chunk {m['loss_chunk']}; run took {m['seconds']:.0f} s",
             "- every figure is a ratio of variants measured in this run: times interleaved round by round "
             "(medians), memory as each variant's own peak RSS in a fresh child process", "",
             "| figure | measured | goal | met? |", "|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    for f in res["figures"]:
        lines.append(f"| {cell(f['figure'])} | {cell(f['measured_text'])} | {cell(f['goal_text'])} |"
                     f" {'yes' if f['met'] else '**no**'} |")
    st = res["storage"]
    s1 = next(f for f in res["figures"] if f["id"] == "stage1_vs_forward")["detail"]
    us_s1 = 1e6 / s1["stage1_tokens_per_s"]
    lines += ["", f"## Storage variants ({st['sequences']} real sequences, {st['tokens']} tokens, k = {st['k']}; "
              f"fidelity probe: {st['probe']}, float64; mean truncated KL {st['kl_trunc_exact_mean']:.3f})", "",
              "Bytes per token of the whole shard and of each teacher column; write = the Parquet write alone"
              f" (encode + compress + I/O), µs per token (for scale: Stage 1 took {us_s1:.0f} µs per token in"
              " this run).", "",
              "| variant | bytes/token | ids | probs | residual | write µs/token | mean \\|ΔKL\\| | max \\|ΔKL\\| |"
              " ≤ 1e-3 and ≤ 80 B? |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for v in st["variants"]:
        ok = v["kl_abs_mean"] <= 1e-3 and v["bytes_per_token"] <= 80
        cb = v["column_bytes_per_token"]
        lines.append(f"| {v['name']} | {v['bytes_per_token']:.1f} | {cb.get(C.TOPK_IDS, 0):.1f} |"
                     f" {cb.get(C.TOPK_PROBS, 0):.1f} | {cb.get(C.RESIDUAL, 0):.1f} | {v['write_us_per_token']:.1f} |"
                     f" {v['kl_abs_mean']:.2e} |"
                     f" {v['kl_abs_max']:.2e} | {'yes' if ok else ''} |")
    b = st["best_meeting_fidelity"]
    lines.append("")
    lines.append(f"Smallest variant with mean |ΔKL| ≤ 1e-3: **{b['name']}**, {b['bytes_per_token']:.1f} bytes/token"
                 f" ({'meets' if st['meets_both'] else 'misses'} the 80-byte goal)." if b else
                 "No variant keeps mean |ΔKL| ≤ 1e-3.")
    if st.get("builder_check_identical") is not None:
        lines.append("")
        lines.append("Every variant is the current table with its teacher columns replaced; replacing them with the "
                     "current encoding through that path gives "
                     + ("the same file, byte for byte." if st["builder_check_identical"] else
                        f"**a different file** ({st['builder_check_bytes']} bytes vs {st['variants'][0]['bytes']})."))
    lines += zstd_markdown(res["zstd_levels"])
    lines += stage1_at_scale_markdown(res["stage1_at_scale"])
    mib = 1 / 2**20
    lines += ["", "## Loss path: chunked (the trainer's) vs naive full logits (synthetic, hidden "
              f"{m['sizes']['loss_hidden']}, gradient to the hidden states)", "",
              "| sweep | tokens | vocab | chunked s | naive s | time chunked/naive | chunked peak MiB | naive peak MiB |"
              " memory chunked/naive | loss MoL/CE time |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["scaling"]["loss_path"]:
        naive = "naive_s" in r
        lines.append(f"| {r['sweep']} | {r['tokens']} ({r['batch']}×{r['seq_len']}) | {r['vocab']} | {r['chunked_s']:.3f} |"
                     f" {r['naive_s']:.3f} | {r['time_ratio']:.2f} | {r['chunked_peak_bytes'] * mib:.0f} |"
                     f" {r['naive_peak_bytes'] * mib:.0f} | {r['memory_ratio']:.3f} | {r['mol_over_ce_time']:.3f} |"
                     if naive else
                     f"| {r['sweep']} | {r['tokens']} | {r['vocab']} | {r['chunked_s']:.3f} | (does not fit) | |"
                     f" {r['chunked_peak_bytes'] * mib:.0f} | | | {r['mol_over_ce_time']:.3f} |")
    h = next(f for f in res["figures"] if f["id"] == "loss_path_memory_vs_naive")["detail"]
    lines += ["", f"Headline point {h['tokens']} tokens × {h['vocab']} vocab: chunked peak "
              f"{h['chunked_peak_bytes'] * mib:.0f} MiB (measured); naive {h['naive_peak_bytes'] * mib:.0f} MiB, "
              f"{h['naive_how']}; measured naive points: "
              + ", ".join(f"{n} tokens → {p * mib:.0f} MiB" for n, p in h["naive_points"]) + "."]
    lines += ["", "## Stage 2 step, MoL ÷ CE, by sequence length (real model, batch 1)", "",
              "| seq len | CE s | MoL s | MoL/CE |", "|---:|---:|---:|---:|"]
    for r in res["scaling"]["step_ratio"]:
        lines.append(f"| {r['seq_len']} | {r['ce_s']:.2f} | {r['mol_s']:.2f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def zstd_markdown(z: dict) -> list[str]:
    """The zstd table: bytes/token and single-thread writer tokens/s per level, the default marked."""
    lines = ["", f"## zstd level ({z['shards']} shards of the cache, {z['tokens']} tokens, real labels; "
             "mol.cache's encoding; writer = C.shard_table + C.write_shard on one thread)", "",
             f"Default level {z['default_level']}: the rewritten shards are "
             + ("the cache's own files, byte for byte" if z["reproduces_cache_bytes"] else
                "**not** the cache's own files (see bench.json)")
             + f"; the cache's manifest says {z['cache_manifest_bytes_per_token']:.1f} bytes/token.", "",
             "| zstd level | bytes/token | bytes vs default | writer tokens/s | speed vs default |",
             "|---:|---:|---:|---:|---:|"]
    for r in z["levels"]:
        lv = f"**{r['level']} (default)**" if r["default"] else str(r["level"])
        lines.append(f"| {lv} | {r['bytes_per_token']:.1f} | {r['bytes_vs_default']:.3f} |"
                     f" {r['writer_tokens_per_s']:,.0f} | {r['speed_vs_default']:.2f} |")
    return lines


_SPLIT_ORDER = ("prepare (tokenizer, fingerprints)", "packer: read + render + tokenize + pack (_fill)",
                "tokenize", "render (record_to_text)", "packer state (resume record)",
                "main: waiting for packed groups (queue get)", "main: teacher stub",
                "main: shard data (_shard_data: encode + resume record)", "encode_labels", "residual stats",
                "main: submit (waits for a free writer slot)", "writer: shard_table",
                "writer: write_shard (Parquet encode + zstd + write + fsync)",
                "finalize unit (checksums, card, manifest)", "set manifest")


def stage1_at_scale_markdown(a: dict) -> list[str]:
    """The stub-teacher pass: where its time goes, and its peak memory at N and 10N tokens."""
    p, rss = a["pipeline"], a["rss"]
    mib = 1 / 2**20
    lines = ["", f"## Stage 1 at scale: the whole pass with an instant stub teacher ({p['tokens']} tokens, "
             f"{p['records']} synthetic text records, {p['max_seq_len']}-token sequences, {p['rows_per_shard']} "
             f"rows/shard, {p['writer_threads']} writer threads, zstd {p['zstd_level']})", "",
             f"{p['tokens_per_s']:,.0f} tokens/s over the whole pass ({p['wall_s']:.1f} s, {p['shards']} shards, "
             f"{p['bytes_per_token']:.1f} bytes/token, {p['cpu_s'] / p['wall_s']:.2f} cores busy on average)"
             + (f"; {p['loop_tokens_per_s']:,.0f} tokens/s from the first shard to the last"
                if p.get("loop_tokens_per_s") else "") + ".", "",
             "Where the time goes: wall and CPU seconds summed over calls (threads overlap, so the wall column "
             "adds up to more than the pass). Nested rows (tokenize, render in the packer's _fill; encode_labels "
             "and residual stats in _shard_data) are part of the row above them.", "",
             "| part | thread | calls | wall s | CPU s | share of the pass's wall |", "|---|---|---:|---:|---:|---:|"]
    split = p.get("split", {})
    for name in list(_SPLIT_ORDER) + [n for n in split if n not in _SPLIT_ORDER]:
        if name in split:
            x = split[name]
            lines.append(f"| {name} | {', '.join(x['threads'])} | {x['calls']} | {x['wall_s']:.2f} | {x['cpu_s']:.2f} |"
                         f" {x['wall_s'] / p['wall_s']:.2f} |")
    cpu = p.get("cpu")
    if cpu:
        lines += ["", f"CPU by thread, sampled from /proc/self/task: the pass kept {cpu['process_busy_cores']:.2f} of "
                  f"the {cpu['cores']} cores busy; the machine as a whole was {cpu['machine_busy_cores']:.2f} cores busy "
                  f"meanwhile ({cpu['others_busy_cores']:.2f} by other processes). CPU µs per token bound the rate a "
                  "thread allows on a core of its own.", "",
                  "| thread | CPU s | CPU µs/token |", "|---|---:|---:|"]
        for name, sec in cpu["threads_cpu_s"].items():
            lines.append(f"| {name} | {sec:.2f} | {1e6 * sec / p['tokens']:.2f} |")
        lines.append(f"| all | {cpu['process_cpu_s']:.2f} | {1e6 * cpu['process_cpu_s'] / p['tokens']:.2f} |")
    lines += ["", "Peak memory of the same pass (uninstrumented) in a fresh child process: the high-water RSS "
              "during the pass, and the pass's own part (minus the RSS before it).", "",
              "| tokens | records | seconds | tokens/s | peak RSS MiB | the pass's own MiB |", "|---:|---:|---:|---:|---:|---:|"]
    for key in ("1x", "10x"):
        r = rss[key]
        lines.append(f"| {r['tokens']} | {r['records']} | {r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} |"
                     f" {r['high_water_bytes'] * mib:.0f} | {r['peak_bytes'] * mib:.0f} |")
    return lines


def json_safe(obj):
    """Floats that JSON can hold (inf/nan -> None) and plain types throughout."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
