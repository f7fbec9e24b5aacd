"""The report: the figures (each a measured ratio against its goal), Markdown, JSON-safe values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import cache as C
from .timing import med


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
              "loss_path_memory_vs_naive", "reader_vs_training_tokens_per_s", "reader_checks_throughput",
              "verify_checks_time")
VLLM_FIGURE_IDS = ("vllm_stage1_vs_bare", "vllm_stage1_vs_transformers")
"""Reported after FIGURE_IDS when the vLLM venv exists (make vllm-setup); not in --quick."""


def vllm_figures(v: dict) -> list[dict]:
    """Stage 1 on vLLM ÷ vLLM's bare prompt pass, and ÷ the transformers backend (mol.bench.vllm)."""
    tps = v["tokens_per_s"]
    shape = f"{v['batch']}×{v['seq_len']} tokens, {v['dtype']} on {v['device']}, vLLM {v['vllm_version']}"
    return [
        _figure("vllm_stage1_vs_bare", "vLLM Stage 1 tokens/s ÷ vLLM's bare prompt pass (no log-probs)",
                v["ratio_stage1_vs_bare"], ">=", 0.9,
                f"{v['ratio_stage1_vs_bare']:.3f} ({tps['vllm_stage1']:.0f} vs {tps['vllm_bare']:.0f} tok/s; the"
                f" engine's hidden states alone {tps['vllm_hidden']:.0f}; prompt log-probs"
                f" {tps['vllm_prompt_logprobs']:.0f} tok/s = {v['ratio_prompt_logprobs_vs_bare']:.3f} of bare;"
                f" {shape}; {_round_range(v['times']['vllm_bare'], v['times']['vllm_stage1'])})", v),
        _figure("vllm_stage1_vs_transformers", "vLLM Stage 1 tokens/s ÷ transformers Stage 1 tokens/s",
                v["ratio_stage1_vs_transformers"], ">=", 1.0,
                f"{v['ratio_stage1_vs_transformers']:.3f} ({tps['vllm_stage1']:.0f} vs"
                f" {tps['transformers_stage1']:.0f} tok/s; {shape};"
                f" {_round_range(v['times']['transformers_stage1'], v['times']['vllm_stage1'])})", v,
                goal_text="≥ 1 (vLLM the faster engine)"),
    ]


def checks_figures(c: dict) -> list[dict]:
    """What the cache's integrity checks cost (mol.bench.checks): the reader's speed with its value
    checks ÷ without, and verify's time with the value checks ÷ without (sha256 and footers)."""
    t = c["times"]
    where = f"{c['tokens']} tokens, {c['shards']} shards"
    return [
        _figure("reader_checks_throughput", "cache reader tokens/s with its value checks ÷ without (seq_ids, id "
                "ranges, probability codes, mass on every decoded row group)", c["reader_values_ratio"], ">=", 0.9,
                f"{c['reader_values_ratio']:.3f} ({med(t['reader_values']):.3f} s vs {med(t['reader_plain']):.3f} s a"
                f" pass; with each shard's sha256 on first read too {c['reader_all_ratio']:.3f}"
                f" ({med(t['reader_all']):.3f} s); {where}; {_round_range(t['reader_plain'], t['reader_values'])})", c),
        # a full verify must read every value: its floor is decoding every shard, not the footers
        _figure("verify_checks_time", "cache_info --verify time (sha256, footers, every value checked) ÷ reading "
                "and decoding every shard with no check", c["verify_vs_decode_ratio"], "<=", 1.5,
                f"{c['verify_vs_decode_ratio']:.2f} ({med(t['verify_full']):.3f} s vs {med(t['decode_every_shard']):.3f} s;"
                f" sha256 and footers alone, verify before issue 23: {med(t['verify_no_values']):.3f} s ="
                f" 1/{c['verify_ratio']:.1f} of the full verify; {where};"
                f" {_round_range(t['verify_full'], t['decode_every_shard'])})", c),
    ]


def build_figures(stage1: dict, at_scale: dict, storage: dict, stage2: dict, stage2_mem: dict, headline: dict,
                  k: int, cache_bytes_per_token: float, vllm: dict | None = None, checks: dict | None = None) -> list[dict]:
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
        *checks_figures(checks),
    ]
    assert [f["id"] for f in figures] == list(FIGURE_IDS)
    if vllm and "skipped" not in vllm:
        figures += vllm_figures(vllm)
    return figures


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
