"""`make scale`: both stages end to end at 1M, 10M and 30M tokens, with peak memory per stage.

The question is how Stage 1 and Stage 2 behave as the corpus grows, not how a model learns, so the
model is a tiny random Llama (1 layer, hidden 64) over a word-level tokenizer of the synthetic
corpus's own words (vocabulary 128): its forward pass is cheap enough that a 2-core CPU labels
30M tokens in minutes, and what grows with the corpus — reading, packing, encoding, writing, the
cache on disk, the training reader — is the real code at full size. Each stage runs as its own
process (`python -m stages.teacher_cache`, `python -m stages.train`), whose peak RSS comes from
the kernel (wait4), and whose time to the first optimizer step is measured from its start.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from .cache import TeacherCache, resolve_cache_key
from .config import load_config
from .run_folder import METRICS, read_metrics
from .stage_process import run_stage
from .synthetic import WORDS, write_corpus

log = logging.getLogger(__name__)

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "30M": 30_000_000}
SEQ_LEN = 512
VOCAB = 128


def build_model(out: Path) -> Path:
    """The tiny Llama and its word-level tokenizer (same bytes every time), saved as a model folder."""
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<unk>"]
    words = specials + sorted(set(WORDS) | {"Record", "."} | {str(d) for d in range(10)})
    assert len(words) <= VOCAB
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                                         tie_word_embeddings=True, eos_token_id=0, pad_token_id=0))
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)  # a spread-out teacher: non-trivial top-k and residual
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def _config(model: Path, work: Path, name: str, tokens: int) -> Path:
    data = {
        "model": {"name": str(model)},
        "data": {"max_seq_len": SEQ_LEN, "val_fraction": 0.01, "sources": [
            {"path": str(work / f"{name}-domain.jsonl"), "corpus": "domain", "subset": "synthetic_domain"},
            {"path": str(work / f"{name}-general.jsonl"), "corpus": "general", "subset": "synthetic_general"}]},
        # one sequence a row group, the layout the paper's 8192-token sequences get by default
        "teacher": {"top_k": 31, "batch_size": 32, "rows_per_shard": 64, "fidelity_sequences": 0, "chunk_positions": 16384,
                    "row_group_tokens": SEQ_LEN,
                    "cache_root": str(work / "caches")},
        "train": {"global_batch": 8, "micro_batch": 4, "max_steps": 3, "eval_every": 0, "lr": 1e-3,
                  "out_dir": str(work / "runs"), "run_name": name,
                  "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
        "eval": {"max_val_sequences": 1},
    }
    for corpus, seed in (("domain", 1), ("general", 2)):
        path = work / f"{name}-{corpus}.jsonl"
        if not path.is_file():
            # word-level tokens: one a word, one a digit, one a full stop (~1.05 a word)
            write_corpus(path, int(tokens / 2 * 1.3 / 1.05), seed=seed)
    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


def _first_step(metrics: Path):
    """Whether a training process has logged its first optimizer step (polled while it runs)."""
    return lambda: metrics.is_file() and '"type": "train"' in metrics.read_text()


def _run_stage(module: str, args: list[str], log_path: Path, first_step_file: Path | None = None) -> dict:
    """Run `python -m module args` (mol.stage_process); its wall time, its own peak RSS (VmHWM)
    and, for training, the seconds from its start until metrics.jsonl holds the first optimizer step."""
    done = run_stage(module, args, log_path, reached=_first_step(first_step_file) if first_step_file else None)
    return {"seconds": done.seconds, "peak_rss_mb": done.peak_rss_mb, "first_step_s": done.reached_s}


def run_scale(work: Path, sizes: dict[str, int] | None = None, progress=print) -> dict:
    sizes = sizes or SIZES
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / "model")
    rows = []
    for name, tokens in sizes.items():
        cfg = _config(model, work, name, tokens)
        progress(f"{name}: Stage 1")
        s1 = _run_stage("stages.teacher_cache", [str(cfg)], work / f"{name}-stage1.log")
        totals = TeacherCache(resolve_cache_key(load_config(cfg)).cache_dir).totals
        progress(f"{name}: Stage 2")
        run_dir = work / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        s2 = _run_stage("stages.train", [str(cfg)], work / f"{name}-stage2.log", run_dir / METRICS)
        metrics = read_metrics(run_dir)
        train_lines = [m for m in metrics if m["type"] == "train"]
        t = totals
        rows.append({
            "size": name, "tokens": t["tokens"], "sequences": t["sequences"],
            "stage1_seconds": s1["seconds"], "stage1_tokens_per_s": t["tokens"] / s1["seconds"],
            "stage1_peak_rss_mb": s1["peak_rss_mb"],
            "stage2_seconds": s2["seconds"], "stage2_peak_rss_mb": s2["peak_rss_mb"],
            "stage2_first_step_s": s2["first_step_s"],
            "stage2_tokens_per_s": sum(m["tokens"] for m in train_lines) / sum(m["tokens"] / m["tokens_per_s"]
                                                                            for m in train_lines),
            "bytes_per_token": t["bytes_per_token"], "cache_bytes": t["bytes"],
        })
        progress(json.dumps(rows[-1]))
    progress("streaming reader rate")
    reader = reader_rate(TeacherCache(resolve_cache_key(load_config(cfg)).cache_dir))
    base = rows[0]
    for r in rows:
        r["stage1_rss_vs_first"] = r["stage1_peak_rss_mb"] / base["stage1_peak_rss_mb"]
        r["stage2_rss_vs_first"] = r["stage2_peak_rss_mb"] / base["stage2_peak_rss_mb"]
    return {"rows": rows, "reader": reader, "model": {"layers": 1, "hidden": 64, "vocab": VOCAB, "seq_len": SEQ_LEN}}


def reader_rate(cache, sequences: int = 3000, micro_batch: int = 4, seed: int = 0) -> dict:
    """Stage 2's data path alone on one core: the streaming reader in the trainer's access order (a
    DataPlan over the whole cache: random sequences) with no prefetch thread, then collate."""
    import numpy as np
    import torch

    from .batching import collate
    from .cache.stream import StreamingSequences
    from .machine import torch_threads
    from .train import DataPlan

    with torch_threads(1):
        rows = {c: StreamingSequences(cache, "train", c, prefetch_threads=1) for c in ("domain", "general")}
        plan = DataPlan(np.arange(len(rows["domain"])), np.arange(len(rows["general"])), 1.0, seed)
        items = plan.step_items(0, min(sequences, plan.per_epoch))
        t0, tokens = time.perf_counter(), 0
        for a in range(0, len(items), micro_batch):
            b = collate([rows[c].row(i) for c, i in items[a:a + micro_batch]], cache.k, torch.device("cpu"))
            tokens += int(b["mask"].sum()) + len(b["mask"])
        seconds = time.perf_counter() - t0
        for r in rows.values():
            r.close()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "row_groups_decoded": sum(r.decoded_groups for r in rows.values()), "sequences": len(items)}


def to_markdown(res: dict, command: str, machine: str) -> str:
    lines = [f"# `make scale` ({machine})", "", f"Command: `{command}`", "",
             "| size | tokens | Stage 1 tokens/s | Stage 1 peak RSS | Stage 2 peak RSS | Stage 2 first step | "
             "Stage 2 tokens/s | disk bytes/token | cache on disk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['size']} | {r['tokens']:,} | {r['stage1_tokens_per_s']:,.0f} | "
                     f"{r['stage1_peak_rss_mb']:.0f} MB ({r['stage1_rss_vs_first']:.2f}×) | "
                     f"{r['stage2_peak_rss_mb']:.0f} MB ({r['stage2_rss_vs_first']:.2f}×) | "
                     f"{r['stage2_first_step_s']:.1f} s | {r['stage2_tokens_per_s']:,.0f} | "
                     f"{r['bytes_per_token']:.1f} | {r['cache_bytes'] / 1e6:,.0f} MB |")
    r = res.get("reader")
    if r:
        lines += ["", f"Streaming reader alone (decode + collate, one core, random order over the {res['rows'][-1]['size']} cache, "
                  f"no prefetch): {r['tokens_per_s']:,.0f} tokens/s ({r['sequences']} sequences, {r['row_groups_decoded']} row "
                  f"groups decoded)."]
    if res.get("paper"):
        lines += ["", "## The paper's scale on paper (330M domain + 300M general tokens, Qwen3-8B, 8192 tokens)", "",
                  "| figure | value | from |", "|---|---|---|"]
        lines += [f"| {p['figure']} | {p['value']} | {p['from']} |" for p in res["paper"]]
    m = res["model"]
    lines += ["", f"Model: random Llama, {m['layers']} layer(s), hidden {m['hidden']}, word-level vocabulary "
              f"{m['vocab']}, {m['seq_len']}-token sequences; k = 31; Stage 2: 3 optimizer steps of 8 sequences, "
              "LoRA r 8. Peak RSS per stage process from the kernel; × = against the smallest size. First step = "
              "seconds from the training process's start to its first metrics line (imports, model, cache "
              "verification, reader index, the step).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the paper's scale on paper

PAPER_TOKENS = 630_000_000      # 330M domain + 300M general (arXiv 2505.12043, second experiment)
PAPER_SEQ_LEN = 8192
QWEN3_VOCAB = 151_936
GPU_LABEL_TOKENS_PER_S = 10_000  # stated, not measured here: Qwen3-8B bf16 forward + top-k on one H100
GPU_TRAIN_TOKENS_PER_S = 3_000   # stated: Qwen3-8B LoRA r 64 forward + backward at 8192 tokens on one H100


def wide_vocab_storage(cache_dir: Path, vocab: int = QWEN3_VOCAB, zstd_level: int = 6) -> dict:
    """Bytes/token and writer tokens/s of a real cache's labels re-encoded as if over a `vocab`-token
    vocabulary (ids spread as 3·id + id mod 3, so gaps grow with the vocabulary and ids need uint32)."""
    import io

    import numpy as np
    import pyarrow.parquet as pq

    from . import cache as C

    cache = C.TeacherCache(cache_dir)
    tokens = size = 0
    seconds = 0.0
    for unit in cache.units:
        for path in unit.shard_paths:
            t = pq.read_table(path)
            seqs = C.sequences_from_tables([t], unit.path, cache.k)
            if seqs.teacher_topk_ids is None:
                continue
            ids = seqs.teacher_topk_ids.astype(np.int64)
            ids = 3 * ids + ids % 3
            probs = C.decode_probs(seqs.teacher_topk_probs)
            resid = C.decode_residual(seqs.teacher_residual)
            t0 = time.perf_counter()
            gaps, codes, rc = C.encode_labels(ids, probs, resid, vocab)
            data = C.ShardData(seq_id=seqs.seq_id, corpus=unit.corpus, subset=str(seqs.subset[0]),
                               split=t.column(C.SPLIT).to_pylist(), input_ids=seqs.input_ids.astype(np.uint32),
                               tok_off=seqs.tok_off, topk_ids=gaps, topk_probs=codes, residual=rc)
            buf = io.BytesIO()
            pq.write_table(C.shard_table(data, cache.k, vocab), buf, compression="zstd", compression_level=zstd_level,
                           use_dictionary=[C.CORPUS, C.SUBSET, C.SPLIT], column_encoding=C.COLUMN_ENCODING)
            seconds += time.perf_counter() - t0
            size += buf.tell()
            tokens += int(seqs.tok_off[-1])
    return {"vocab": vocab, "zstd_level": zstd_level, "bytes_per_token": size / max(tokens, 1),
            "encode_write_tokens_per_s": tokens / seconds if seconds else None, "tokens": tokens}


def paper_table(res: dict, storage: dict, reader_tokens_per_s: float | None) -> list[dict]:
    """The paper's second experiment extrapolated from this run's measurements (each row says which)."""
    big, small = res["rows"][-1], res["rows"][0]
    bpt = storage["bytes_per_token"]
    rows = [
        {"figure": "cache on disk", "value": f"{PAPER_TOKENS * bpt / 1e9:.0f} GB",
         "from": f"{bpt:.1f} bytes/token: the default cache's real labels re-encoded over Qwen3's {QWEN3_VOCAB:,}-token "
                 f"vocabulary (uint32 ids), zstd {storage['zstd_level']}"},
        {"figure": "Stage 1 RAM per worker", "value": f"{big['stage1_peak_rss_mb']:.0f} MB + the model",
         "from": f"{small['size']} → {big['size']} tokens here: {big['stage1_rss_vs_first']:.2f}×; buffers scale with "
                 f"rows_per_shard × max_seq_len, not with the corpus"},
        {"figure": "Stage 2 RAM per rank", "value": f"{big['stage2_peak_rss_mb']:.0f} MB + the model",
         "from": f"{small['size']} → {big['size']} tokens here: {big['stage2_rss_vs_first']:.2f}×; index 8 B a sequence "
                 f"({PAPER_TOKENS // PAPER_SEQ_LEN * 8 / 1e6:.1f} MB at 8192), reader cache ≤ train.reader_cache_mb per split"},
        {"figure": "Stage 1 time, 1 GPU", "value": f"{PAPER_TOKENS / GPU_LABEL_TOKENS_PER_S / 3600:.1f} h",
         "from": f"at a stated {GPU_LABEL_TOKENS_PER_S:,} tokens/s (Qwen3-8B bf16 forward + top-k, one H100; not measured here)"},
        {"figure": "Stage 1 time, 8 GPUs (sharded workers)", "value": f"{PAPER_TOKENS / GPU_LABEL_TOKENS_PER_S / 8 / 3600:.1f} h",
         "from": "the same rate × 8 workers (segments are split between them)"},
    ]
    if storage.get("encode_write_tokens_per_s"):
        rows.append({"figure": "Stage 1 writer headroom", "value": f"{storage['encode_write_tokens_per_s'] / GPU_LABEL_TOKENS_PER_S:.0f}×",
                     "from": f"encode + write {storage['encode_write_tokens_per_s']:,.0f} tokens/s on one CPU core at Qwen3's "
                             f"vocabulary ÷ the GPU's {GPU_LABEL_TOKENS_PER_S:,}"})
    if reader_tokens_per_s:
        rows.append({"figure": "Stage 2 reader headroom", "value": f"{reader_tokens_per_s / GPU_TRAIN_TOKENS_PER_S:.0f}×",
                     "from": f"streaming reader {reader_tokens_per_s:,.0f} tokens/s on one core (above) ÷ a stated "
                             f"{GPU_TRAIN_TOKENS_PER_S:,} training tokens/s per GPU"})
    return rows
