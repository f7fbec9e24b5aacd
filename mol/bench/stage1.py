"""Stage 1: its per-shard work with the real model against a bare forward pass, and the whole
pass at scale with an instant stub teacher.

The at-scale figure is absolute by design: the whole Stage 1 pipeline's tokens/s with an instant
stub teacher (:func:`stage1_pipeline`), the rate Stage 1 must sustain to keep up with a GPU
teacher. Its report says how busy the machine was meanwhile (other processes' cores, from
/proc/stat) and where the CPU went per thread, so a slow run on a shared machine can be told
from a slow pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import cache as C
from ..config import MolConfig, load_config
from ..spans import NO_SPANS, Spans
from .sizes import BenchSizes
from .timing import child_setup, interleaved, med, run_children

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Stage 1 (real model)


def shard_data(rows: list[dict], labels: Optional[list[tuple]], vocab: int, *, subset: Optional[str] = None,
               record: Optional[dict] = None) -> C.ShardData:
    """Cache rows + exact labels (ids, probs, residual per row, as the teacher gives them) -> the
    ShardData Stage 1 builds for them (C.shard_data: the codes, and, given a resume `record`, the
    residual summary and the Parquet metadata the pass writes with each shard)."""
    k = labels[0][0].shape[1] if labels else 0
    return C.shard_data(seq_id=np.array([r[C.SEQ_ID] for r in rows], dtype=np.int64), corpus=rows[0][C.CORPUS],
                        subset=subset or rows[0][C.SUBSET], splits=["train"] * len(rows),
                        rows=[np.asarray(r[C.INPUT_IDS]) for r in rows], labels=labels, k=k, vocab_size=vocab,
                        record=record)


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
    from ..labels import teacher_labels

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
    from ..synthetic import write_corpus

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


class _Timers(Spans):
    """Wall and thread-CPU seconds per named span (the pass's `Spans`), summed over calls and
    threads; also which OS thread id belongs to which Python thread (for _ThreadCPU)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acc: dict = defaultdict(lambda: {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0, "threads": set()})
        self.tids: dict[int, str] = {threading.get_native_id(): threading.current_thread().name}

    @contextlib.contextmanager
    def span(self, name: str):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            with self.lock:
                self.tids[threading.get_native_id()] = threading.current_thread().name
                x = self.acc[name]
                x["wall_s"] += dt
                x["cpu_s"] += dc
                x["calls"] += 1
                x["threads"].add(threading.current_thread().name.split("_")[0])

    def wrap(self, name: str, fn: Callable) -> Callable:
        """`fn`, each call timed as the span `name`."""
        def timed(*a, **kw):
            with self.span(name):
                return fn(*a, **kw)
        return timed

    def tokenizer(self, tok):
        return _TimedTokenizer(tok, self)

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
    """The packer's tokenizer, its __call__ (batch tokenization) and its chat template (the
    rendering of chat and QA records; a text record is rendered without it) timed."""

    def __init__(self, tok, timers: _Timers):
        self._tok = tok
        self._call = timers.wrap("tokenize", tok.__call__)
        self.apply_chat_template = timers.wrap("render (record_to_text)", tok.apply_chat_template)

    def __call__(self, *a, **kw):
        return self._call(*a, **kw)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def stage1_pipeline_config(cfg: MolConfig, model_path: Path, corpus: Path, cache_root: Path,
                           max_seq_len: int, rows_per_shard: int) -> dict:
    """A config for the whole Stage 1 over one synthetic general source: the defaults (writer
    threads, zstd level, batch size, segments) except sequence length, rows per shard, no fidelity."""
    return {"model": {"name": str(model_path), "chat_template_kwargs": cfg.model.chat_template_kwargs},
            "data": {"max_seq_len": max_seq_len,
                     "sources": [{"path": str(corpus), "corpus": "general", "subset": "synthetic"}]},
            "teacher": {"top_k": cfg.teacher.top_k, "rows_per_shard": rows_per_shard, "fidelity_sequences": 0,
                        "cache_root": str(cache_root)}}


@child_setup("stage1_pipeline")
def _stage1_pipeline_child(config: dict, pool: str, instrument: bool = False):
    """The whole Stage 1 (mol.teacher.run_teacher_pass) with the teacher replaced by an instant stub."""
    from .. import teacher

    cfg = load_config(data=config)
    with np.load(pool) as z:
        stub = make_stub_teacher({k: z[k] for k in z.files}, cfg.data.max_seq_len)
    timers = _Timers() if instrument else None
    if timers is not None:
        stub = timers.wrap("main: teacher stub", stub)

    def backend(*args):
        return None, stub

    def run() -> dict:
        marks = []
        sampler = _ThreadCPU() if timers is not None else contextlib.nullcontext()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with sampler:
            cache_dir, status = teacher.run_teacher_pass(
                cfg, make_bar=lambda total, desc: (lambda n: marks.append((time.perf_counter(), n))),
                backend=backend, spans=timers or NO_SPANS)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cache = C.TeacherCache(cache_dir)
        t = cache.totals
        out = {"status": status, "tokens": t["tokens"], "sequences": t["sequences"],
               "bytes": t["bytes"], "bytes_per_token": t["bytes_per_token"],
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
