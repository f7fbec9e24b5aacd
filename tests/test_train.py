"""Stage 2 on a tiny random model: end to end, reload, resume, accumulation, ratios, modes, refusals."""

import json

import numpy as np
import pytest
import torch

from conftest import cache_shards, metrics_records, tiny_config
from faults_kit import assert_close_metrics, assert_same_metrics
from mol import cache as C
from mol.batching import subset_losses
from mol.cache import CacheError
from mol.config import load_config
from mol.errors import MolError
from mol.model import load_model, pick_device
from mol.teacher import run_teacher_pass
from mol.train import DataPlan, TrainingError, lr_at, train


def _cfg(tiny_model_dir, corpora, tmp_path, **train_over):
    d = tiny_config(tiny_model_dir, corpora, tmp_path / "caches")
    d["train"] = {"global_batch": 4, "micro_batch": 2, "max_steps": 4, "eval_every": 2, "lr": 1e-3,
                  "out_dir": str(tmp_path / "runs"), "lora": {"r": 4, "alpha": 8, "dropout": 0.1,
                                                              "target_modules": ["q_proj", "v_proj"]},
                  **train_over}
    return d


@pytest.fixture
def cache_ready(tiny_model_dir, corpora, tmp_path):
    d = _cfg(tiny_model_dir, corpora, tmp_path)
    run_teacher_pass(load_config(data=d))
    return d


def test_end_to_end_and_adapter_reload(cache_ready, tiny_model_dir):
    cfg = load_config(data=cache_ready)
    run_dir = train(cfg)
    m = metrics_records(run_dir)
    train_lines = [r for r in m if r["type"] == "train"]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train_lines)
    assert {"ce/domain", "ce/general", "kl/domain", "kl/general", "lr", "tokens_per_s"} <= set(train_lines[-1])
    vals = [r for r in m if r["type"] == "val"]
    assert [r["step"] for r in vals] == [0, 2, 4]
    assert vals[0]["kl_to_base/general"] < 1e-3  # the untouched student is the teacher
    assert vals[-1]["ce/domain"] < vals[0]["ce/domain"]  # it learned the domain
    for f in ("config.yaml", "summary.json", "adapter/adapter_config.json"):
        assert (run_dir / f).is_file(), f
    from peft import PeftModel

    base = load_model(tiny_model_dir, cfg.model)
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    cache = C.TeacherCache(json.loads((run_dir / "summary.json").read_text())["cache_dir"])
    res = subset_losses(reloaded, cache.load("val"), cache.k, pick_device("cpu"))
    assert res["ce/domain"] == pytest.approx(vals[-1]["ce/domain"], rel=1e-5)
    assert res["kl_to_base/general"] == pytest.approx(vals[-1]["kl_to_base/general"], rel=1e-4, abs=1e-7)


def test_resume_matches_uninterrupted(cache_ready):
    full = train(load_config(data={**cache_ready, "train": {**cache_ready["train"], "run_name": "full"}}))
    part_cfg = {**cache_ready, "train": {**cache_ready["train"], "run_name": "part"}}
    train(load_config(data=part_cfg), stop_after=2)
    assert not (full.parent / "part" / "adapter").exists()
    part = train(load_config(data={**part_cfg, "train": {**part_cfg["train"], "resume": True}}))
    assert_same_metrics(metrics_records(full), metrics_records(part))  # bit for bit: the same run


def test_accumulation_gives_the_same_update(cache_ready):
    base = {**cache_ready["train"], "max_steps": 1, "eval_every": 0, "lora": {**cache_ready["train"]["lora"], "dropout": 0.0}}
    one = train(load_config(data={**cache_ready, "train": {**base, "micro_batch": 4, "run_name": "mb4"}}))
    acc = train(load_config(data={**cache_ready, "train": {**base, "micro_batch": 1, "run_name": "mb1"}}))
    from safetensors.torch import load_file

    wa, wb = load_file(one / "adapter/adapter_model.safetensors"), load_file(acc / "adapter/adapter_model.safetensors")
    for k_ in wa:
        torch.testing.assert_close(wa[k_], wb[k_], rtol=1e-4, atol=1e-6)
    assert metrics_records(one)[1]["grad_norm"] == pytest.approx(metrics_records(acc)[1]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 1.5, 2.0])
def test_ratio_plan(ratio):
    plan = DataPlan(np.arange(10), np.arange(100, 107), ratio, seed=3)
    ep = plan.epoch(0)
    assert sum(c == "domain" for c, _ in ep) == 10
    n_gen = sum(c == "general" for c, _ in ep)
    assert n_gen == round(10 * ratio)
    assert sorted(i for c, i in ep if c == "domain") == list(range(10))
    assert ep == plan.epoch(0) and ep != plan.epoch(1)  # deterministic, reshuffled per epoch
    assert [c for c, _ in ep] != sorted(c for c, _ in ep)  # corpora mixed, not blocked
    # a pool smaller than needed is cycled: every general sequence is used before any repeats twice
    gen = [i for e in range(3) for c, i in plan.epoch(e) if c == "general"]
    counts = np.bincount(np.array(gen) - 100, minlength=7)
    assert counts.max() - counts.min() <= 1
    # steps walk the stream without gaps
    stream = [x for s in range(4) for x in plan.step_items(s, 5)]
    assert stream == (plan.epoch(0) + plan.epoch(1))[:20]


def test_schedule_warmup_then_cosine(cache_ready):
    cfg = load_config(data={**cache_ready, "train": {**cache_ready["train"], "max_steps": 20}})
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[0] < lrs[1] and max(lrs) == pytest.approx(cfg.train.lr)
    assert lrs[-1] < 0.1 * cfg.train.lr and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_ce_mode_and_ratio_run(cache_ready):
    run = train(load_config(data={**cache_ready, "train": {**cache_ready["train"], "mode": "ce", "general_ratio": 2.0,
                                                           "max_steps": 2, "run_name": "ce"}}))
    tr = [r for r in metrics_records(run) if r["type"] == "train"]
    assert "kl/general" not in tr[0] and tr[0]["loss"] == pytest.approx(
        (tr[0]["ce/domain"] * 0 + tr[0]["ce/general"] * 0) + tr[0]["loss"])
    assert json.loads((run / "summary.json").read_text())["mode"] == "ce"


def test_mismatched_or_missing_cache_is_refused(cache_ready, tmp_path):
    cache_dir = C.resolve_cache_key(load_config(data=cache_ready)).cache_dir
    bad = {**cache_ready, "teacher": {**cache_ready["teacher"], "top_k": 7},
           "train": {**cache_ready["train"], "cache_dir": str(cache_dir)}}
    with pytest.raises(CacheError, match="k = 5"):
        train(load_config(data=bad))
    missing = {**cache_ready, "teacher": {**cache_ready["teacher"], "top_k": 7}}
    with pytest.raises(TrainingError, match="make teacher-cache"):
        train(load_config(data=missing))


def test_corrupt_cache_is_refused(cache_ready):
    cache_dir = C.resolve_cache_key(load_config(data=cache_ready)).cache_dir
    shard = cache_shards(cache_dir)[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    # the reader hashes each shard when it first reads it, before any of its rows reaches a step
    with pytest.raises(CacheError, match=f"{shard.name}: sha256 mismatch"):
        train(load_config(data=cache_ready))
    assert not list(cache_dir.parents[2].glob("runs/*/summary.json"))


def test_full_finetune_and_merge(cache_ready, tiny_model_dir):
    full = train(load_config(data={**cache_ready, "train": {**cache_ready["train"], "finetune": "full", "max_steps": 1,
                                                            "eval_every": 0, "lr": 1e-4, "run_name": "full-ft"}}))
    assert (full / "model" / "config.json").is_file()
    merged = train(load_config(data={**cache_ready, "train": {**cache_ready["train"], "merge": True, "max_steps": 2,
                                                              "eval_every": 0, "run_name": "merged",
                                                              "lora": {**cache_ready["train"]["lora"], "dropout": 0.0}}}))
    from peft import PeftModel

    x = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        a = PeftModel.from_pretrained(load_model(tiny_model_dir, load_config(data=cache_ready).model),
                                      merged / "adapter").eval()(x).logits
        b = load_model(merged / "merged", load_config(data=cache_ready).model).eval()(x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_two_processes_match_one(cache_ready):
    """`accelerate launch` with 2 CPU processes (gloo DDP): the global batch is split, not multiplied,
    and the loss trajectory equals one process's with the same global batch."""
    import os
    import subprocess
    import sys

    import yaml

    train_over = {**cache_ready["train"], "global_batch": 8, "micro_batch": 2, "max_steps": 3, "eval_every": 0,
                  "lora": {**cache_ready["train"]["lora"], "dropout": 0.0}}  # dropout draws differ per process
    config = cache_ready["teacher"]["cache_root"] + "/../ddp.yaml"
    with open(config, "w") as f:
        yaml.safe_dump({**cache_ready, "train": train_over}, f)
    one = train(load_config(config, ["train.run_name=one"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "stages.train", config, "train.run_name=two"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 processes x 4 sequences" in r.stderr
    two = one.parent / "two"
    a, b = metrics_records(one), metrics_records(two)
    # two ranks sum the gradient in another order: within 16 float32 epsilons of each metric's scale
    # (measured 2026-12-07: at most 0.62 of one, grad_norm at step 2)
    assert_close_metrics(a, b, ("loss", "grad_norm", "ce/domain", "ce/general", "kl/general", "kl/domain",
                                "kl_to_base/general", "tokens"), ulps=16)
    from safetensors.torch import load_file

    wa, wb = load_file(one / "adapter/adapter_model.safetensors"), load_file(two / "adapter/adapter_model.safetensors")
    for k_ in wa:
        torch.testing.assert_close(wa[k_], wb[k_], rtol=1e-4, atol=1e-6)
    # 4 sequences cannot be split into 2 processes x micro-batches of 4 (each worker exits 2; the
    # launcher reports the failure with its own status)
    r = subprocess.run(cmd[:-1] + ["train.run_name=bad", "train.micro_batch=4", "train.global_batch=4"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "split across processes" in r.stderr + r.stdout


class _RunsCode:
    """A pickle that would create a file when loaded (what a hostile checkpoint could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_is_loaded_without_unpickling_code(cache_ready, tmp_path):
    """Resuming reads tensors and plain containers only: a state.pt carrying a pickled callable is
    refused with a TrainingError naming it, and its code never runs."""
    import torch

    cfg = {**cache_ready, "train": {**cache_ready["train"], "run_name": "hostile"}}
    run_dir = train(load_config(data=cfg), stop_after=1)
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "state.pt"
    state = torch.load(ckpt, weights_only=True)  # what the trainer wrote loads without pickle
    marker = tmp_path / "code-ran"
    state["extra"] = _RunsCode(marker)
    torch.save(state, ckpt)
    with pytest.raises(MolError, match="not a checkpoint this trainer wrote"):
        train(load_config(data={**cfg, "train": {**cfg["train"], "resume": True}}))
    assert not marker.exists()
