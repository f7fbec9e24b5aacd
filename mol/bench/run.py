"""The whole run: every measurement in order (:data:`SECTIONS`), one JSON-able dict."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import cache as C
from ..config import MolConfig, config_to_dict, load_config
from ..machine import machine_info
from .checks import checks_cost
from .loss_path import loss_path_headline, loss_path_memory, loss_path_scaling
from .report import build_figures
from .sizes import FULL, QUICK, quick_config
from .stage1 import bench_stage1, stage1_pipeline
from .stage2 import Stage2, stage2_peak_memory, stage2_step_ratio, stage2_steps
from .storage import best_storage, storage_study, zstd_levels_study
from .vllm import bench_vllm

log = logging.getLogger(__name__)


SECTIONS = ("teacher cache", "stage 1 vs bare forward", "vllm teacher", "storage variants", "zstd levels",
            "stage 1 at scale (stub teacher)", "stage 2 steps", "integrity checks", "stage 2 step ratio vs length",
            "stage 2 peak memory",
            "loss path peak memory", "loss path time")
"""The parts of run_all in order; `section(name)` is called as each starts."""


def ensure_cache(cfg: MolConfig, make_bar=None) -> Path:
    """The config's teacher cache, built by the real Stage 1 when it is missing."""
    from ..teacher import run_teacher_pass

    cache_dir = C.resolve_cache_key(cfg).cache_dir
    if not (cache_dir / C.MANIFEST).is_file():
        log.info("no teacher cache at %s: running Stage 1 first", cache_dir)
        cache_dir, _ = run_teacher_pass(cfg, make_bar=make_bar)
    return cache_dir


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
    from ..model import load_model, load_tokenizer, pick_device, resolve_model_path

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
        vocab = cache.vocab_size
        model_path = resolve_model_path(cfg.model.name)
        tokenizer = load_tokenizer(model_path)
        train_seqs = cache.load("train")
        meta.update(cache_dir=str(cache_dir), k=k, vocab=vocab, model_path=str(model_path),
                    cache_bytes_per_token=cache.totals["bytes_per_token"],
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

        enter("vllm teacher")
        if quick:
            vllm = {"skipped": "--quick (tests/test_vllm_teacher.py runs this measurement on the tiny model)"}
        else:
            vllm = bench_vllm(model_path, s1_rows, k=k, chunk=cfg.teacher.chunk_positions, dtype=cfg.model.dtype,
                              pad_id=tokenizer.pad_token_id, reps=sz.reps, warmup=sz.warmup,
                              engine_kwargs=cfg.teacher.vllm_kwargs, threads=threads)
        if "skipped" not in vllm:
            log.info("vllm stage 1: %.3f of its bare prompt pass, %.3f of the transformers backend",
                     vllm["ratio_stage1_vs_bare"], vllm["ratio_stage1_vs_transformers"])

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
        stage2 = stage2_steps(s2, train_seqs, cache_dir, sz)

        enter("integrity checks")
        checks = checks_cost(cache_dir, k, cfg.train.micro_batch, sz.reps, sz.warmup, cfg.train.reader_cache_mb << 20)

        enter("stage 2 step ratio vs length")
        step_scaling = stage2_step_ratio(s2, train_seqs, sz)
        del s2  # the student's memory back before the peak-memory children run
        gc.collect()

        enter("stage 2 peak memory")
        stage2_mem = stage2_peak_memory(cfg, model_path, cache_dir, sz)

        enter("loss path peak memory")
        loss_mem = loss_path_memory(sz, cfg.train.loss_chunk)
        headline = loss_path_headline(sz, cfg.train.loss_chunk, loss_mem)

        enter("loss path time")
        loss_scaling = loss_path_scaling(sz, cfg.train.loss_chunk, loss_mem)
    finally:
        torch.set_num_threads(threads_before)
        if own_tmp is not None:
            own_tmp.cleanup()

    figures = build_figures(stage1, at_scale, storage, stage2, stage2_mem, headline, k, meta["cache_bytes_per_token"],
                            vllm, checks)
    enter("")
    meta["seconds"] = time.time() - t_start
    return {"meta": meta, "figures": figures, "storage": storage, "zstd_levels": zstd, "stage1_at_scale": at_scale,
            "vllm": vllm,
            "scaling": {"loss_path": loss_scaling, "step_ratio": step_scaling}}
