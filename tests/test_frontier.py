"""`make frontier` end to end on the tiny model (grid + forgetting pair as real subprocesses, a second
call redoing nothing but a killed run, which resumes), and the front / verdict logic on constructed
results."""

import json
import math
import os
import shutil
import sys

import pytest
import yaml

from conftest import GEN, MED, tiny_config, write_jsonl
from mol import frontier as F
from mol.config import ConfigError, load_config

UNSEEN = [{"text": f"Story {i}: a sailor leaves his village at dawn, crosses the mountains in winter and "
                   f"returns years later to find the inn rebuilt by his sister."} for i in range(20)]


def _config(root, tiny_model_dir):
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    cfg = tiny_config(tiny_model_dir, corpora, root / "caches")
    cfg["data"]["sources"].append({"path": str(write_jsonl(root / "unseen.jsonl", UNSEEN)), "corpus": "general",
                                   "subset": "unseen", "heldout": True})
    cfg["train"] = {"global_batch": 4, "micro_batch": 2, "max_steps": 2, "eval_every": 0, "lr": 1e-3,
                    "lora": {"r": 4, "alpha": 8}}
    cfg["eval"] = {"mcq_sets": [], "mcq_items": 0}
    config = root / "frontier.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.fixture(scope="module")
def frontier(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    # the MCQs through lm-eval are make experiment's path (tests/test_experiment.py); without them the
    # frontier runs no evaluation subprocess, so the whole command fits in well under a minute
    plan = F.FrontierPlan(_config(root, tiny_model_dir), [], root / "out", jobs=2, alphas=(0.01,),
                          ratios=(0.5, 1.0, 2.0), page=root / "page", mcq_items=0,
                          forgetting=("train.finetune=full", "train.max_steps=2", "train.eval_every=1"))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + sys.path)  # the subprocesses import stages/, mol/
    try:
        yield plan, F.run_frontier(plan)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_heldout_source_is_validation_only(frontier):
    plan, _ = frontier
    summary = json.loads((plan.out / "forget-ce" / "summary.json").read_text())
    from mol.cache import TeacherCache
    cache = TeacherCache(summary["cache_dir"])
    assert "unseen" not in set(cache.load("train").subset)
    assert list(cache.load("val").subset).count("unseen") >= 5  # every story, none to training


def test_page_front_and_curves(frontier):
    plan, page = frontier
    res = json.loads((plan.page / "results.json").read_text())
    names = {s.name for s in plan.grid}
    assert names == {"ce-r1", "mol-a0.01-r0.5", "mol-a0.01-r1", "mol-a0.01-r2"}
    assert set(res["points"]) == names and res["front"] and set(res["front"]) <= names
    for p in res["points"].values():
        assert math.isfinite(p["gain"]) and p["drift"] >= 0
    assert [c["claim"][0] for c in res["claims"]] == ["1", "5"]
    assert res["claims"][1]["verdict"] in ("reproduced", "partly", "not reproduced")
    # the pair validated at every step; step 0 is the base, so its change is exactly 0
    for name in ("forget-ce", "forget-mol"):
        c = res["forgetting"]["curves"][name]
        assert [r["step"] for r in c] == [0, 1, 2]
        assert c[0]["d_ce"] == 0 and c[0]["se"] == 0 and all(r["se"] >= 0 for r in c)
        assert json.loads((plan.out / name / "summary.json").read_text())["final_step"] == 2
    text = page.read_text()
    # the page's command redoes this plan: its config and every option not at its default
    assert res["meta"]["command"] == (f"make frontier FRONTIER_CONFIG={plan.config} ARGS='--alphas 0.01 --forgetting "
                                      "\"train.finetune=full train.max_steps=2 train.eval_every=1\" --mcq-items 0'")
    assert res["meta"]["command"] in text
    assert "frontier.png" in text and "forgetting.png" in text and "make frontier" in text
    assert (plan.page / "frontier.png").stat().st_size > 10_000 and (plan.page / "forgetting.png").is_file()


def test_second_call_skips_and_redoes_only_what_is_missing(frontier):
    plan, _ = frontier
    first = json.loads((plan.page / "results.json").read_text())
    assert set(first["meta"]["trained_now"]) == {s.name for s in plan.grid + plan.pair}
    # a run killed after its last checkpoint, before its outputs: the next call resumes it, and only it
    victim = plan.out / "mol-a0.01-r2"
    (victim / "summary.json").unlink()
    shutil.rmtree(victim / "adapter")
    F.run_frontier(plan)
    again = json.loads((plan.page / "results.json").read_text())
    assert list(again["meta"]["trained_now"]) == ["mol-a0.01-r2"] and again["meta"]["evaluated_now"] == {}
    assert len(json.loads((victim / "run.json").read_text())["resumes"]) == 1 and (victim / "adapter").is_dir()
    # resumed from its checkpoint: the run lands on the same point
    for key in ("gain", "drift"):
        assert again["points"]["mol-a0.01-r2"][key] == pytest.approx(first["points"]["mol-a0.01-r2"][key], rel=1e-5)


def test_a_config_without_heldout_source_is_refused(tiny_model_dir, tmp_path):
    config = _config(tmp_path, tiny_model_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["sources"].pop()
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="heldout"):
        F.run_frontier(F.FrontierPlan(config, [], tmp_path / "out"))


def test_heldout_changes_the_cache_key_only_when_set(tiny_model_dir, tmp_path):
    from mol.cache import resolve_cache_key
    config = _config(tmp_path, tiny_model_dir)
    on = resolve_cache_key(load_config(config))
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["sources"][-1]["heldout"] = False
    config.write_text(yaml.safe_dump(cfg))
    off = resolve_cache_key(load_config(config))
    assert on.units[-1].key["source"]["heldout"] is True and "heldout" not in off.units[-1].key["source"]
    assert on.units[0].fingerprint == off.units[0].fingerprint  # the other sources keep their units


# ------------------------------------------------------------------ the logic, on constructed results


def _pts(**runs):
    return {n: {"label": n, "gain": g, "drift": d} for n, (g, d) in runs.items()}


def test_pareto_front_and_recommendation():
    pts = _pts(**{"ce-r1": (0.60, 0.20), "mol-a0.01-r0.5": (0.58, 0.05), "mol-a0.01-r1": (0.55, 0.03),
                  "mol-a0.01-r2": (0.50, 0.02), "mol-a0.5-r1": (0.30, 0.01), "mol-a0.1-r1": (0.45, 0.04)})
    front = F.pareto_front(pts)
    assert front == ["mol-a0.5-r1", "mol-a0.01-r2", "mol-a0.01-r1", "mol-a0.01-r0.5", "ce-r1"]  # a0.1 dominated
    assert F.recommend(pts, front, "ce-r1") == "mol-a0.01-r0.5"  # 0.05 <= 0.25 * 0.20, the largest gain
    pts["mol-a0.01-r0.5"]["drift"] = 0.06
    assert F.recommend(pts, F.pareto_front(pts), "ce-r1") == "mol-a0.01-r1"
    # ties: equal points dominate neither
    assert set(F.pareto_front(_pts(a=(1, 1), b=(1, 1)))) == {"a", "b"}


def _curve(d_ces, se=0.01, domain=(10.0, 8.0)):
    n = len(d_ces)
    return [{"step": 5 * i, "d_ce": d, "se": 0.0 if i == 0 else se, "ppl_unseen": 20 * math.exp(d),
             "ppl_domain": domain[0] + (domain[1] - domain[0]) * i / (n - 1)} for i, d in enumerate(d_ces)]


def test_verdicts_follow_the_numbers():
    pts = _pts(**{"mol-a0.01-r0.5": (0.5, 0.05), "mol-a0.01-r1": (0.55, 0.03), "mol-a0.01-r2": (0.4, 0.03)})
    nan = [float("nan")] * 2
    pair = {"forget-ce": {"general_mcq": nan}, "forget-mol": {"general_mcq": nan}}
    curves = {"forget-ce": _curve([0, 0.01, 0.05, 0.08]), "forget-mol": _curve([0, 0.0, 0.005, 0.01])}
    v = {c["claim"][0]: c["verdict"] for c in F.judge_frontier(pts, F.pareto_front(pts), curves, pair)}
    assert v == {"1": "reproduced", "5": "reproduced"}

    # CE-only's rise measured only in the middle of the run: partly; 1:1 on the front without beating 1:0.5
    curves["forget-ce"] = _curve([0, 0.05, 0.01, 0.015])
    pts["mol-a0.01-r0.5"] = {"label": "r0.5", "gain": 0.6, "drift": 0.05}
    v = {c["claim"][0]: c["verdict"] for c in F.judge_frontier(pts, F.pareto_front(pts), curves, pair)}
    assert v == {"1": "partly", "5": "partly"}

    # no rise beyond 2 SE and no MCQ loss: not reproduced; 1:1 dominated: not reproduced
    curves["forget-ce"] = _curve([0, 0.01, 0.015, 0.012])
    pts["mol-a0.01-r2"] = {"label": "r2", "gain": 0.56, "drift": 0.02}
    v = {c["claim"][0]: c["verdict"] for c in F.judge_frontier(pts, F.pareto_front(pts), curves, pair)}
    assert v == {"1": "not reproduced", "5": "not reproduced"}

    # a general MCQ loss beyond 2 SE at the end counts as forgetting too
    pair["forget-ce"]["general_mcq"] = [-0.05, 0.02]
    v = {c["claim"][0]: c["verdict"] for c in F.judge_frontier(pts, F.pareto_front(pts), curves, pair)}
    assert v["1"] == "reproduced"

    # a CE-only run that only drifts (KL on the unseen set > 2x MoL's) without a measured loss: partly
    pair["forget-ce"]["general_mcq"] = nan
    for name, kl in (("forget-ce", 0.05), ("forget-mol", 0.01)):
        curves[name][-1]["kl_unseen"] = kl
    v = {c["claim"][0]: c["verdict"] for c in F.judge_frontier(pts, F.pareto_front(pts), curves, pair)}
    assert v["1"] == "partly"

    # MoL forgetting as much as CE-only: not the claim
    curves = {"forget-ce": _curve([0, 0.01, 0.05, 0.08]), "forget-mol": _curve([0, 0.01, 0.05, 0.08])}
    v = {c["claim"][0]: c["verdict"] for c in F.judge_frontier(pts, F.pareto_front(pts), curves, pair)}
    assert v["1"] == "partly"


def test_cli_reports_every_problem_at_once(tmp_path, capsys):
    from stages.frontier import main
    code = main([str(tmp_path / "missing.yaml"), "--alphas", "0.01,2", "--ratios", "x", "--jobs", "0",
                 "--forgetting", "train.lr"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for needle in ("α must be in (0, 1), got 2", "--ratios must be comma-separated", "--jobs must be >= 1",
                   "'train.lr' is not key=value"):
        assert needle in err
