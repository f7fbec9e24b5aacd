"""The 4-bit student (model.quantization=nf4, bitsandbytes' CPU backend): it trains, resumes as one
run, its adapter lands on the full-precision base, merges into full-precision weights, and a missing
bitsandbytes is a clear error. The cache is the full-precision base's, shared with fp32 runs."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import metrics_records, save_tiny_llama, tiny_config
from faults_kit import assert_same_metrics
from mol import cache as C
from mol.batching import subset_losses
from mol.config import load_config
from mol.errors import MolError
from mol.model import load_model, pick_device
from mol.teacher import run_teacher_pass
from mol.train import train

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory, real_model_dir):
    """conftest's tiny random Llama at hidden size 64: bitsandbytes' CPU kernels quantize in blocks
    of 64 input features, which every real model's layers are multiples of."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny64"), real_model_dir, hidden_size=64)


@pytest.fixture
def nf4(tiny64, corpora, tmp_path) -> dict:
    d = tiny_config(tiny64, corpora, tmp_path / "caches")
    d["model"]["quantization"] = "nf4"
    d["train"] = {"global_batch": 4, "micro_batch": 2, "max_steps": 6, "eval_every": 2, "lr": 3e-3, "save_every": 2,
                  "out_dir": str(tmp_path / "runs"), "run_name": "nf4",
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}}
    run_teacher_pass(load_config(data=d))
    return d


def _with(d: dict, **train) -> dict:
    return {**d, "train": {**d["train"], **train}}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_the_quantized_student_trains_and_its_loss_falls(nf4, quantization):
    run = train(load_config(data={**nf4, "model": {**nf4["model"], "quantization": quantization}}))
    m = metrics_records(run)
    steps = [r for r in m if r["type"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    val = [r for r in m if r["type"] == "val"]
    assert val[-1]["ce/med"] < val[0]["ce/med"]
    assert steps[-1]["grad_norm"] > 0


def test_resume_of_a_4bit_run_equals_the_uninterrupted_run(nf4):
    full = train(load_config(data=_with(nf4, run_name="full")))
    train(load_config(data=_with(nf4, run_name="part")), stop_after=2)
    part = train(load_config(data=_with(nf4, run_name="part", resume=True)))
    assert_same_metrics(metrics_records(full), metrics_records(part))  # bit for bit: the same run


def test_the_adapter_lands_on_the_full_precision_base_and_merges_there(nf4, tiny64):
    """The adapter reloads on the unquantized base: its validation CE is the 4-bit run's final one up
    to the quantization's own effect on the base (stated tolerance: within the base models' gap);
    train.merge=true writes full-precision weights equal to base + adapter."""
    from peft import PeftModel

    cfg = load_config(data=_with(nf4, merge=True))
    run = train(cfg)
    final = [r for r in metrics_records(run) if r["type"] == "val"][-1]
    cache = C.TeacherCache(json.loads((run / "summary.json").read_text())["cache_dir"])
    val, dev = cache.load("val"), pick_device("cpu")
    fp_base = load_model(tiny64, cfg.model)
    base_ce = subset_losses(fp_base, val, cache.k, dev)["ce/med"]
    q_base = load_model(tiny64, cfg.model, quantization="nf4")
    q_base_ce = subset_losses(q_base, val, cache.k, dev)["ce/med"]
    on_fp = PeftModel.from_pretrained(load_model(tiny64, cfg.model), run / "adapter").eval()
    res = subset_losses(on_fp, val, cache.k, dev)
    gap = abs(base_ce - q_base_ce)
    assert abs(res["ce/med"] - final["ce/med"]) <= 2 * gap + 1e-3, (res["ce/med"], final["ce/med"], gap)
    assert res["ce/med"] < base_ce  # what the adapter learned survives the move to the full-precision base
    merged = load_model(run / "merged", cfg.model)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    want = on_fp.merge_and_unload().state_dict()
    got = merged.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        torch.testing.assert_close(got[name], want[name])
        assert not torch.equal(got[name], fp_base.state_dict()[name])


def test_the_8bit_optimizer_runs_on_cpu_and_resumes(nf4):
    full = train(load_config(data=_with(nf4, run_name="o8", optimizer="adamw8bit")))
    train(load_config(data=_with(nf4, run_name="o8p", optimizer="adamw8bit")), stop_after=2)
    part = train(load_config(data=_with(nf4, run_name="o8p", optimizer="adamw8bit", resume=True)))
    a = [r["loss"] for r in metrics_records(full) if r["type"] == "train"]
    b = [r["loss"] for r in metrics_records(part) if r["type"] == "train"]
    assert b == pytest.approx(a, rel=1e-5) and a[-1] < a[0]


def test_a_missing_bitsandbytes_is_a_clear_error(nf4, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    with pytest.raises(MolError, match=r"model.quantization=nf4 needs bitsandbytes: pip install -e '.\[qlora\]'"):
        train(load_config(data=_with(nf4, run_name="x")))
    d = {**nf4, "model": {**nf4["model"], "quantization": "none"}}
    with pytest.raises(MolError, match=r"train.optimizer=adamw8bit needs bitsandbytes"):
        train(load_config(data=_with(d, run_name="y", optimizer="adamw8bit")))
