"""The real-shape benchmark (`python -m stages.bench_shapes`) runs the tiny shape end to end on CPU,
records every section's figures or its error, keeps going past a failed or timed-out section, and
refuses bad input with a one-line error (never a timed assertion)."""

import importlib.util
import json
import math
import time

import pytest
import torch

from mol.bench import shapes as S
from mol.bench.shapes_report import ARITHMETIC, ratios, twins
from mol.machine import torch_threads

# what each section's record holds when it ran
FIGURES = {
    "model folder": ("parameters", "weight_bytes"),
    "stage 1 vs bare forward": ("ratio", "stage1_tokens_per_s", "bare_tokens_per_s"),
    "stage 2": ("ratio_mol_ce", "ratio_mol_online", "time_to_first_step_s", "memory"),
    "stage 2 nf4": ("mol_step_s", "time_to_first_step_s", "memory"),
    "loss path": ("chunked", "naive", "memory_ratio"),
}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_tiny_shape_end_to_end_through_the_cli(tmp_path):
    from stages.bench_shapes import main

    out = tmp_path / "out"
    assert main(["--shape", "tiny", "--seq-len", "32", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((out / "shapes.json").read_text())
    assert res["meta"]["device"] == "cpu" and "stages.bench_shapes" in res["meta"]["command"]
    tiny = res["shapes"]["tiny"]
    assert tiny["seq_len"] == 32 and tiny["parameters"] == S.SHAPES["tiny"].parameters()
    assert list(tiny["sections"]) == list(S.SECTIONS)
    nf4_possible = importlib.util.find_spec("bitsandbytes") is not None
    for name, rec in tiny["sections"].items():
        assert _positive(rec["seconds"]), (name, rec)
        if name == "stage 2 nf4" and not nf4_possible:
            assert "bitsandbytes" in rec["error"]
            continue
        assert "error" not in rec and "skipped" not in rec, (name, rec)
        assert set(FIGURES[name]) <= set(rec), (name, rec)
    sec = tiny["sections"]
    # the device comes from the loaded model, the Stage 2 rows from Stage 1's labeller
    assert sec["stage 1 vs bare forward"]["device"] == "cpu" == sec["stage 2"]["device"]
    assert sec["stage 2"]["labels"].startswith("teacher_labels")
    assert sec["stage 2"]["lora_r"] == 64 and sec["stage 2"]["gradient_checkpointing"]
    for mode in ("mol", "ce", "online"):
        assert _positive(sec["stage 2"]["memory"][mode]["peak_bytes"])
    if nf4_possible:
        assert set(sec["stage 2 nf4"]["memory"]) == {"adamw", "adamw8bit"}
        assert all(_positive(m["peak_bytes"]) for m in sec["stage 2 nf4"]["memory"].values())
    lp = sec["loss path"]
    assert (lp["tokens"], lp["vocab"], lp["hidden"]) == (32, 4096, 64)
    r = ratios(res)
    assert r and all(_positive(x) for x in r.values()), r
    # no GPU, no Qwen3-8B: every row of the docs' arithmetic says why it is still arithmetic
    assert set(res["twins"]) == {fid for fid, *_ in ARITHMETIC}
    assert all(t["measured"] is None and t["still_arithmetic"] for t in res["twins"].values())
    md = (out / "shapes.md").read_text()
    assert "## tiny" in md and "Stage 1 tokens/s ÷ bare forward tokens/s" in md and "MoL ÷ CE-only step time" in md
    assert md.count("still arithmetic") == len(ARITHMETIC)


def test_a_failed_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("forced failure")

    monkeypatch.setattr(S, "section_stage1", broken)
    # the sections after Stage 2 as stand-ins (the test above runs them): seconds saved
    monkeypatch.setattr(S, "section_nf4", lambda *a, **kw: {"stand-in": True})
    monkeypatch.setattr(S, "section_loss_path", lambda *a, **kw: {"stand-in": True})
    with torch_threads(1):
        res = S.run_shapes(["tiny"], seq_len=32, device="cpu", workdir=tmp_path)
    sec = res["shapes"]["tiny"]["sections"]
    assert sec["stage 1 vs bare forward"]["error"] == "RuntimeError('forced failure')"
    assert _positive(sec["stage 1 vs bare forward"]["seconds"])
    # Stage 2 falls back to random labels of the same shapes and measures everything
    assert sec["stage 2"]["labels"].startswith("random") and _positive(sec["stage 2"]["ratio_mol_ce"])
    assert "error" not in sec["model folder"] and sec["stage 2 nf4"]["stand-in"] and sec["loss path"]["stand-in"]
    assert not (tmp_path / "tiny" / "model").exists()  # the model folder is removed after its shape
    r = ratios(res)
    assert r["tiny/ratio"] is None and r["tiny/memory_ratio"] is None and _positive(r["tiny/ratio_mol_online"])


def test_the_time_guard_cuts_a_section_and_skips_what_no_time_is_left_for(tmp_path, monkeypatch):
    def slow(*a, **kw):
        time.sleep(5)
        return {"never": True}

    monkeypatch.setattr(S, "build_model_folder", lambda *a, **kw: {"parameters": 1})
    monkeypatch.setattr(S, "section_stage1", slow)
    seen = []
    t0 = time.perf_counter()
    res = S.run_shapes(["tiny"], device="cpu", workdir=tmp_path, time_limit=2.5,
                       section=lambda shape, name: seen.append(name))
    assert time.perf_counter() - t0 < 4.5  # the sleep was interrupted
    sec = res["shapes"]["tiny"]["sections"]
    assert "SectionTimeout" in sec["stage 1 vs bare forward"]["error"]
    assert all(sec[n] == {"skipped": "--time-limit reached before it started"}
               for n in ("stage 2", "stage 2 nf4", "loss path")), sec
    assert seen == list(S.SECTIONS)


def test_the_shapes_are_qwen3s_real_parameter_counts():
    from transformers import AutoModelForCausalLM

    for name, n in (("qwen3-0.6b", 596_049_920), ("qwen3-8b", 8_190_735_360)):
        shape = S.SHAPES[name]
        with torch.device("meta"):  # the real architecture, no memory
            model = AutoModelForCausalLM.from_config(shape.qwen3_config(torch.bfloat16))
        assert sum(p.numel() for p in model.parameters()) == shape.parameters() == n
        assert model.config.tie_word_embeddings == (name == "qwen3-0.6b")
    tok = S.synthetic_tokenizer(4096)
    assert len(tok) == 4096 and tok.pad_token_id == tok.eos_token_id == 0
    seqs = S.synthetic_sequences(tok, 2, 50)
    assert [len(s) for s in seqs] == [50, 50] and all(2 <= s.min() and s.max() < 4096 for s in seqs)


def test_twins_only_from_qwen3_8b_on_cuda_at_8192():
    rec = {"memory": {"mol": {"peak_bytes": 24e9}, "adamw": {"peak_bytes": 15e9}, "adamw8bit": {"peak_bytes": 14e9}},
           "chunked": {"above_start_bytes": 2e9}, "naive": {"above_start_bytes": 16e9},
           "stage1_tokens_per_s": 10_000.0, "ratio": 0.9}
    res = {"meta": {"device": "cuda:0"},
           "shapes": {"qwen3-8b": {"seq_len": 8192, "sections": {n: rec for n in S.SECTIONS}}}}
    t = twins(res)
    assert t["nf4_peak"][0].startswith("15.00 GB (meets the 16 GB goal)")
    assert t["stage1_paper_hours"][0] == "17.5 h" and t["bf16_lora_peak"][0] == "24.00 GB"
    res["shapes"]["qwen3-8b"]["sections"]["stage 2 nf4"] = {"error": "OutOfMemoryError()"}
    assert twins(res)["nf4_peak"] == (None, "**failed**: `OutOfMemoryError()`")
    res["meta"]["device"] = "cpu"
    assert all(v is None and "not a GPU" in why for v, why in twins(res).values())


@pytest.mark.parametrize("argv, message", [
    (["--shape", "qwen3-9b"], "no such shape"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--time-limit", "0"], "--time-limit must be > 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_input_is_one_clean_error(argv, message, capsys):
    from stages.bench_shapes import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_out_must_be_a_folder(tmp_path, capsys):
    from stages.bench_shapes import main

    f = tmp_path / "a-file"
    f.write_text("x")
    assert main(["--shape", "tiny", "--out", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
