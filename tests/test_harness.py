"""mol.harness and mol/lm_eval_tasks on the tiny random Llama, offline: the shipped task files give
lm-eval the model's own log-likelihoods, a user's task file takes the sampling settings, and the
paired statistics are the hand-computed ones."""

import json
import math

import pytest
import torch

from conftest import write_jsonl
from mol import harness as H
from mol import lm_eval_tasks as T
from mol.config import load_config
from mol.model import load_model, load_tokenizer

MEDQA = [
    {"id": "c1", "question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"],
     "answer_index": 0},
    {"id": "c2", "question": "What is the capital of Italy?", "choices": ["Madrid", "Rome"], "answer_index": 1},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer): the tiny random Llama in eval mode."""
    model = load_model(tiny_model_dir, load_config(data={"data": {"sources": [
        {"path": "x", "corpus": "domain", "subset": "x"}]}}).model).eval()
    return model, load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """A folder holding medqa.jsonl: the shipped task mol_medqa reads it instead of the default data."""
    d = tmp_path_factory.mktemp("eval")
    write_jsonl(d / "medqa.jsonl", MEDQA)
    return d


@pytest.mark.parametrize("chat", [True, False])
def test_task_definitions_score_the_models_log_likelihoods(tiny, eval_dir, no_network, chat):
    """The shipped task renders each question as lm-eval does with and without the chat template,
    and its log-likelihoods are the model's: a plain forward pass over context + choice agrees."""
    model, tok = tiny
    assert "medqa" in T.shipped_sets()
    with H.resolve_tasks(["medqa"], [], eval_dir, 2) as ts:
        scores, samples = H.run_tasks(model, tok, ts, chat_template=chat, batch_size=3)
    assert no_network == []
    recs = sorted(samples["mol_medqa"], key=lambda r: r["doc_id"])
    assert len(recs) == 2
    for r, item in zip(recs, MEDQA):
        if chat:  # the question is the user's message; the generation prompt ends the context
            prompt = tok.apply_chat_template([{"role": "user", "content": item["question"]}],
                                             add_generation_prompt=True, tokenize=False)
            assert [tuple(a) for a in r["arguments"]] == [(prompt, c) for c in item["choices"]]
        else:  # lm-eval's plain format: the question, then " " + choice
            assert [tuple(a) for a in r["arguments"]] == [(item["question"], " " + c) for c in item["choices"]]
        lls = []
        for ctx, cont in r["arguments"]:
            # lm-eval moves the context's trailing whitespace (the template's newline) into the continuation
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(float(logp[j - 1, whole[j]]) for j in range(n_ctx, len(whole))))
        got = [x[0] for x in r["filtered_resps"]]
        assert got == pytest.approx(lls, abs=1e-3)
        best = max(range(len(lls)), key=lls.__getitem__)
        best_norm = max(range(len(lls)), key=lambda j: lls[j] / len(item["choices"][j]))
        assert r["acc"] == float(best == item["answer_index"])
        assert r["acc_norm"] == float(best_norm == item["answer_index"])
    assert scores["items"]["mol_medqa"]["acc"] == [r["acc"] for r in recs]




def test_paired_standard_error_by_hand():
    # d = trained - base = [0, -1, 1, 1, 0]: mean 0.2; sample variance (0.04 + 1.44 + 0.64 + 0.64 + 0.04) / 4 = 0.7
    d, se = H.paired_delta([1, 1, 0, 0, 1], [1, 0, 1, 1, 1])
    assert d == pytest.approx(0.2) and se == pytest.approx(math.sqrt(0.7 / 5))
    assert H.paired_delta([1] * 10, [1] * 10) == (0.0, 0.0)
    d, se = H.paired_delta([0.0, 0.0], [1.0, 0.0])  # one item changed of two: SE = sd([1, 0]) / sqrt(2)
    assert d == 0.5 and se == pytest.approx(math.sqrt(0.5 / 2))
    with pytest.raises(H.HarnessError):
        H.paired_delta([1, 0], [1])




def test_summarize_and_compare_constructed_samples():
    """lm-eval's output shape -> per-item values in doc order, one series per filter, chance from the
    number of choices; pairing refuses different documents."""
    def rec(doc_id, acc, n_choices=4, filt="none", metrics=("acc",)):
        return {"doc_id": doc_id, "filter": filt, "metrics": list(metrics), "acc": acc,
                "filtered_resps": [[-1.0, False]] * n_choices}

    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.3},
                       "g": {"exact_match,strict": 1.0, "exact_match_stderr,strict": "N/A"}},
           "configs": {"t": {"output_type": "multiple_choice"}, "g": {"output_type": "generate_until"}},
           "samples": {"t": [rec(1, 0.0, 2), rec(0, 1.0, 4)],
                       "g": [{"doc_id": 0, "filter": "strict", "metrics": ["exact_match"], "exact_match": 1}]}}
    s = H.summarize(out)
    assert s["metrics"] == {"acc/t": 0.5, "exact_match,strict/g": 1.0}
    assert s["items"]["t"] == {"doc_ids": [0, 1], "acc": [1.0, 0.0]}
    assert s["items"]["g"] == {"doc_ids": [0], "exact_match,strict": [1.0]}
    assert s["tasks"]["t"] == {"n": 2, "output_type": "multiple_choice", "chance": pytest.approx((1 / 4 + 1 / 2) / 2)}
    assert s["tasks"]["g"]["chance"] is None
    other = {"items": {"t": {"doc_ids": [0, 1], "acc": [1.0, 1.0]}}}
    assert H.compare(s, other) == {"acc/t": {"delta": 0.5, "se": 0.5, "n": 2}}
    with pytest.raises(H.HarnessError, match="different documents"):
        H.compare(s, {"items": {"t": {"doc_ids": [0, 2], "acc": [1.0, 1.0]}}})




def test_unknown_task_is_refused_before_any_model_loads(tmp_path, no_network):
    """Names outside MoL's tasks are looked up in lm-eval's own index (local files, no download)."""
    with pytest.raises(H.HarnessError, match="hellaswagg.*did you mean.*hellaswag"):
        H.resolve_tasks([], ["hellaswagg"], tmp_path, 3)
    assert no_network == []


def test_a_task_file_of_ones_own_takes_the_sampling_settings(tiny, tmp_path, no_network):
    """eval.tasks also takes the path of a task YAML (here a generation task on a local JSONL file);
    eval.gen_kwargs reach the model's generate() over the task's own settings."""
    model, tok = tiny
    data = write_jsonl(tmp_path / "q.jsonl", [{"q": "2 + 2 =", "a": "4"}, {"q": "The sky is", "a": "blue"}])
    task = tmp_path / "my_gen.yaml"
    task.write_text(f"""task: my_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["\\n\\n"], do_sample: false, max_gen_toks: 64}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
""")
    with H.resolve_tasks([], [str(task)], tmp_path, None) as ts:
        scores, samples = H.run_tasks(model, tok, ts, chat_template=False, batch_size=2,
                                      gen_kwargs={"max_gen_toks": 3, "do_sample": True, "temperature": 0.6,
                                                  "top_p": 0.95, "top_k": 20})
    assert no_network == []
    (name,) = samples
    recs = samples[name]
    assert len(recs) == 2 and scores["tasks"][name] == {"n": 2, "output_type": "generate_until", "chance": None}
    for r in recs:
        settings = r["arguments"][0][1]
        assert settings["max_gen_toks"] == 3 and settings["temperature"] == 0.6 and settings["top_k"] == 20
        assert len(tok(r["resps"][0][0], add_special_tokens=False)["input_ids"]) <= 3
    assert scores["items"][name]["exact_match"] == [r["exact_match"] for r in sorted(recs, key=lambda r: r["doc_id"])]
