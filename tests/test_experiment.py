"""`make experiment` end to end on the tiny model (every run a real subprocess, the base evaluated
once, a second call redoing nothing), and the claim verdicts on constructed results."""

import json
import math
import os
import sys

import pytest
import yaml

from conftest import GEN, MED, tiny_config, write_jsonl
from mol import experiment as X

MCQ = [{"id": f"q{i}", "question": f"Question {i}: which one?", "choices": ["alpha", "beta", "gamma"],
        "answer_index": i % 3} for i in range(4)]


@pytest.fixture(scope="module")
def experiment(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    cfg = tiny_config(tiny_model_dir, corpora, root / "caches")
    cfg["train"] = {"global_batch": 4, "micro_batch": 2, "max_steps": 2, "eval_every": 1, "lr": 1e-3,
                    "grad_probe_sequences": 2, "lora": {"r": 4, "alpha": 8}}
    cfg["eval"] = {"mcq_sets": ["medqa", "piqa", "openbookqa"], "mcq_items": 3}
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    eval_dir = root / "eval"
    eval_dir.mkdir()
    for name in cfg["eval"]["mcq_sets"]:
        write_jsonl(eval_dir / f"{name}.jsonl", MCQ)
    plan = X.Plan(config, [], root / "out", jobs=2, page=root / "page", eval_dir=eval_dir)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + sys.path)  # the subprocesses import stages/, mol/
    try:
        page = X.run_experiment(plan)
        yield plan, page
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_page_runs_and_shared_base(experiment):
    plan, page = experiment
    text = page.read_text()
    res = json.loads((plan.page / "results.json").read_text())
    assert [c["claim"][0] for c in res["claims"]] == list("12345")
    assert all(c["verdict"] in ("reproduced", "partly", "not reproduced", "not measured") for c in res["claims"])
    assert set(res["table"]) == {"base"} | {r.name for r in X.RUNS}
    for name in res["table"]:
        assert res["table"][name]["ppl/domain"] > 0
    # every run trained the same steps; the probe logged both gradient norms at every validation
    for spec in X.RUNS:
        summary = json.loads((plan.out / spec.name / "summary.json").read_text())
        assert summary["final_step"] == 2
        probe = X.grad_probe_series(plan.out / spec.name)
        assert [p[0] for p in probe] == [0, 1, 2] and all(c > 0 and kl >= 0 for _, c, kl in probe)
        assert probe[0][2] < 1e-3 * probe[0][1]  # student = teacher at step 0: no KL gradient
    # the base model was evaluated once and shared
    logs = [(plan.out / "logs" / f"{s.name}-eval.log").read_text() for s in X.RUNS]
    assert sum("base model figures from" in t for t in logs) == len(X.RUNS) - 1
    for p in plan.page.glob("*.png"):
        assert p.name in text
    assert len(list(plan.page.glob("*.png"))) >= 8
    assert "| base (no training) |" in text and "make experiment" in text
    # the MCQ columns come from lm-eval's tasks for MoL's sets, with the paired change vs the base
    assert "acc_norm mol_piqa (n=3, chance 33%)" in text and "lm-evaluation-harness" in text
    ev = json.loads((plan.out / "mol-1to1" / "eval.json").read_text())
    assert list(ev["tasks"]) == ["mol_medqa", "mol_piqa", "mol_openbookqa"]


def test_second_call_redoes_nothing(experiment):
    plan, _ = experiment
    assert X.train_runs(plan) == {} and X.eval_runs(plan) == {}


def _res(**ppl):
    """Constructed results: {run: (domain ppl, general ppl, KL general, general items right)}, per-item
    values where eval.json keeps lm-eval's per-sample outcomes."""
    n = 200

    def metrics(d, g, kl, correct):
        hits = [1.0] * correct + [0.0] * (n - correct)
        items = {"doc_ids": list(range(n)), X.MCQ_METRIC: hits}
        return {"ppl/domain": d, "ppl/general": g, "kl_to_base/general": kl,
                "items": {t: items for t in X.GENERAL_TASKS}}

    runs = {name: {"label": name, "trained": metrics(*v), "summary": {}} for name, v in ppl.items()}
    return {"base": metrics(20.0, 20.0, 0.0, 120), "runs": runs}


def test_verdicts_follow_the_numbers(tmp_path):
    res = _res(**{"mol-1to1": (12.0, 19.5, 0.01, 119), "ce-1to1": (11.0, 21.0, 0.30, 95),
                  "mol-1to1-a0.5": (15.0, 19.6, 0.005, 120), "mol-1to0.5": (11.5, 20.5, 0.02, 118),
                  "mol-1to2": (14.0, 19.0, 0.005, 120)})
    (tmp_path / "mol-1to1").mkdir()
    (tmp_path / "mol-1to1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"type": "val", "step": 0, "grad_probe/ce": 1.0, "grad_probe/kl": 0.0},
        {"type": "val", "step": 5, "grad_probe/ce": 1.0, "grad_probe/kl": 0.2}]))
    v = {c["claim"][0]: c["verdict"] for c in X.judge_claims(res, tmp_path)}
    assert v == {"1": "reproduced", "2": "reproduced", "3": "reproduced", "4": "reproduced", "5": "reproduced"}

    # CE that learns the domain without any general loss: claim 1 is not reproduced (drift only: partly)
    res = _res(**{"mol-1to1": (12.0, 19.5, 0.01, 120), "ce-1to1": (11.0, 18.0, 0.30, 121),
                  "mol-1to1-a0.5": (12.1, 19.6, 0.005, 120), "mol-1to0.5": (11.5, 19.0, 0.02, 118),
                  "mol-1to2": (14.0, 19.0, 0.005, 120)})
    (tmp_path / "mol-1to1" / "metrics.jsonl").write_text(json.dumps(
        {"type": "val", "step": 5, "grad_probe/ce": 1.0, "grad_probe/kl": 2.0}) + "\n")
    v = {c["claim"][0]: c["verdict"] for c in X.judge_claims(res, tmp_path)}
    assert v["1"] == "partly" and v["3"] == "not reproduced" and v["4"] == "not reproduced"
    assert v["5"] == "not reproduced"  # 1:0.5 has the lower geometric-mean perplexity here


def test_paired_delta():
    d, se = X.paired_delta([1, 1, 0, 0], [1, 0, 0, 1])
    assert d == 0.0 and se == pytest.approx(0.4082, abs=1e-4)
    d, se = X.paired_delta([1] * 10, [1] * 10)
    assert d == 0.0 and se == 0.0
    # pooled over the general tasks' 2 x 200 items, 5 fewer right in each: d_i = -1 for 10 items, else 0;
    # sum of squared deviations 10 * 0.975^2 + 390 * 0.025^2 = 9.75
    res = _res(**{"ce-1to1": (11.0, 21.0, 0.3, 115)})
    d, se = X.general_acc_delta(res["base"], res["runs"]["ce-1to1"]["trained"])
    assert d == pytest.approx(-10 / 400) and se == pytest.approx(math.sqrt(9.75 / 399 / 400))
