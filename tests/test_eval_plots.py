"""Evaluation and plots on a fake run folder: a tiny cache, a perturbed LoRA adapter on the tiny
random Llama, and small MCQ sets. Checks the metrics' meaning (base KL-to-base ~ 0, MCQ scores are
mean choice-token log-probs) rather than particular values."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import GEN, MED, tiny_config, write_jsonl
from mol.config import dump_config, load_config
from mol.evaluate import (EVAL_JSON, EVAL_MD, McqItem, _shared_prefix_hidden, choice_scores, encode_choice,
                          encode_set, evaluate_run, format_table, load_mcq_set, score_set)
from mol.model import load_model, load_tokenizer
from mol.plots import plot_compare, plot_run
from mol.teacher import run_teacher_pass

MCQ = {
    "capitals": [
        {"id": "c1", "question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"],
         "answer_index": 0},
        {"id": "c2", "question": "What is the capital of Italy?", "choices": ["Madrid", "Rome"], "answer_index": 1},
        {"id": "c3", "question": "Which city is the capital of Japan?",
         "choices": ["Tokyo", "Osaka", "Kyoto", "Nagoya"], "answer_index": 0},
        {"id": "c4", "question": "Not used: beyond mcq_items.", "choices": ["a", "b"], "answer_index": 0},
    ],
    "colours": [
        {"id": "k1", "question": "What colour is the sky on a clear day?", "choices": ["blue", "green"],
         "answer_index": 0},
        {"id": "k2", "question": "What colour is fresh grass?", "choices": ["red", "green", "a pale purple"],
         "answer_index": 1},
    ],
}


@pytest.fixture(scope="module")
def fake_run(tiny_model_dir, tmp_path_factory):
    """(run_dir, eval_dir): what the trainer would leave behind, with trained != base."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("evalrun")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    data = tiny_config(tiny_model_dir, corpora, root / "caches")
    data["eval"] = {"mcq_sets": list(MCQ), "mcq_items": 3, "batch_size": 2}
    cfg = load_config(data=data)
    cache_dir, _ = run_teacher_pass(cfg)

    run_dir = root / "run"
    run_dir.mkdir()
    torch.manual_seed(1)
    model = get_peft_model(load_model(tiny_model_dir, cfg.model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at 0, which would make the adapter a no-op
                p.normal_(0, 0.5)
    model.save_pretrained(run_dir / "adapter")
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "summary.json").write_text(json.dumps({
        "cache_dir": str(cache_dir), "model_path": str(tiny_model_dir), "finetune": "lora", "final_step": 7}))

    eval_dir = root / "eval"
    eval_dir.mkdir()
    for name, recs in MCQ.items():
        write_jsonl(eval_dir / f"{name}.jsonl", recs)
    return run_dir, eval_dir


@pytest.fixture(scope="module")
def result(fake_run):
    run_dir, eval_dir = fake_run
    calls = []

    def make_bar(total, desc):
        calls.append([desc, total, 0])
        return lambda n: calls[-1].__setitem__(2, calls[-1][2] + n)

    res = evaluate_run(run_dir, eval_dir=eval_dir, make_bar=make_bar)
    res["_bars"] = calls
    return res


def test_result_and_files(result, fake_run):
    run_dir, _ = fake_run
    base, trained = result["base"], result["trained"]
    assert result["subsets"] == {"med": "domain", "gen": "general"}
    assert result["mcq_items"] == 3
    assert result["mcq"]["capitals"]["n"] == 3 and result["mcq"]["colours"]["n"] == 2
    assert result["mcq"]["capitals"]["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    for m in (base, trained):
        for key in ("med", "gen", "domain", "general"):
            assert m[f"ppl/{key}"] == pytest.approx(math.exp(m[f"ce/{key}"]))
        for s in MCQ:
            assert 0.0 <= m[f"acc/{s}"] <= 1.0
    # the base model is the teacher: its KL to the cached labels is only fp16 rounding
    assert abs(base["kl_to_base/general"]) < 1e-3 and abs(base["kl_to_base/domain"]) < 1e-3
    assert trained["kl_to_base/general"] > 1e-3
    assert abs(trained["ppl/general"] - base["ppl/general"]) / base["ppl/general"] > 1e-3
    assert result["delta"]["ppl/med"] == pytest.approx(trained["ppl/med"] - base["ppl/med"])

    saved = json.loads((run_dir / EVAL_JSON).read_text())
    assert saved["base"]["ppl/general"] == pytest.approx(base["ppl/general"])
    md = (run_dir / EVAL_MD).read_text()
    assert "| metric | base | trained | change |" in md and "acc/capitals" in md

    # every progress bar was filled exactly: totals are true totals
    assert len(result["_bars"]) == 2 * (1 + len(MCQ))
    for desc, total, done in result["_bars"]:
        assert total > 0 and done == total, desc


def test_table_has_every_row(result):
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "trained", "change"]
    labels = [ln.split()[0] for ln in lines[2:]]
    assert labels == ["ppl/med", "ppl/gen", "ppl/domain", "ppl/general", "kl_to_base/domain",
                      "kl_to_base/general", "acc/capitals", "acc/colours"]
    assert "chance 36.1%" in table and "%" in lines[2] and " pt" in lines[-1]


def test_mcq_scores_equal_direct_log_probs(tiny_model_dir):
    """The batched, padded scorer equals a plain forward over the full chat, with the choice tokens
    found independently through character offsets."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, load_config(data={"data": {"sources": [
        {"path": "x", "corpus": "domain", "subset": "x"}]}}).model).eval()
    question, choices = "Which organ pumps blood?", ["The heart", "Lungs", "the large intestine, mostly"]
    encoded = [encode_choice(tok, question, c, {}) for c in choices]
    assert _shared_prefix_hidden(model, encoded, torch.device("cpu")) is not None  # the fast path is taken
    shared = choice_scores(model, encoded, torch.device("cpu"))
    padded = choice_scores(model, encoded, torch.device("cpu"), share_prefix=False)
    assert shared == pytest.approx(padded, abs=1e-4)
    for c, (ids, first), score in zip(choices, encoded, shared):
        full = tok.apply_chat_template([{"role": "user", "content": question},
                                        {"role": "assistant", "content": c}], tokenize=False)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        s = full.rindex(c)
        span = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < s + len(c) and b > s]
        assert ids[first:] == [enc["input_ids"][j] for j in span]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([enc["input_ids"]])).logits[0].double(), -1)
        direct = sum(float(logp[j - 1, enc["input_ids"][j]]) for j in span) / len(span)
        assert score == pytest.approx(direct, abs=1e-4)


class _Unigram(nn.Module):
    """A model whose next-token log-probs ignore the context: log_softmax(logits), set by the test."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.head = nn.Linear(1, len(logits), bias=False)
        self.head.weight.data = logits[:, None].clone()

    def get_decoder(self):
        # no past_key_values in the output: the scorer falls back to one padded batch
        return lambda input_ids, **kwargs: SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 1))

    def get_output_embeddings(self):
        return self.head


def test_scoring_is_length_normalised_and_picks_the_obvious_answer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    short, long = "Zebra", "blue whale song"
    t_short = tok(short, add_special_tokens=False)["input_ids"]
    t_long = tok(long, add_special_tokens=False)["input_ids"]
    assert len(t_short) < len(t_long) and not set(t_short) & set(t_long)
    logits = torch.zeros(len(tok), dtype=torch.float64)
    logits[t_short] = 2.0
    logits[t_long] = 3.0
    logp = torch.log_softmax(logits, -1)
    # per token the long answer is likelier, in total the short one: mean and sum disagree
    assert logp[t_long].sum() < logp[t_short].sum()

    item = McqItem("u1", "Which animal?", [short, long], answer_index=1)
    s = encode_set("toy", None, [item], tok, {})
    (ids_s, first_s), (ids_l, first_l) = s.encoded[0]
    assert ids_s[first_s:] == t_short and ids_l[first_l:] == t_long
    model = _Unigram(logits)
    scores = choice_scores(model, s.encoded[0], torch.device("cpu"))
    assert scores == pytest.approx([float(logp[t_short].mean()), float(logp[t_long].mean())])
    assert score_set(model, s, torch.device("cpu"))["accuracy"] == 1.0
    item.answer_index = 0
    assert score_set(model, s, torch.device("cpu"))["accuracy"] == 0.0


def test_missing_or_bad_eval_files(fake_run, tmp_path):
    run_dir, _ = fake_run
    with pytest.raises(FileNotFoundError, match="capitals.jsonl"):
        evaluate_run(run_dir, eval_dir=tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer_index": 2}])
    with pytest.raises(ValueError, match="bad.jsonl:1.*answer_index"):
        load_mcq_set(bad)


def test_eval_cli(fake_run, tmp_path, capsys):
    from stages.eval import main

    run_dir, eval_dir = fake_run
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    for f in ("config.yaml", "summary.json"):
        shutil.copy(run_dir / f, no_model / f)
    assert main([str(no_model)]) == 2
    assert "adapter/" in capsys.readouterr().err

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main([str(copy), "--mcq-items", "1", "--eval-dir", str(eval_dir)]) == 0
    out = capsys.readouterr().out
    assert "ppl/general" in out and "acc/colours (n=1" in out and str(copy / EVAL_JSON) in out


def _synthetic_metrics(run_dir, steps=30, partial_tail=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0, steps + 1, 5):
        lines.append({"type": "val", "step": step, "ce/med": 3.0 - 0.02 * step, "ce/pubmed": 3.2 - 0.02 * step,
                      "ce/gen": 3.5 + 0.001 * step, "ce/domain": 3.1 - 0.02 * step, "ce/general": 3.5,
                      "kl_to_base/general": 0.001 * step, "kl_to_base/domain": 0.01 * step, "tokens/med": 100})
    for step in range(1, steps + 1):
        rec = {"type": "train", "step": step, "loss": 3.0, "ce/domain": 3.0 - 0.02 * step + 0.1 * math.sin(step),
               "kl/domain": 0.01 * step, "kl/general": 0.001 * step, "grad_norm": 10.0 / step,
               "lr": 1e-4 * min(1, step / 3), "tokens": 512, "tokens_per_s": 1e3, "elapsed_s": step}
        if step % 2:  # a step that drew no general sequence has no general keys
            rec["ce/general"] = 3.5
        lines.append(rec)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial_tail:
        text += '{"type": "train", "step": 31, "lo'  # a trainer still writing
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_plot_run_writes_four_pngs(tmp_path):
    run_dir = _synthetic_metrics(tmp_path / "run-a")
    # the config tells which corpus each validation subset belongs to (colour families, clip line)
    dump_config(load_config(data={"data": {"sources": [
        {"path": "m.jsonl", "corpus": "domain", "subset": "med"},
        {"path": "p.jsonl", "corpus": "domain", "subset": "pubmed"},
        {"path": "g.jsonl", "corpus": "general", "subset": "gen"}]}}), run_dir / "config.yaml")
    paths = plot_run(run_dir)
    assert sorted(p.name for p in paths) == ["ce.png", "grad_norm.png", "kl.png", "lr.png"]
    for p in paths:
        assert p.parent == run_dir / "plots"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plot_compare_and_cli(tmp_path, capsys):
    from stages.plots import main

    a = _synthetic_metrics(tmp_path / "alpha-0.01")
    b = _synthetic_metrics(tmp_path / "alpha-0.5", steps=20, partial_tail=False)
    out = plot_compare([a, b], tmp_path / "cmp" / "ce_domain.png")
    assert out.is_file() and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no-such-key"):
        plot_compare([a], tmp_path / "x.png", key="no-such-key")

    assert main([str(a), str(b), "--compare", str(tmp_path / "cmp.png"), "--key", "ce/general"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(b / "plots" / "kl.png") in printed and str(tmp_path / "cmp.png") in printed
    assert main([str(tmp_path / "empty")]) == 2
