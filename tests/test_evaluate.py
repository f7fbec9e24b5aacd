"""Evaluation on a fake run folder: a tiny cache, a perturbed LoRA adapter on the tiny random
Llama, and small MCQ sets run as lm-eval tasks (one through its shipped task file, one through the
template). Checks the metrics' meaning (base KL-to-base ~ 0, the paired change and its standard
error are the per-item ones, everything offline) rather than values."""

import json
import math
import shutil

import pytest
import torch

from conftest import GEN, MED, refuse_network, tiny_config, write_jsonl
from mol import harness as H
from mol import lm_eval_tasks as T
from mol.config import ConfigError, dump_config, load_config
from mol.errors import MissingInput
from mol.evaluate import EVAL_JSON, EVAL_MD, EVAL_SAMPLES, evaluate_run, format_table
from mol.model import load_model
from mol.teacher import run_teacher_pass

MCQ = {
    # a name with a shipped task file (mol/lm_eval_tasks/mol_medqa.yaml), read from this test's folder
    "medqa": [
        {"id": "c1", "question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"],
         "answer_index": 0},
        {"id": "c2", "question": "What is the capital of Italy?", "choices": ["Madrid", "Rome"], "answer_index": 1},
        {"id": "c3", "question": "Which city is the capital of Japan?",
         "choices": ["Tokyo", "Osaka", "Kyoto", "Nagoya"], "answer_index": 0},
        {"id": "c4", "question": "Not used: beyond mcq_items.", "choices": ["a", "b"], "answer_index": 0},
    ],
    # a set of the user's own: its task is generated from the template
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

    with pytest.MonkeyPatch.context() as mp:
        attempts = refuse_network(mp)
        res = evaluate_run(run_dir, eval_dir=eval_dir, make_bar=make_bar)
    res["_bars"], res["_network"] = calls, attempts
    return res


def test_result_and_files(result, fake_run):
    run_dir, eval_dir = fake_run
    base, trained = result["base"], result["trained"]
    assert result["_network"] == []  # offline: the tasks read their local files
    assert result["subsets"] == {"med": "domain", "gen": "general"}
    assert result["mcq_items"] == 3 and result["chat_template"] is True
    assert list(result["tasks"]) == ["mol_medqa", "mol_colours"]
    medqa, colours = result["tasks"]["mol_medqa"], result["tasks"]["mol_colours"]
    assert medqa["n"] == 3 and colours["n"] == 2
    assert medqa["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert medqa["file"] == str(eval_dir / "medqa.jsonl")
    assert result["metrics"] == ["acc/mol_medqa", "acc_norm/mol_medqa", "acc/mol_colours", "acc_norm/mol_colours"]
    for m in (base, trained):
        for key in ("med", "gen", "domain", "general"):
            assert m[f"ppl/{key}"] == pytest.approx(math.exp(m[f"ce/{key}"]))
        for key in result["metrics"]:
            metric, task = key.split("/")
            items = m["items"][task]
            assert items["doc_ids"] == list(range(result["tasks"][task]["n"]))
            assert set(items[metric]) <= {0.0, 1.0}
            assert m[key] == pytest.approx(sum(items[metric]) / len(items[metric]))  # lm-eval's mean = ours
    # the base model is the teacher: its KL to the cached labels is only fp16 rounding
    assert abs(base["kl_to_base/general"]) < 1e-3 and abs(base["kl_to_base/domain"]) < 1e-3
    assert trained["kl_to_base/general"] > 1e-3
    assert abs(trained["ppl/general"] - base["ppl/general"]) / base["ppl/general"] > 1e-3
    assert result["delta"]["ppl/med"] == pytest.approx(trained["ppl/med"] - base["ppl/med"])
    for key in result["metrics"]:
        metric, task = key.split("/")
        d, se = H.paired_delta(base["items"][task][metric], trained["items"][task][metric])
        assert result["paired"][key] == {"delta": pytest.approx(d), "se": pytest.approx(se), "n": len(
            base["items"][task][metric])}
        assert result["delta"][key] == pytest.approx(d)

    saved = json.loads((run_dir / EVAL_JSON).read_text())
    assert saved["base"]["ppl/general"] == pytest.approx(base["ppl/general"])
    md = (run_dir / EVAL_MD).read_text()
    assert "| metric | base | trained | change |" in md and "acc_norm/mol_colours" in md and "lm-evaluation-harness" in md
    for label in ("base", "trained"):
        recs = [json.loads(x) for x in (run_dir / EVAL_SAMPLES / label / "mol_medqa.jsonl").read_text().splitlines()]
        assert [r["doc"]["id"] for r in recs] == ["c1", "c2", "c3"]

    # the perplexity bars were filled exactly: totals are true totals
    assert [d for d, _, _ in result["_bars"]] == ["val base", "val trained"]
    for desc, total, done in result["_bars"]:
        assert total > 0 and done == total, desc


def test_table_has_every_row(result):
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "trained", "change"]
    labels = [ln.split()[0] for ln in lines[2:]]
    assert labels == ["ppl/med", "ppl/gen", "ppl/domain", "ppl/general", "kl_to_base/domain",
                      "kl_to_base/general", "acc/mol_medqa", "acc_norm/mol_medqa", "acc/mol_colours",
                      "acc_norm/mol_colours"]
    assert "(n=3, chance 36.1%)" in table and "%" in lines[2]
    p = result["paired"]["acc_norm/mol_colours"]
    assert lines[-1].endswith(f"{100 * p['delta']:+.1f} ± {100 * p['se']:.1f} pt")




def test_missing_or_bad_eval_files(fake_run, tmp_path):
    run_dir, _ = fake_run
    with pytest.raises(MissingInput, match="medqa.jsonl"):
        evaluate_run(run_dir, eval_dir=tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer_index": 2}])
    with pytest.raises(T.McqFileError, match="bad.jsonl:1.*answer_index"):
        T.load_mcq_set(bad)
    # the same checks before any model loads, and when lm-eval reads the file through the task
    with pytest.raises(T.McqFileError, match="bad.jsonl:1.*answer_index"):
        H.resolve_tasks(["bad"], [], tmp_path, None)
    with pytest.raises(T.McqFileError, match="bad.jsonl:1.*answer_index"):
        T.mcq_dataset("bad", tmp_path)
    with pytest.raises(ConfigError, match="only eval"):
        evaluate_run(run_dir, eval_dir=tmp_path, overrides=["train.lr=1"])




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
    assert main([str(run_dir), "model.name=x"]) == 2
    assert "only eval.* settings" in capsys.readouterr().err

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main([str(copy), "--mcq-items", "1", "--eval-dir", str(eval_dir), "eval.mcq_sets=[colours]",
                 "eval.chat_template=false"]) == 0
    out = capsys.readouterr().out
    assert "ppl/general" in out and "acc_norm/mol_colours (n=1" in out and "mol_medqa" not in out
    assert str(copy / EVAL_JSON) in out
    assert json.loads((copy / EVAL_JSON).read_text())["chat_template"] is False


def test_tasks_only_skips_the_heldout_pass(fake_run, tmp_path, capsys):
    """make frontier's evaluation: lm-eval's tasks alone, and a base file keyed apart from a full one."""
    from stages.eval import main

    run_dir, eval_dir = fake_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    base_json = tmp_path / "base.json"
    assert main([str(copy), "--tasks-only", "--mcq-items", "1", "--eval-dir", str(eval_dir),
                 "--base-json", str(base_json), "eval.mcq_sets=[colours]"]) == 0
    res = json.loads((copy / EVAL_JSON).read_text())
    assert not [k for k in res["trained"] if k.startswith(("ppl/", "ce/", "kl_to_base/"))]
    assert "acc_norm/mol_colours" in res["trained"] and "acc_norm/mol_colours" in res["base"]
    assert json.loads(base_json.read_text())["key"]["heldout"] is False
    capsys.readouterr()
