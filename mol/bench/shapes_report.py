"""The real-shape benchmark's report (:mod:`.shapes`): a Markdown table per shape, and the docs'
GPU arithmetic beside its measured twin, which only a Qwen3-8B run on CUDA at 8192 tokens gives."""

from __future__ import annotations

import math
from typing import Optional

PAPER_TOKENS = 630_000_000
"""The paper's corpus (330M domain + 300M general tokens, docs/scale.md)."""

# (id, what, the docs' arithmetic, where it is written)
ARITHMETIC = (
    ("bf16_lora_peak", "Qwen3-8B bf16 + LoRA r 64, 8192 tokens, gradient checkpointing, AdamW: peak GPU memory",
     "≈ 25 GB", "docs/scale-out.md"),
    ("nf4_peak", "Qwen3-8B nf4 student + LoRA r 64, AdamW: peak GPU memory (goal ≤ 16 GB)", "≈ 14.3 GB",
     "docs/qlora.md"),
    ("nf4_adamw8bit_peak", "Qwen3-8B nf4 student + LoRA r 64, adamw8bit: peak GPU memory", "≈ 13.2 GB",
     "docs/qlora.md"),
    ("loss_path_chunked", "loss path at 8192 × 151,936, 1024-position chunks: memory above the model's",
     "≈ 1.9 GB", "docs/scale-out.md"),
    ("loss_path_naive", "naive loss path (full [8192, 151936] logits) with backward", "5 GB × 3 ≈ 15 GB",
     "docs/scale-out.md"),
    ("stage1_rate", "Stage 1 rate, Qwen3-8B bf16 forward + top-k, one GPU", "10,000 tokens/s (stated)",
     "docs/scale.md"),
    ("stage1_paper_hours", "Stage 1 over the paper's 630M tokens, one GPU", "17.5 h", "docs/scale.md"),
)


def _gb(b: Optional[float]) -> str:
    if b is None:
        return "—"
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"


def _ok(rec: Optional[dict]) -> bool:
    return isinstance(rec, dict) and "error" not in rec and "skipped" not in rec


def _why_not(rec: Optional[dict]) -> str:
    if rec is None:
        return "not run"
    if "skipped" in rec:
        return f"skipped: {rec['skipped']}"
    return f"**failed**: `{rec['error'][:300]}`"


def shape_rows(s: dict) -> list[tuple[str, str]]:
    """(figure, measured) rows of one shape's sections; a failed or skipped section says so."""
    sec, rows = s["sections"], []
    s1 = sec.get("stage 1 vs bare forward")
    if _ok(s1):
        rows.append(("Stage 1 tokens/s ÷ bare forward tokens/s",
                     f"**{s1['ratio']:.3f}** ({s1['stage1_tokens_per_s']:,.0f} vs {s1['bare_tokens_per_s']:,.0f} "
                     f"tok/s; labels alone {s1['ratio_labels_only']:.3f}; {s1['batch']}×{s1['seq_len']} tokens, "
                     f"top-{s1['k']})"))
        rows.append(("Stage 1 tokens/s (absolute)", f"{s1['stage1_tokens_per_s']:,.0f}"))
    else:
        rows.append(("Stage 1 ÷ bare forward", _why_not(s1)))
    s2 = sec.get("stage 2")
    if _ok(s2):
        t, m = s2["step_s"], s2["memory"]
        shape = f"{s2['micro_batch']}×{s2['seq_len']} tokens, {s2['dtype']}, LoRA r {s2['lora_r']}, checkpointing"
        rows += [
            ("Stage 2 MoL micro-step (forward + backward)",
             f"{t['mol']:.3f} s = {s2['training_tokens_per_s']:,.0f} tok/s ({shape})"),
            ("MoL ÷ CE-only step time", f"**{s2['ratio_mol_ce']:.3f}** ({t['mol']:.3f} vs {t['ce']:.3f} s)"),
            ("MoL from the cache ÷ online teacher (adapter disabled) step time",
             f"**{s2['ratio_mol_online']:.3f}** ({t['mol']:.3f} vs {t['online']:.3f} s)"),
            ("Stage 2 peak memory, whole step with AdamW: MoL / CE-only / online teacher",
             f"{_gb(m['mol']['peak_bytes'])} / {_gb(m['ce']['peak_bytes'])} / {_gb(m['online']['peak_bytes'])} "
             f"(MoL ÷ CE {s2['memory_ratio_mol_ce']:.3f}; {m['mol']['method']})"),
            ("time to first step (load + LoRA + first MoL step + optimizer step)",
             f"{s2['time_to_first_step_s']:.1f} s"),
        ]
    else:
        rows.append(("Stage 2 (bf16/fp32 LoRA)", _why_not(s2)))
    q = sec.get("stage 2 nf4")
    if _ok(q):
        m8 = q["memory"].get("adamw8bit", {})
        rows += [
            ("nf4 student: MoL micro-step", f"{q['mol_step_s']:.3f} s (student tensors {q['student_tensor_mb']:,.0f} MB)"),
            ("nf4 student peak memory: AdamW / adamw8bit",
             f"{_gb(q['memory']['adamw']['peak_bytes'])} / "
             + (_gb(m8["peak_bytes"]) if "peak_bytes" in m8 else f"failed: `{m8.get('error', '?')[:200]}`")),
            ("nf4 time to first step", f"{q['time_to_first_step_s']:.1f} s"),
        ]
    else:
        rows.append(("Stage 2 nf4 + adamw8bit", _why_not(q)))
    lp = sec.get("loss path")
    if _ok(lp):
        def one(v):
            x = lp[v]
            return _gb(x["above_start_bytes"]) + f" in {x['seconds']:.3f} s" if "error" not in x else f"failed: `{x['error'][:200]}`"
        ratio = f"; chunked ÷ naive memory **{lp['memory_ratio']:.3f}**" if "memory_ratio" in lp else ""
        rows.append((f"loss path at {lp['tokens']} × {lp['vocab']:,} (hidden {lp['hidden']}, {lp['dtype']}), "
                     "forward + backward: chunked / naive, memory above start",
                     f"{one('chunked')} / {one('naive')}{ratio}"))
    else:
        rows.append(("loss path", _why_not(lp)))
    return rows


def twins(res: dict) -> dict:
    """The measured twin of each ARITHMETIC row: a figure only where Qwen3-8B ran on CUDA at 8192
    tokens, otherwise the reason it is still arithmetic."""
    s = res["shapes"].get("qwen3-8b")
    why = None
    if s is None:
        why = "qwen3-8b not run"
    elif not res["meta"]["device"].startswith("cuda"):
        why = f"qwen3-8b ran on {res['meta']['device']}, not a GPU"
    elif s["seq_len"] != 8192:
        why = f"qwen3-8b ran at {s['seq_len']} tokens, not 8192"
    if why:
        return {fid: (None, why) for fid, *_ in ARITHMETIC}
    sec = s["sections"]
    out = {}

    def put(fid, rec, fn):
        try:
            out[fid] = (fn(rec), None) if _ok(rec) else (None, _why_not(rec))
        except (KeyError, TypeError) as e:
            out[fid] = (None, f"not measured ({e!r})")

    s2, q, lp, s1 = sec.get("stage 2"), sec.get("stage 2 nf4"), sec.get("loss path"), sec.get("stage 1 vs bare forward")
    put("bf16_lora_peak", s2, lambda r: _gb(r["memory"]["mol"]["peak_bytes"]))
    put("nf4_peak", q, lambda r: _gb(r["memory"]["adamw"]["peak_bytes"])
        + (" (meets the 16 GB goal)" if r["memory"]["adamw"]["peak_bytes"] <= 16e9 else " (**misses the 16 GB goal**)"))
    put("nf4_adamw8bit_peak", q, lambda r: _gb(r["memory"]["adamw8bit"]["peak_bytes"]))
    put("loss_path_chunked", lp, lambda r: _gb(r["chunked"]["above_start_bytes"]))
    put("loss_path_naive", lp, lambda r: _gb(r["naive"]["above_start_bytes"]))
    put("stage1_rate", s1, lambda r: f"{r['stage1_tokens_per_s']:,.0f} tokens/s ({r['ratio']:.3f} of a bare forward)")
    put("stage1_paper_hours", s1, lambda r: f"{PAPER_TOKENS / r['stage1_tokens_per_s'] / 3600:.1f} h")
    return out


def to_markdown(res: dict, command: str) -> str:
    meta = res["meta"]
    v = meta["versions"]
    lines = ["# Real-shape benchmark", "",
             f"`{command}` on {meta['date'][:10]}: {meta['device_name']}, device `{meta['device']}`; torch {v['torch']}, "
             f"transformers {v['transformers']}, peft {v['peft']}, bitsandbytes {v['bitsandbytes']}; "
             f"{meta['seconds']:.0f} s in all (limit {meta['time_limit_s']:.0f} s). Random-initialized models built "
             "from a Qwen3Config (no weights downloaded) and run through the product's own code: `load_model`, "
             "Stage 1's labeller and shard writer, the trainer's LoRA student, chunked loss and optimizer. "
             "Ratios are measured side by side in this run (interleaved rounds, medians); peak memory is "
             "`torch.cuda.max_memory_allocated` on CUDA and the process's peak RSS on CPU (libraries included, "
             "so on CPU it is no twin of a GPU figure). JSON: `shapes.json` beside this file.", ""]
    for name, s in res["shapes"].items():
        sh = s["shape"]
        lines += [f"## {name}", "",
                  f"hidden {sh['hidden']}, {sh['layers']} layers, {sh['heads']} heads / {sh['kv_heads']} kv × "
                  f"{sh['head_dim']}, MLP {sh['mlp']}, vocab {sh['vocab']:,}, "
                  f"{'tied' if sh['tied'] else 'untied'} embeddings: {s['parameters'] / 1e6:,.1f} M parameters; "
                  f"sequence length {s['seq_len']}.", "",
                  "| figure | measured |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in shape_rows(s)]
        secs = ", ".join(f"{k} {r.get('seconds', 0):.1f} s" for k, r in s["sections"].items())
        lines += ["", f"Section times: {secs}.", ""]
    tw = twins(res)
    lines += ["## The docs' GPU arithmetic and its measured twins", "",
              "| figure | arithmetic (where) | measured |", "|---|---|---|"]
    for fid, what, arith, where in ARITHMETIC:
        val, why = tw[fid]
        cell = f"**{val}** ({meta['device_name']}, {meta['date'][:10]})" if val else f"still arithmetic: {why}"
        lines.append(f"| {what} | {arith} ([{where.split('/')[-1]}](../{where})) | {cell} |")
    lines.append("")
    return "\n".join(lines)


def ratios(res: dict) -> dict:
    """Every ratio of the run by "shape/figure" (finite floats, or None where a section failed)."""
    out = {}
    for name, s in res["shapes"].items():
        sec = s["sections"]
        for sname, keys in (("stage 1 vs bare forward", ("ratio", "ratio_labels_only")),
                            ("stage 2", ("ratio_mol_ce", "ratio_mol_online", "memory_ratio_mol_ce",
                                         "memory_ratio_mol_online")),
                            ("loss path", ("memory_ratio", "time_ratio"))):
            rec = sec.get(sname, {})
            for k in keys:
                x = rec.get(k) if _ok(rec) else None
                out[f"{name}/{k}"] = x if isinstance(x, (int, float)) and math.isfinite(x) else None
    return out


__all__ = ["ARITHMETIC", "PAPER_TOKENS", "ratios", "shape_rows", "to_markdown", "twins"]
