"""Benchmarks: every cost of the pipeline as a ratio against its floor, measured in one run.

Absolute timings mean little on a shared machine, so every timed figure is a ratio of variants
run in the same process, interleaved round by round (the order rotates each round so drift hits
every variant alike), median against median. Peak memory is measured per variant in a fresh
child process: the kernel's RSS high-water mark is reset right before the work (so imports and
model loading never count), and the figure is ``ru_maxrss`` after the work minus the RSS before.

:func:`run_all` runs everything and returns one JSON-able dict; ``stages/bench.py`` prints it and
writes ``bench.json`` and ``bench.md``. Children run :func:`_child_entry` (see :func:`run_children`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
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
from .batching import collate, model_hidden, output_weight
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
    threads: Optional[int] = None
    """torch threads in the children (run_all sets it to the parent's)."""
    quick: bool = False


FULL = BenchSizes()
# quick: the headline point doubles as a scaling point, so 6 loss children in all
QUICK = BenchSizes(reps=2, warmup=1, scale_reps=1, storage_sequences=2, loss_tokens=32, loss_vocab=8192,
                   loss_hidden=64, loss_seq_len=32, scale_seq_lens=(32, 64), scale_batch=1, scale_seq_vocab=4096,
                   scale_vocabs=(4096, 8192), scale_vocab_seq_len=32, step_seq_lens=(16, 32),
                   parallel_children=2, quick=True)


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
    work()
    seconds = time.perf_counter() - t0
    ru = _maxrss_bytes()
    hwm = _status_bytes("VmHWM")
    peak = hwm if reset and hwm is not None else ru
    return {"peak_bytes": max(peak - before, 0), "rss_before_bytes": before, "high_water_bytes": peak,
            "ru_maxrss_bytes": ru, "peak_reset": reset, "seconds": seconds}


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
        w_ce, w_kl = mol_weights(b["is_domain"], t.alpha, mode)
        w_ce, w_kl = w_ce.to(self.device), w_kl.to(self.device) * b["has_teacher"]
        h = model_hidden(self.model, b)[:, :-1]
        out = chunked_mol_loss(h, self.weight, b["target_ids"], b["mask"], b.get(C.TOPK_IDS), b.get(C.TOPK_PROBS),
                               b.get(C.RESIDUAL), w_ce, w_kl, chunk_size=t.loss_chunk)
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
    seams: irrelevant for timing, which is all these rows are for.
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
                    C.RESIDUAL: seqs.teacher_residual[p:p + length - 1].astype(np.float32)})
    return out


def reader_pass(cache_dir: Path, k: int, micro_batch: int) -> int:
    """The trainer's data path over the whole train split: TeacherCache.load + collate. Returns tokens."""
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


_CHILD_SETUPS: dict[str, Callable[..., Callable[[], Any]]] = {"loss": _loss_child, "stage2": _stage2_child}


# --------------------------------------------------------------------------- Stage 1 (real model)


def cache_table(rows: list[dict], labels: list[tuple], k: int, vocab: int):
    """Cache rows + exact labels (ids, probs, residual) -> the Arrow table Stage 1 would write for them."""
    out = []
    for r, (ids, probs, resid) in zip(rows, labels):
        sid, codes, sres = C.encode_labels(ids, probs, resid, vocab)
        out.append({**{c: r[c] for c in (C.SEQ_ID, C.CORPUS, C.SUBSET, C.INPUT_IDS)}, C.SPLIT: "train",
                    C.TOPK_IDS: sid, C.TOPK_PROBS: codes, C.RESIDUAL: sres})
    return C.rows_to_table(out, C.arrow_schema(k, vocab))


def bench_stage1(model, tokenizer, rows: list[dict], k: int, chunk: int, zstd_level: int, vocab: int,
                 workdir: Path, sz: BenchSizes) -> dict:
    """Stage 1's per-batch work (teacher_labels, then the shard write) against a bare forward pass."""
    from .teacher import teacher_labels

    device = next(model.parameters()).device
    seqs = [r[C.INPUT_IDS].tolist() for r in rows]
    x = torch.tensor(seqs, device=device)
    shard = workdir / "stage1-shard.parquet"

    @torch.no_grad()
    def bare():
        model(input_ids=x).logits

    def stage1():
        t0 = time.perf_counter()
        labels = teacher_labels(model, seqs, k, chunk, tokenizer.pad_token_id, device)
        t1 = time.perf_counter()
        C.write_shard(shard, cache_table(rows, labels, k, vocab), zstd_level)
        return {"labels": t1 - t0, "write": time.perf_counter() - t1}

    t = interleaved({"bare": bare, "stage1": stage1}, sz.reps, sz.warmup)
    tokens = int(x.numel())
    return {"batch": x.shape[0], "seq_len": x.shape[1], "tokens": tokens, "times": t,
            "bare_tokens_per_s": tokens / med(t["bare"]), "stage1_tokens_per_s": tokens / med(t["stage1"]),
            "labels_tokens_per_s": tokens / med(t["stage1/labels"]),
            "ratio": med(t["bare"]) / med(t["stage1"]), "ratio_labels_only": med(t["bare"]) / med(t["stage1/labels"])}


# --------------------------------------------------------------------------- storage study


@dataclass(frozen=True)
class StorageVariant:
    """One way to store the teacher columns, as changes to the current schema (mol.cache's, v2)."""

    name: str
    probs: str = "u10_sqrt"      # fp16 | logp_fp16 | u8_sqrt | u10_sqrt | u12_sqrt (in uint16) | u8_log
    resid: str = "fp16"          # fp32 | fp16 | none (recomputed as 1 - sum of the stored probs)
    ids_order: str = "asc"       # desc (most probable first) | asc | asc_gap (first id, then gaps)
    zstd: Optional[int] = None   # None: the config's teacher.zstd_level, as Stage 1 writes
    encodings: tuple = ()        # ((column, parquet encoding), ...) replacing the current one for its values
    current: bool = False        # written and read by mol.cache itself (encode_labels, write_shard, decode_probs)


_U8_LOG_STEP = 20.0 / 255  # log-prob grid: p in [2e-9, 1], relative step 8%
# sqrt(p) on a uniform grid: absolute error in p ~ sqrt(p) / levels, finest where the mass is
_SQRT_LEVELS = {"u8_sqrt": 255, "u10_sqrt": C.PROB_LEVELS, "u12_sqrt": 4095}
_IDS, _PROBS, _RES = C.TOPK_IDS, C.TOPK_PROBS, C.RESIDUAL
_BSS, _DELTA = "BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED"

_PLAIN = "PLAIN"

# The first entry is the current schema; every other one names what it changes relative to it
# (encodings too: a column not listed keeps the encoding mol.cache gives it).
_SCHEMA1 = dict(probs="fp16", resid="fp32", ids_order="desc")
STORAGE_VARIANTS = [
    StorageVariant("current", current=True),
    StorageVariant("PLAIN ids + probs", encodings=((_IDS, _PLAIN), (_PROBS, _PLAIN))),
    StorageVariant("PLAIN ids", encodings=((_IDS, _PLAIN),)),
    StorageVariant("PLAIN probs", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("DELTA_BINARY_PACKED ids", encodings=((_IDS, _DELTA),)),
    StorageVariant("zstd 3", zstd=3),
    StorageVariant("zstd 9", zstd=9),
    StorageVariant("zstd 22", zstd=22),
    StorageVariant("ids most probable first", ids_order="desc"),
    StorageVariant("ids as gaps (first id, then differences)", ids_order="asc_gap"),
    StorageVariant("probs fp16", probs="fp16"),
    StorageVariant("probs fp16 log-probs", probs="logp_fp16"),
    StorageVariant("probs uint12 sqrt(p) (uint16)", probs="u12_sqrt"),
    StorageVariant("probs uint8 sqrt(p)", probs="u8_sqrt", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("probs uint8 log p grid", probs="u8_log", encodings=((_PROBS, _PLAIN),)),
    StorageVariant("residual fp32", resid="fp32"),
    StorageVariant("no residual (1 - sum probs)", resid="none"),
    StorageVariant("schema 1: ids most probable first, fp16 probs, fp32 residual", **_SCHEMA1),
    StorageVariant("schema 1 with PLAIN encodings, zstd 6", **_SCHEMA1, zstd=6,
                   encodings=((_IDS, _PLAIN), (_PROBS, _PLAIN))),
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
    stored_ids = ids.copy()
    if v.ids_order == "asc_gap":
        stored_ids[:, 1:] = np.diff(ids, axis=1)
    p64 = probs.astype(np.float64)
    if v.probs == "fp16":
        sp = probs.astype(np.float16)
    elif v.probs == "logp_fp16":
        sp = np.log(np.maximum(p64, 1e-30)).astype(np.float16)
    elif v.probs in _SQRT_LEVELS:
        # never 0: a zero bucket would be floored at 1e-30 and cost the student's whole mass there
        top = _SQRT_LEVELS[v.probs]
        sp = np.clip(np.rint(np.sqrt(p64) * top), 1, top).astype(np.uint8 if top < 256 else np.uint16)
    elif v.probs == "u8_log":
        sp = np.clip(np.rint(-np.log(np.maximum(p64, 1e-30)) / _U8_LOG_STEP), 0, 255).astype(np.uint8)
    else:
        raise ValueError(v.probs)
    out = {_IDS: stored_ids.astype(id_dtype), _PROBS: sp}
    if v.resid == "fp32":
        out[_RES] = resid.astype(np.float32)
    elif v.resid == "fp16":
        out[_RES] = resid.astype(np.float16)
    return out


def decode_labels(v: StorageVariant, ids: np.ndarray, probs: np.ndarray, resid: Optional[np.ndarray]):
    """Stored column values -> (ids int64 [N, k], probs float64, residual float64), as a reader would."""
    ids = ids.astype(np.int64)
    if v.ids_order == "asc_gap":
        ids = np.cumsum(ids, axis=1)
    if v.current:
        p = C.decode_probs(probs).astype(np.float64)
    elif v.probs == "fp16":
        p = probs.astype(np.float64)
    elif v.probs == "logp_fp16":
        p = np.exp(probs.astype(np.float64))
    elif v.probs in _SQRT_LEVELS:
        p = (probs.astype(np.float64) / _SQRT_LEVELS[v.probs]) ** 2
    else:
        p = np.exp(-probs.astype(np.float64) * _U8_LOG_STEP)
    r = np.clip(1 - p.sum(1), 0, None) if resid is None else resid.astype(np.float64)
    return ids, p, r


def write_variant(v: StorageVariant, path: Path, rows: list[dict], labels: list[tuple], k: int, vocab: int,
                  zstd_level: int, base_encodings: dict) -> float:
    """rows: cache rows (input_ids etc.); labels: exact (ids, probs fp32, resid fp32) per row;
    zstd_level / base_encodings: the current schema's, which the variant changes.
    Returns the seconds spent in the Parquet write itself (encoding + compression + I/O)."""
    level = zstd_level if v.zstd is None else v.zstd
    if v.current:
        table = cache_table(rows, labels, k, vocab)
        t0 = time.perf_counter()
        C.write_shard(path, table, level)
        return time.perf_counter() - t0
    id_dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    ids = np.concatenate([x[0] for x in labels])
    probs = np.concatenate([x[1] for x in labels])
    resid = np.concatenate([x[2] for x in labels])
    enc = encode_labels(v, ids, probs, resid, id_dtype)
    positions = [len(x[2]) for x in labels]
    tok_off = np.concatenate([[0], np.cumsum([len(r[C.INPUT_IDS]) for r in rows])]).astype(np.int32)
    cols = {
        C.SEQ_ID: pa.array([r[C.SEQ_ID] for r in rows], pa.int64()),
        C.CORPUS: pa.array([r[C.CORPUS] for r in rows], pa.string()),
        C.SUBSET: pa.array([r[C.SUBSET] for r in rows], pa.string()),
        C.SPLIT: pa.array(["train"] * len(rows), pa.string()),
        C.INPUT_IDS: pa.ListArray.from_arrays(
            pa.array(tok_off), pa.array(np.concatenate([r[C.INPUT_IDS] for r in rows]).astype(id_dtype))),
        _IDS: _nested(enc[_IDS], k, positions),
        _PROBS: _nested(enc[_PROBS], k, positions),
    }
    if _RES in enc:
        offsets = np.concatenate([[0], np.cumsum(positions)]).astype(np.int32)
        cols[_RES] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(enc[_RES]))
    leaf = {_IDS: ".list.element.list.element", _PROBS: ".list.element.list.element", _RES: ".list.element"}
    table = pa.table(cols)
    t0 = time.perf_counter()
    encodings = {**base_encodings, **dict(v.encodings)}
    encodings = {col: e for col, e in encodings.items() if col in cols}
    pq.write_table(table, path, compression="zstd", compression_level=level,
                   use_dictionary=[C.CORPUS, C.SUBSET, C.SPLIT], write_statistics=[C.SEQ_ID],
                   column_encoding={col + leaf[col]: e for col, e in encodings.items()} or None)
    return time.perf_counter() - t0


def leaf_encodings(path: Path) -> dict:
    """The value encoding of each teacher column in a shard: what mol.cache chose, to build upon."""
    md = pq.ParquetFile(path).metadata.row_group(0)
    out = {}
    for c in range(md.num_columns):
        col = md.column(c)
        top = col.path_in_schema.split(".")[0]
        if top in (_IDS, _PROBS, _RES):
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
                  zstd_level: int, variants: list[StorageVariant] = STORAGE_VARIANTS) -> dict:
    """Bytes per token and KL fidelity of each storage variant on real teacher labels.

    variants[0] must be the current schema: the others are written as changes to what it wrote.

    Fidelity as in mol.teacher.measure_fidelity: probe student = teacher logits / 1.5, float64,
    |KL_trunc(stored labels) - KL_trunc(exact labels: the float64 teacher's probabilities of the
    same ids, residual 1 - their sum)| per position.
    """
    from .teacher import final_hidden, teacher_labels

    device = next(model.parameters()).device
    seqs = [r[C.INPUT_IDS].tolist() for r in rows]
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
            name = (f"current mol.cache schema: {t.field(_IDS).type.value_type.value_type} ids ({base.get(_IDS)}), "
                    f"{t.field(_PROBS).type.value_type.value_type} probs ({base.get(_PROBS)}), "
                    f"{t.field(_RES).type.value_type} residual ({base.get(_RES)}), zstd {zstd_level}")
        results.append({"name": name, "variant": dataclasses.asdict(v), "bytes": path.stat().st_size,
                        "write_us_per_token": seconds / tokens * 1e6,
                        "bytes_per_token": path.stat().st_size / tokens,
                        "column_bytes_per_token": {c: b / tokens for c, b in _column_bytes(path).items()}})
        decoded.append(read_variant(v, path))
        path.unlink()
    # the same content through this module's writer must give the current schema's bytes
    write_variant(StorageVariant("builder check"), workdir / "check.parquet", rows, labels, k, vocab, zstd_level, base)
    builder_bytes = (workdir / "check.parquet").stat().st_size
    (workdir / "check.parquet").unlink()
    if abs(builder_bytes - results[0]["bytes"]) > 0.01 * results[0]["bytes"]:
        log.warning("storage study: table builder gives %d bytes, mol.cache %d", builder_bytes, results[0]["bytes"])

    w = model.get_output_embeddings().weight.double()
    diffs: list[list[torch.Tensor]] = [[] for _ in variants]
    kl_exact_all = []
    pos = 0
    for s in seqs:
        x = torch.tensor([s], device=device)
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


FIGURE_IDS = ("stage1_vs_forward", "cache_bytes_per_token", "mol_vs_ce_step_time", "mol_vs_ce_peak_memory",
              "cache_vs_online_teacher_step_time", "loss_path_memory_vs_naive", "reader_vs_training_tokens_per_s")


def run_all(cfg: MolConfig, *, quick: bool = False, workdir: Optional[Path] = None, threads: Optional[int] = None,
            section: Callable[[str], None] = lambda name: None, make_bar=None) -> dict:
    """Every measurement of the benchmark; returns {"meta", "figures", "storage", "scaling"}.

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
                              vocab, workdir, sz)
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

        enter("stage 2 steps")
        s2 = Stage2(cfg, model_path, device, k)
        mb = cfg.train.micro_batch
        rows = stage2_rows(train_seqs, mb)
        reader_tokens = []

        def reader():
            reader_tokens.append(reader_pass(cache_dir, k, mb))

        t2 = interleaved({"ce": lambda: s2.step(rows, "ce"), "mol": lambda: s2.step(rows, "mol"),
                          "online": lambda: s2.online_step(rows), "reader": reader}, sz.reps, sz.warmup)
        step_tokens = sum(len(r[C.INPUT_IDS]) for r in rows)
        stage2 = {"micro_batch": mb, "seq_len": max(len(r[C.INPUT_IDS]) for r in rows), "tokens": step_tokens,
                  "times": t2, "ratio_mol_ce": med(t2["mol"]) / med(t2["ce"]),
                  "ratio_mol_online": med(t2["mol"]) / med(t2["online"]),
                  "training_tokens_per_s": step_tokens / med(t2["mol"]),
                  "reader_tokens": reader_tokens[-1], "reader_tokens_per_s": reader_tokens[-1] / med(t2["reader"])}
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
        del s2
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

    cur = storage["variants"][0]
    best = storage["best_meeting_fidelity"]
    gb = 1 / 2**30
    figures = [
        _figure("stage1_vs_forward", "Stage 1 tokens/s ÷ bare forward tokens/s", stage1["ratio"], ">=", 0.92,
                f"{stage1['ratio']:.3f} ({stage1['stage1_tokens_per_s']:.0f} vs {stage1['bare_tokens_per_s']:.0f} tok/s;"
                f" labels alone {stage1['ratio_labels_only']:.3f}; "
                f"{_round_range(stage1['times']['bare'], stage1['times']['stage1'])})", stage1),
        _figure("cache_bytes_per_token", f"cache bytes/token on disk, k = {k} (current schema)",
                cur["bytes_per_token"], "<=", 80.0,
                f"{cur['bytes_per_token']:.1f} B/token (|ΔKL| mean {cur['kl_abs_mean']:.1e}); "
                f"best variant with |ΔKL| ≤ 1e-3: "
                + (f"{best['bytes_per_token']:.1f} ({best['name']})" if best else "none"),
                {"current": cur, "best": best, "cache_manifest_bytes_per_token": meta["cache_bytes_per_token"]},
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
        _figure("reader_vs_training_tokens_per_s", "cache reader tokens/s ÷ training tokens/s",
                stage2["reader_over_training"], ">=", 20.0,
                f"{stage2['reader_over_training']:.0f} ({stage2['reader_tokens_per_s']:.0f} vs "
                f"{stage2['training_tokens_per_s']:.0f} tok/s)",
                {"reader_s": t2["reader"], "reader_tokens": stage2["reader_tokens"], "mol_s": t2["mol"]}),
    ]
    enter("")
    meta["seconds"] = time.time() - t_start
    return {"meta": meta, "figures": figures, "storage": storage,
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
