"""The whole run: every measurement in order (:data:`SECTIONS`), one JSON-able dict."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import cache as C
from ..config import MolConfig, config_to_dict, load_config
from ..machine import machine_info, torch_threads
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


@dataclass
class _Inputs:
    """What every section measures on: the config's cache, model and tokenizer, its train split."""

    cache_dir: Path
    cache: C.TeacherCache
    model_path: Path
    tokenizer: object
    train_seqs: C.Sequences
    device: torch.device

    @property
    def k(self) -> int:
        return self.cache.k

    @property
    def vocab(self) -> int:
        return self.cache.vocab_size


class _Clock:
    """Seconds per section: `enter(name)` ends the section before and starts `name` ("" ends the last)."""

    def __init__(self, section: Callable[[str], None]):
        self.section, self.seconds = section, {}
        self.marks = [("", time.time())]

    def enter(self, name: str) -> None:
        assert not name or name in SECTIONS, name
        prev, t0 = self.marks[-1]
        if prev:
            self.seconds[prev] = time.time() - t0
        self.marks.append((name, time.time()))
        if name:
            self.section(name)


def _inputs(cfg: MolConfig, device: torch.device, make_bar) -> _Inputs:
    from ..model import load_tokenizer, resolve_model_path

    cache_dir = ensure_cache(cfg, make_bar)
    cache = C.TeacherCache(cache_dir)
    model_path = resolve_model_path(cfg.model.name)
    return _Inputs(cache_dir, cache, model_path, load_tokenizer(model_path), cache.load("train"), device)


def _teacher_sections(cfg: MolConfig, x: _Inputs, sz, workdir: Path, quick: bool, threads: Optional[int],
                      clock: _Clock) -> tuple[dict, dict, dict]:
    """The sections that hold the real teacher: Stage 1 against a bare forward, the vLLM teacher,
    the storage variants. Returns (stage1, vllm, storage)."""
    from ..model import load_model

    clock.enter("stage 1 vs bare forward")
    teacher = load_model(x.model_path, cfg.model, device=x.device).eval()
    seqs = x.train_seqs
    full_len = int(np.max(np.diff(seqs.tok_off)))
    full_rows = [seqs.row(i) for i in range(len(seqs)) if seqs.tok_off[i + 1] - seqs.tok_off[i] == full_len]
    s1_rows = full_rows[:cfg.teacher.batch_size]
    stage1 = bench_stage1(teacher, x.tokenizer, s1_rows, x.k, cfg.teacher.chunk_positions, cfg.teacher.zstd_level,
                          x.vocab, workdir, sz, cfg.teacher.writer_threads, C.row_group_rows(cfg))
    log.info("stage 1: %.3f of a bare forward (labels only %.3f)", stage1["ratio"], stage1["ratio_labels_only"])

    clock.enter("vllm teacher")
    if quick:
        vllm = {"skipped": "--quick (tests/test_vllm_teacher.py runs this measurement on the tiny model)"}
    else:
        vllm = bench_vllm(x.model_path, s1_rows, k=x.k, chunk=cfg.teacher.chunk_positions, dtype=cfg.model.dtype,
                          pad_id=x.tokenizer.pad_token_id, reps=sz.reps, warmup=sz.warmup,
                          engine_kwargs=cfg.teacher.vllm_kwargs, threads=threads)
    if "skipped" not in vllm:
        log.info("vllm stage 1: %.3f of its bare prompt pass, %.3f of the transformers backend",
                 vllm["ratio_stage1_vs_bare"], vllm["ratio_stage1_vs_transformers"])

    clock.enter("storage variants")
    dom = [r for r in full_rows if r[C.CORPUS] == "domain"]
    gen = [r for r in full_rows if r[C.CORPUS] == "general"]
    half = sz.storage_sequences // 2
    st_rows = dom[:half] + gen[:sz.storage_sequences - min(half, len(dom))]
    storage = storage_study(teacher, x.tokenizer, st_rows, x.k, cfg.teacher.chunk_positions, x.vocab, workdir,
                            cfg.teacher.zstd_level)
    storage.update(best_storage(storage))
    del teacher
    gc.collect()
    return stage1, vllm, storage


def _stage2_sections(cfg: MolConfig, x: _Inputs, sz, clock: _Clock) -> dict:
    """Stage 2's steps, the integrity checks, the step ratio against length and Stage 2's peak memory."""
    clock.enter("stage 2 steps")
    s2 = Stage2(cfg, x.model_path, x.device, x.k)
    out = {"stage2": stage2_steps(s2, x.train_seqs, x.cache_dir, sz)}

    clock.enter("integrity checks")
    out["checks"] = checks_cost(x.cache_dir, x.k, cfg.train.micro_batch, sz.reps, sz.warmup,
                                cfg.train.reader_cache_mb << 20)

    clock.enter("stage 2 step ratio vs length")
    out["step_scaling"] = stage2_step_ratio(s2, x.train_seqs, sz)
    del s2  # the student's memory back before the peak-memory children run
    gc.collect()

    clock.enter("stage 2 peak memory")
    out["stage2_mem"] = stage2_peak_memory(cfg, x.model_path, x.cache_dir, sz)
    return out


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
    from ..model import pick_device

    t_start = time.time()
    # the thread count (also on an error before any measurement) and the temp folder are given back
    with contextlib.ExitStack() as scope:
        scope.enter_context(torch_threads(threads))
        if workdir is None:
            workdir = Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="mol-bench-")))
        sz = dataclasses.replace(QUICK if quick else FULL, threads=torch.get_num_threads())
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = quick_config(cfg, workdir / "cache") if quick else load_config(data=config_to_dict(cfg))
        cfg.train.finetune = "lora"  # the online teacher is the student with its adapter disabled
        device = pick_device(cfg.model.device)
        clock = _Clock(section)
        meta = {"machine": machine_info(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "section_seconds": clock.seconds, "quick": quick, "device": str(device), "model": cfg.model.name,
                "lora": {"r": cfg.train.lora.r, "alpha": cfg.train.lora.alpha},
                "sizes": dataclasses.asdict(sz), "loss_chunk": cfg.train.loss_chunk}
        clock.enter("teacher cache")
        x = _inputs(cfg, device, make_bar)
        meta.update(cache_dir=str(x.cache_dir), k=x.k, vocab=x.vocab, model_path=str(x.model_path),
                    cache_bytes_per_token=x.cache.totals["bytes_per_token"],
                    cache_fidelity=x.cache.manifest.get("fidelity"))
        stage1, vllm, storage = _teacher_sections(cfg, x, sz, workdir, quick, threads, clock)

        clock.enter("zstd levels")
        zstd = zstd_levels_study(x.cache, x.vocab, sz.zstd_levels, cfg.teacher.zstd_level, workdir, sz)
        log.info("zstd levels: %s", ", ".join(f"{r['level']}: {r['bytes_per_token']:.1f} B/token "
                                             f"{r['writer_tokens_per_s'] / 1e3:.0f}k tok/s" for r in zstd["levels"]))

        clock.enter("stage 1 at scale (stub teacher)")
        # the stub teacher hands out the cache's labels (the real model's)
        at_scale = stage1_pipeline(cfg, x.model_path, x.tokenizer, x.cache, workdir, sz)
        s2 = _stage2_sections(cfg, x, sz, clock)

        clock.enter("loss path peak memory")
        loss_mem = loss_path_memory(sz, cfg.train.loss_chunk)
        headline = loss_path_headline(sz, cfg.train.loss_chunk, loss_mem)

        clock.enter("loss path time")
        loss_scaling = loss_path_scaling(sz, cfg.train.loss_chunk, loss_mem)

    figures = build_figures(stage1, at_scale, storage, s2["stage2"], s2["stage2_mem"], headline, x.k,
                            meta["cache_bytes_per_token"], vllm, s2["checks"])
    clock.enter("")
    meta["seconds"] = time.time() - t_start
    return {"meta": meta, "figures": figures, "storage": storage, "zstd_levels": zstd, "stage1_at_scale": at_scale,
            "vllm": vllm,
            "scaling": {"loss_path": loss_scaling, "step_ratio": s2["step_scaling"]}}
