"""The vLLM backend as far as a machine without vLLM allows: its parsing of prompt log-probs into the
cache schema (outputs built here from a real forward pass, in vLLM's shape), the whole Stage 1 run
through it with the engine replaced by that construction, and the error without vLLM. The parity
test against the transformers backend needs vLLM and a GPU and is skipped otherwise."""

import importlib.util
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mol import cache as C
from mol import vllm_teacher as V
from mol.config import ConfigError, load_config
from mol.model import load_model
from mol.teacher import run_teacher_pass, teacher_labels

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def fake_prompt_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list:
    """What vLLM returns for a prompt: None at position 0, then per position the top-k entries
    (rank 1..k) plus the actual token with its true rank when it is not among them."""
    logp = torch.log_softmax(logits.double(), -1)
    out = [None]
    for t in range(1, len(tokens)):
        row = logp[t - 1]
        order = torch.argsort(row, descending=True)
        entries = {int(order[j]): SimpleNamespace(logprob=float(row[order[j]]), rank=j + 1, decoded_token=None)
                   for j in range(k)}
        actual = tokens[t]
        if actual not in entries:
            rank = int((row > row[actual]).sum()) + 1
            entries[actual] = SimpleNamespace(logprob=float(row[actual]), rank=rank, decoded_token=None)
        out.append(dict(reversed(list(entries.items()))))  # vLLM's order is not a contract
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from mol.config import ModelConfig

    return load_model(tiny_model_dir, ModelConfig(name=str(tiny_model_dir))).eval()


def test_parse_matches_the_transformers_labeller(tiny):
    tokens = list(range(100, 140))
    with torch.no_grad():
        logits = tiny(torch.tensor([tokens])).logits[0]
    plp = fake_prompt_logprobs(logits, tokens, 5)
    assert any(len(p) == 6 for p in plp[1:])  # some positions carry the actual token as a 6th entry
    ids, probs, resid = V.parse_prompt_logprobs(plp, 5)
    (ref_ids, ref_probs, ref_resid), = teacher_labels(tiny, [tokens], 5, 16, 0, torch.device("cpu"))
    assert ids.shape == (len(tokens) - 1, 5) and np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(resid, ref_resid, rtol=1e-5, atol=1e-8)


def test_residual_in_log_space_and_errors():
    # top-k holding all but 1e-12 of the mass: 1 - sum(exp) in float32 would give 0 or noise
    p = np.array([0.5, 0.3, 0.2 - 1e-12])
    pos = {i: SimpleNamespace(logprob=math.log(v), rank=i + 1) for i, v in enumerate(p)}
    _, _, resid = V.parse_prompt_logprobs([None, pos], 3)
    assert resid[0] == pytest.approx(1e-12, rel=1e-3)
    full = {i: SimpleNamespace(logprob=math.log(v), rank=i + 1) for i, v in enumerate([0.5, 0.5])}
    assert V.parse_prompt_logprobs([None, full], 2)[2][0] == 0.0  # all the mass in the top-k: exactly 0
    with pytest.raises(ValueError, match="max_logprobs"):
        V.parse_prompt_logprobs([None, {1: SimpleNamespace(logprob=-1.0, rank=1)}], 2)
    with pytest.raises(ValueError, match="no log-probs"):
        V.parse_prompt_logprobs([None, pos, None], 3)
    with pytest.raises(ValueError, match="fewer than 2"):
        V.parse_prompt_logprobs([None], 3)


def test_stage1_through_the_vllm_path(tiny_model_dir, corpora, tmp_path, monkeypatch, tiny):
    """run_teacher_pass with backend=vllm, the engine replaced by one answering in vLLM's output shape."""

    class FakeEngine:
        def __init__(self, model_path, k, dtype, engine_kwargs):
            self.k = k

        def labels(self, batch):
            outs = []
            for s in batch:
                with torch.no_grad():
                    logits = tiny(torch.tensor([list(s)])).logits[0]
                outs.append(SimpleNamespace(prompt_logprobs=fake_prompt_logprobs(logits, list(s), self.k)))
            return [V.parse_prompt_logprobs(o.prompt_logprobs, self.k) for o in outs]

    monkeypatch.setattr(V, "VllmTeacher", FakeEngine)
    ref_dir, _ = run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "hf")))
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "vllm", teacher={"backend": "vllm"}))
    v_dir, status = run_teacher_pass(cfg)
    assert status == "built" and v_dir.name != ref_dir.name  # the backend is part of the fingerprint
    ref, got = C.TeacherCache(ref_dir), C.TeacherCache(v_dir)
    assert got.verify() == [] and "fidelity" not in got.manifest
    a, b = ref.load("train"), got.load("train")
    assert np.array_equal(a.teacher_topk_ids, b.teacher_topk_ids)
    assert np.abs(a.teacher_topk_probs.astype(int) - b.teacher_topk_probs.astype(int)).max() <= 1  # one code step
    np.testing.assert_allclose(a.teacher_residual.astype(float), b.teacher_residual.astype(float), rtol=2e-3, atol=1e-6)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_error_says_what_to_install(tiny_model_dir, corpora, tmp_path):
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path, teacher={"backend": "vllm"}))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm\]'"):
        run_teacher_pass(cfg)


@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_parity_with_transformers_on_gpu(real_model_dir, corpora, tmp_path):
    """Real SmolLM2 through both backends: the same top-k sets almost everywhere and a small KL between
    the two stored distributions (bf16 kernels differ; see the README)."""
    over = {"data": {"max_seq_len": 64, "max_train_sequences": 4, "max_val_sequences": 0}, "teacher": {"top_k": 31}}
    hf_dir, _ = run_teacher_pass(load_config(data=tiny_config(real_model_dir, corpora, tmp_path / "hf", **over)))
    over["teacher"]["backend"] = "vllm"
    over["teacher"]["vllm_kwargs"] = {"gpu_memory_utilization": 0.5}
    v_dir, _ = run_teacher_pass(load_config(data=tiny_config(real_model_dir, corpora, tmp_path / "v", **over)))
    a, b = C.TeacherCache(hf_dir).load("train"), C.TeacherCache(v_dir).load("train")
    same = (a.teacher_topk_ids == b.teacher_topk_ids).all(1)
    assert same.mean() > 0.9
    pa, pb = C.decode_probs(a.teacher_topk_probs[same]), C.decode_probs(b.teacher_topk_probs[same])
    ra, rb = a.teacher_residual[same].astype(float), b.teacher_residual[same].astype(float)
    qa = np.concatenate([pa, ra[:, None]], 1).clip(1e-12)
    qb = np.concatenate([pb, rb[:, None]], 1).clip(1e-12)
    kl = (qb * (np.log(qb) - np.log(qa))).sum(1)
    assert kl.mean() < 5e-3, kl.mean()
