"""Real-shape benchmark: random-initialized Qwen3-shaped models, Stage 1 and Stage 2 as the product
runs them, on whatever device the model lands on.

Every GPU figure in the docs (≈25 GB bf16 LoRA and ≈14.3 GB nf4 QLoRA at Qwen3-8B × 8192 tokens, a
stated 10,000 Stage 1 tokens/s) is arithmetic; this measures them. A shape (:class:`Shape`) is
built from a ``transformers.Qwen3Config`` with random weights (nothing to download), saved with a
word-level tokenizer of the shape's vocabulary into a work folder, and from there every section
goes through the product's own code: ``mol.model.load_model`` (bf16 on CUDA, fp32 on CPU; nf4
through its bitsandbytes config), ``mol.labels.teacher_labels`` and Stage 1's per-shard work
(``mol.bench.stage1.bench_stage1``), the trainer's student (``mol.train.build_student``: LoRA r 64
on the config's target modules, gradient checkpointing) and micro-step (``mol.bench.stage2.Stage2``:
collate + chunked MoL loss + backward), the trainer's optimizer (``make_optimizer``, adamw8bit too)
and the chunked loss against the naive one (``mol.bench.loss_path``).

Sections fail soft: each runs under a time guard, and an exception (an OOM included) becomes
``{"error": ..., "seconds": ...}`` in its record while the next section still runs. Peak memory is
``torch.cuda.max_memory_allocated`` after a reset on CUDA (what the docs' arithmetic predicts) and
the process's RSS high-water mark after a reset on CPU (``mol.bench.timing.measure_peak``). The
report (JSON + Markdown beside the docs' arithmetic) is :mod:`.shapes_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """A model shape to benchmark and the batch sizes it runs at."""

    name: str
    """What --shape calls it."""
    hidden: int
    """Hidden size H (the residual stream's width)."""
    layers: int
    """Decoder layers."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (grouped-query attention)."""
    head_dim: int
    """Width of one head; heads × head_dim may differ from H (Qwen3-0.6B: 16 × 128 = 2048 vs 1024)."""
    mlp: int
    """MLP intermediate size (gate/up out, down in)."""
    vocab: int
    """Vocabulary V: embeddings [V, H], output layer [V, H], the synthetic tokenizer's size."""
    tied: bool
    """Output layer shares the input embeddings' weight."""
    seq_len: int
    """Tokens per Stage 2 sequence and per Stage 1 sequence; the loss path runs at seq_len × V."""
    stage1_batch: int
    """Sequences per Stage 1 batch (the bare forward runs the same batch)."""
    micro_batch: int
    """Sequences per Stage 2 micro-step (domain and general alternating)."""
    reps: int
    """Timed rounds per interleaved comparison, after `warmup` untimed ones."""
    warmup: int = 1

    def qwen3_config(self, dtype: torch.dtype):
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.mlp,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=max(self.seq_len, 40960), tie_word_embeddings=self.tied,
                           rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=0,
                           pad_token_id=0, dtype=dtype)

    def parameters(self) -> int:
        """Parameter count from the shape alone (checked against the built model): embeddings, the
        output layer unless tied, per layer q/k/v/o + MLP + two RMSNorms + q/k norms, final norm."""
        H, A, K, D = self.hidden, self.heads, self.kv_heads, self.head_dim
        layer = H * A * D + 2 * H * K * D + A * D * H + 3 * H * self.mlp + 2 * H + 2 * D
        return self.vocab * H * (1 if self.tied else 2) + self.layers * layer + H


SHAPES = {
    # seconds on a CPU core: what the test and a laptop run
    "tiny": Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=4096, tied=True,
                  seq_len=128, stage1_batch=4, micro_batch=2, reps=2),
    "qwen3-0.6b": Shape("qwen3-0.6b", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, mlp=3072,
                        vocab=151936, tied=True, seq_len=8192, stage1_batch=2, micro_batch=1, reps=3),
    "qwen3-8b": Shape("qwen3-8b", hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=12288,
                      vocab=151936, tied=False, seq_len=8192, stage1_batch=2, micro_batch=1, reps=3),
}

SECTIONS = ("model folder", "stage 1 vs bare forward", "stage 2", "stage 2 nf4", "loss path")
"""Each shape's sections in order; each is recorded on its own (figures, an error or a skip)."""


class SectionTimeout(Exception):
    """A section ran past its share of --time-limit."""


@contextlib.contextmanager
def time_guard(seconds: float):
    """Raise SectionTimeout in this (main) thread after `seconds`. A torch op already running is not
    interrupted: the signal lands when it returns, which on a GPU is the next synchronisation."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"ran past its time limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    from ..machine import machine_info

    m = machine_info()
    return f"{m['cpu']} ({torch.get_num_threads()} torch threads of {m['usable_cores']} cores)"


def peak_memory(device: torch.device, work: Callable[[], object]) -> dict:
    """Run `work` once and measure its peak: on CUDA torch.cuda.max_memory_allocated after a reset
    (the model's weights and everything else already allocated count: the GPU's total), on CPU the
    process's RSS high-water mark after a reset (measure_peak: libraries and the model count too)."""
    from .timing import measure_peak

    gc.collect()
    if device.type != "cuda":
        m = measure_peak(work)
        return {"peak_bytes": m["high_water_bytes"], "above_start_bytes": m["peak_bytes"],
                "start_bytes": m["rss_before_bytes"], "seconds": m["seconds"], "peak_reset": m["peak_reset"],
                "method": "process RSS high-water mark (VmHWM after a reset)"}
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    work()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "above_start_bytes": peak - start, "start_bytes": start, "seconds": seconds,
            "reserved_peak_bytes": torch.cuda.max_memory_reserved(device),
            "method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats"}


# --------------------------------------------------------------------------- the model folder


def synthetic_tokenizer(vocab: int):
    """A word-level tokenizer of exactly `vocab` ids: "<|endoftext|>" (0, eos and pad), "<unk>" (1),
    then the words t2 … t{vocab-1}, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")


def synthetic_sequences(tokenizer, n: int, seq_len: int, seed: int = 0) -> list[np.ndarray]:
    """n token sequences of seq_len: random words of the tokenizer's vocabulary as text, tokenized."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(f"t{i}" for i in rng.integers(2, len(tokenizer), seq_len)) for _ in range(n)]
    return [np.asarray(x, dtype=np.int64) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _model_bytes_fit(shape: Shape, device: torch.device, dtype: torch.dtype, folder: Path) -> None:
    from ..machine import mem_available

    need = shape.parameters() * torch.finfo(dtype).bits // 8
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else mem_available() // 2
    where = "free GPU memory" if device.type == "cuda" else "half of MemAvailable"
    if need > have:
        raise MemoryError(f"{shape.name}: {need / 1e9:.1f} GB of {dtype} weights > {have / 1e9:.1f} GB {where}")
    disk = shutil.disk_usage(folder.parent).free
    if need > disk * 0.9:
        raise OSError(f"{shape.name}: {need / 1e9:.1f} GB of weights to save, {disk / 1e9:.1f} GB free under {folder.parent}")


def build_model_folder(shape: Shape, folder: Path, device: torch.device) -> dict:
    """Random weights of the shape in the compute dtype (bf16 on CUDA, fp32 on CPU), initialised on
    `device` itself (an 8B model never exists as an fp32 CPU copy), saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from ..model import pick_dtype

    dtype = pick_dtype("auto", device)
    folder.mkdir(parents=True, exist_ok=True)
    _model_bytes_fit(shape, device, dtype, folder)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.qwen3_config(dtype), dtype=dtype)
    built = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    if n != shape.parameters():
        raise AssertionError(f"{shape.name}: built {n} parameters, the shape says {shape.parameters()}")
    t0 = time.perf_counter()
    model.save_pretrained(folder)
    synthetic_tokenizer(shape.vocab).save_pretrained(folder)
    saved = time.perf_counter() - t0
    out = {"parameters": n, "dtype": str(dtype).removeprefix("torch."), "device": str(model.device),
           "build_seconds": built, "save_seconds": saved,
           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    del model
    return out


# --------------------------------------------------------------------------- the sections


def _mol_config(shape: Shape, folder: Path, device: torch.device, seq_len: int, **model):
    """The product's config for this shape: defaults (top-k 31, loss chunk 1024, LoRA r 64 on q/k/v/o/
    gate/up/down, α 0.01) with gradient checkpointing, the shape's micro-batch, the model folder."""
    from ..config import load_config

    return load_config(data={
        "model": {"name": str(folder), "device": str(device), **model},
        # a source the config requires; nothing reads it (the rows are synthetic)
        "data": {"max_seq_len": seq_len, "sources": [{"path": str(folder / "unread.jsonl"), "corpus": "general",
                                                          "subset": "synthetic"}]},
        "train": {"finetune": "lora", "gradient_checkpointing": True, "micro_batch": shape.micro_batch,
                  "global_batch": shape.micro_batch, "lora": {"r": 64, "alpha": 128}},
    })


class _Synced:
    """The model, its calls followed by a CUDA synchronisation: bench_stage1 times a bare forward
    that returns as soon as its kernels are queued, which on a GPU measures nothing."""

    def __init__(self, model):
        self._model = model

    def __call__(self, *a, **kw):
        out = self._model(*a, **kw)
        _sync(self._model.device)
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


def section_stage1(shape: Shape, folder: Path, seq_len: int, workdir: Path, state: dict) -> dict:
    """Stage 1's per-shard work (teacher_labels + encode + the shard writer) ÷ a bare forward of the
    same batch, interleaved (mol.bench.stage1.bench_stage1); also labels the Stage 2 rows."""
    from .. import cache as C
    from ..labels import teacher_labels
    from ..model import load_model, load_tokenizer
    from .sizes import BenchSizes
    from .stage1 import bench_stage1

    cfg = _mol_config(shape, folder, state["device"], seq_len)
    tok = load_tokenizer(folder)
    model = load_model(folder, cfg.model, device=state["device"]).eval()
    device = model.device
    seqs = synthetic_sequences(tok, shape.stage1_batch, seq_len, seed=1)
    rows = [{C.SEQ_ID: i, C.CORPUS: "general", C.SUBSET: "synthetic", C.INPUT_IDS: s} for i, s in enumerate(seqs)]
    sz = BenchSizes(reps=shape.reps, warmup=shape.warmup)
    t = cfg.teacher
    s1 = bench_stage1(_Synced(model) if device.type == "cuda" else model, tok, rows, t.top_k, t.chunk_positions,
                      t.zstd_level, shape.vocab, workdir, sz, t.writer_threads, C.row_group_rows(cfg))
    # the Stage 2 rows: the same labeller's labels (what the cache would hand the trainer)
    s2_seqs = synthetic_sequences(tok, shape.micro_batch, seq_len, seed=2)
    labels = teacher_labels(model, s2_seqs, t.top_k, t.chunk_positions, tok.pad_token_id, device)
    state["rows"] = stage2_rows(s2_seqs, labels)
    del model
    out = {k: s1[k] for k in ("batch", "seq_len", "tokens", "bare_tokens_per_s", "stage1_tokens_per_s",
                              "labels_tokens_per_s", "ratio", "ratio_labels_only", "ratio_serial_write",
                              "encode_share", "writer_threads", "zstd_level")}
    return {"device": str(device), "k": t.top_k, "chunk_positions": t.chunk_positions, **out, "times": s1["times"]}


def stage2_rows(seqs: list[np.ndarray], labels: Optional[list[tuple]], k: int = 31, vocab: int = 0,
                seed: int = 3) -> list[dict]:
    """Cache-like rows for Stage2.step, domain and general alternating; with no labels (Stage 1's
    section failed) random ones of the right shapes: the step's cost does not depend on their values."""
    from .. import cache as C

    rng = np.random.default_rng(seed)
    rows = []
    for i, s in enumerate(seqs):
        if labels is not None:
            ids, probs, resid = labels[i]
        else:
            n, stride = len(s) - 1, vocab // k
            # one id per disjoint stride-wide window: distinct within a position, as a real top-k is
            ids = np.sort((rng.integers(0, vocab, (n, 1)) + np.arange(k) * stride
                           + rng.integers(0, stride, (n, k))) % vocab, axis=1)
            p = rng.random((n, k)).astype(np.float32)
            resid = rng.uniform(0.05, 0.5, n).astype(np.float32)
            probs = p / p.sum(1, keepdims=True) * (1 - resid)[:, None]
        rows.append({C.SEQ_ID: i, C.CORPUS: "domain" if i % 2 == 0 else "general", C.SUBSET: "synthetic",
                     C.INPUT_IDS: s, C.TOPK_IDS: ids, C.TOPK_PROBS: probs, C.RESIDUAL: resid})
    return rows


def _rows(shape: Shape, folder: Path, seq_len: int, state: dict) -> tuple[list[dict], str]:
    if "rows" in state:
        return state["rows"], "teacher_labels of the base model (Stage 1's labeller)"
    from ..model import load_tokenizer

    seqs = synthetic_sequences(load_tokenizer(folder), shape.micro_batch, seq_len, seed=2)
    return stage2_rows(seqs, None, vocab=shape.vocab), "random (the Stage 1 section did not label them)"


def _first_step(cfg, folder: Path, device: torch.device, rows: list[dict], optimizer: str):
    """The trainer's student and optimizer built and one MoL step + optimizer step taken; returns
    (Stage2, optimizer, seconds from the start of loading to the end of that first step)."""
    from ..train import make_optimizer
    from .stage2 import Stage2

    t0 = time.perf_counter()
    s2 = Stage2(cfg, folder, device, cfg.teacher.top_k)
    opt = make_optimizer(dataclasses.replace(cfg.train, optimizer=optimizer), s2.params)
    s2.step(rows, "mol")
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return s2, opt, time.perf_counter() - t0


def _full_step(s2, opt, rows: list[dict], mode: str) -> Callable[[], None]:
    def run():
        if mode == "online":
            s2.online_step(rows)
        else:
            s2.step(rows, mode)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def section_stage2(shape: Shape, folder: Path, seq_len: int, state: dict) -> dict:
    """The trainer's micro-step (forward + backward) for MoL, CE-only and an online teacher (the
    student with its adapter disabled), interleaved; then each mode's peak memory over a whole step,
    the optimizer's included; and the time from loading the model to the end of the first step."""
    from ..train import tensor_mb
    from .timing import interleaved, med

    device = state["device"]
    cfg = _mol_config(shape, folder, device, seq_len)
    rows, how = _rows(shape, folder, seq_len, state)
    s2, opt, first = _first_step(cfg, folder, device, rows, "adamw")
    device = s2.model.device

    def timed(fn):
        return lambda: (fn(), _sync(device))

    t = interleaved({"mol": timed(lambda: s2.step(rows, "mol")), "ce": timed(lambda: s2.step(rows, "ce")),
                     "online": timed(lambda: s2.online_step(rows))}, shape.reps, shape.warmup)
    mem = {m: peak_memory(device, _full_step(s2, opt, rows, m)) for m in ("mol", "ce", "online")}
    tokens = sum(len(r["input_ids"]) for r in rows)
    out = {"device": str(device), "dtype": str(next(s2.model.parameters()).dtype).removeprefix("torch."),
           "micro_batch": len(rows), "seq_len": seq_len, "tokens": tokens, "labels": how,
           "lora_r": cfg.train.lora.r, "gradient_checkpointing": cfg.train.gradient_checkpointing,
           "trainable_parameters": sum(p.numel() for p in s2.params), "student_tensor_mb": tensor_mb(s2.model),
           "time_to_first_step_s": first, "times": t,
           "step_s": {m: med(t[m]) for m in t}, "training_tokens_per_s": tokens / med(t["mol"]),
           "ratio_mol_ce": med(t["mol"]) / med(t["ce"]), "ratio_mol_online": med(t["mol"]) / med(t["online"]),
           "memory": mem, "memory_ratio_mol_ce": mem["mol"]["peak_bytes"] / mem["ce"]["peak_bytes"],
           "memory_ratio_mol_online": mem["mol"]["peak_bytes"] / mem["online"]["peak_bytes"]}
    del s2, opt
    return out


def section_nf4(shape: Shape, folder: Path, seq_len: int, state: dict) -> dict:
    """The nf4 student (model.quantization=nf4: the product's bitsandbytes load) with AdamW, then
    with adamw8bit: time to first step, the MoL micro-step, peak memory over a whole step each."""
    from ..train import tensor_mb
    from ..train import make_optimizer
    from .timing import interleaved, med

    device = state["device"]
    cfg = _mol_config(shape, folder, device, seq_len, quantization="nf4")
    rows, how = _rows(shape, folder, seq_len, state)
    s2, opt, first = _first_step(cfg, folder, device, rows, "adamw")
    device = s2.model.device
    t = interleaved({"mol": lambda: (s2.step(rows, "mol"), _sync(device))}, shape.reps, shape.warmup)
    out = {"device": str(device), "quantization": "nf4", "seq_len": seq_len, "micro_batch": len(rows),
           "labels": how, "student_tensor_mb": tensor_mb(s2.model), "time_to_first_step_s": first,
           "times": t, "mol_step_s": med(t["mol"]),
           "memory": {"adamw": peak_memory(device, _full_step(s2, opt, rows, "mol"))}}
    del opt
    _free(device)
    try:
        opt8 = make_optimizer(dataclasses.replace(cfg.train, optimizer="adamw8bit"), s2.params)
        _full_step(s2, opt8, rows, "mol")()  # its 8-bit states exist from the first step on
        out["memory"]["adamw8bit"] = peak_memory(device, _full_step(s2, opt8, rows, "mol"))
    except Exception as e:  # one optimizer failing keeps the other's figures
        out["memory"]["adamw8bit"] = {"error": repr(e)}
    return out


def section_loss_path(shape: Shape, seq_len: int, state: dict) -> dict:
    """The trainer's chunked MoL loss against the naive full-logits loss at seq_len × V with the
    shape's hidden size, forward + backward: peak memory and time of each. On CUDA in this process,
    in the compute dtype; on CPU in fp32, each in a fresh child process as `make bench` measures it
    (in this process the allocator would hand a variant memory an earlier one freed: no RSS growth).
    The naive one may not fit; its error is recorded beside the chunked figures."""
    from ..config import TrainConfig
    from ..machine import mem_available
    from ..model import pick_dtype
    from .loss_path import _loss_spec, loss_path_work, synthetic_loss_inputs
    from .timing import run_children

    device = state["device"]
    dtype = pick_dtype("auto", device)
    chunk = TrainConfig().loss_chunk
    out = {"device": str(device), "tokens": seq_len, "vocab": shape.vocab, "hidden": shape.hidden,
           "dtype": str(dtype).removeprefix("torch."), "chunk": chunk}
    if device.type == "cuda":
        inp = synthetic_loss_inputs(1, seq_len, shape.vocab, shape.hidden)
        inp = {k: (v.to(device, dtype) if k in ("hidden", "weight") else v.to(device)) for k, v in inp.items()}
    for variant in ("chunked", "naive"):
        try:
            if device.type == "cuda":
                work = loss_path_work(inp, variant, "mol", chunk)
                work()  # warm: kernels chosen, allocator primed
                out[variant] = peak_memory(device, work)
                continue
            # a conservative 8 fp32 [N, V] copies (logits, masked copy, log-softmaxes, their grads)
            if variant == "naive" and 8 * seq_len * shape.vocab * 4 > 0.55 * mem_available():
                raise MemoryError(f"naive loss at {seq_len} x {shape.vocab}: 8 fp32 copies do not fit in MemAvailable")
            m = run_children([_loss_spec(1, seq_len, shape.vocab, shape.hidden, variant, chunk)], 1,
                             torch.get_num_threads())[0]
            out[variant] = {"peak_bytes": m["high_water_bytes"], "above_start_bytes": m["peak_bytes"],
                            "start_bytes": m["rss_before_bytes"], "seconds": m["seconds"],
                            "peak_reset": m["peak_reset"],
                            "method": "a fresh child process's RSS high-water mark above its RSS before the work"}
        except Exception as e:
            out[variant] = {"error": repr(e)}
        _free(device)
    if "error" not in out["chunked"] and "error" not in out["naive"]:
        out["memory_ratio"] = out["chunked"]["above_start_bytes"] / max(out["naive"]["above_start_bytes"], 1)
        out["time_ratio"] = out["chunked"]["seconds"] / out["naive"]["seconds"]
    return out


# --------------------------------------------------------------------------- the run


def run_shape(shape: Shape, seq_len: int, workdir: Path, device: torch.device, deadline: float,
              sections_after: int, section: Callable[[str, str], None]) -> dict:
    """One shape's sections, each failing soft; `sections_after` sections of later shapes still
    need time, so each section gets what is left minus a few seconds for each of them."""
    folder = workdir / shape.name / "model"
    state = {"device": device}
    steps = {
        "model folder": lambda: build_model_folder(shape, folder, device),
        "stage 1 vs bare forward": lambda: section_stage1(shape, folder, seq_len, workdir / shape.name, state),
        "stage 2": lambda: section_stage2(shape, folder, seq_len, state),
        "stage 2 nf4": lambda: section_nf4(shape, folder, seq_len, state),
        "loss path": lambda: section_loss_path(shape, seq_len, state),
    }
    assert tuple(steps) == SECTIONS
    records = {}
    for i, name in enumerate(SECTIONS):
        section(shape.name, name)
        left = deadline - time.time()
        reserve = 5.0 * (sections_after + len(SECTIONS) - i - 1)
        if left <= 1:
            records[name] = {"skipped": "--time-limit reached before it started"}
            continue
        if name not in ("model folder", "loss path") and "parameters" not in records["model folder"]:
            records[name] = {"skipped": "no model folder (see its record)"}
            continue
        t0 = time.perf_counter()
        try:
            with time_guard(max(left - reserve, min(left, 10.0))):
                records[name] = steps[name]()
        except Exception as e:  # an OOM, a missing bitsandbytes, a timeout: this section's record only
            log.warning("%s / %s failed: %r", shape.name, name, e)
            records[name] = {"error": repr(e)}
        records[name]["seconds"] = time.perf_counter() - t0
        _free(device)
    shutil.rmtree(folder, ignore_errors=True)
    return records


def run_shapes(names: list[str], *, seq_len: Optional[int] = None, device: Optional[str] = None,
               time_limit: float = 480.0, workdir: Optional[Path] = None,
               section: Callable[[str, str], None] = lambda shape, name: None) -> dict:
    """Every section of every named shape; returns {"meta", "shapes": {name: {"shape", "seq_len",
    "sections": {section: record}}}}. seq_len overrides each shape's own; device "auto" (CUDA when
    present) or any torch device; time_limit bounds the whole run in seconds."""
    import datetime
    import tempfile

    from ..machine import machine_info
    from ..model import pick_device

    dev = pick_device(device or "auto")
    t_start = time.time()
    deadline = t_start + time_limit
    own = tempfile.TemporaryDirectory(prefix="mol-bench-shapes-") if workdir is None else None
    work = Path(own.name) if own else Path(workdir)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": str(dev),
            "device_name": device_name(dev), "machine": machine_info(), "time_limit_s": time_limit,
            "versions": _versions()}
    if dev.type == "cuda":
        meta["cuda_total_bytes"] = torch.cuda.get_device_properties(dev).total_memory
    shapes = {}
    try:
        for j, name in enumerate(names):
            shape = SHAPES[name]
            T = seq_len or shape.seq_len
            recs = run_shape(shape, T, work, dev, deadline, len(SECTIONS) * (len(names) - j - 1), section)
            shapes[name] = {"shape": dataclasses.asdict(shape), "parameters": shape.parameters(), "seq_len": T,
                            "sections": recs}
    finally:
        if own is not None:
            own.cleanup()
    meta["seconds"] = time.time() - t_start
    return {"meta": meta, "shapes": shapes}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
