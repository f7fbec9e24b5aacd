"""Stage 1 end to end on a tiny random model (mol/teacher.py): the labeller against float64, the cache
equals a direct forward pass, is deterministic, resumes, refuses a foreign shard and a second writer,
shares units between configs, and two sharded workers give one worker's cache."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_sqrt_grid, cache_shards, cache_units, tiny_config
from mol import cache as C
from mol.config import load_config
from mol.model import load_model
from mol.cache import cache_lock
from mol.teacher import run_teacher_pass


def _direct(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1)


def _ascending(top):
    """The cache's order: ids ascending, probabilities permuted with them."""
    order = np.argsort(top.indices.numpy(), axis=1)
    return (np.take_along_axis(top.indices.numpy(), order, 1),
            np.take_along_axis(top.values.exp().numpy(), order, 1))


def test_topk_from_hidden_matches_a_float64_dense_softmax():
    """The in-place single-exp labeller against log_softmax in float64, peaked rows included
    (residuals down to ~1e-13, where 1 - Σp in fp32 would be all noise)."""
    from mol.labels import topk_from_hidden

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(96, 16, generator=g), torch.randn(300, 16, generator=g)
    hidden[32:64] *= 4
    hidden[64:] *= 12
    ids, probs, resid = topk_from_hidden(hidden, weight, 7, chunk=40)
    # the same fp32 logits the labeller sees, normalised in float64: only the labeller is under test
    logp = torch.log_softmax((hidden @ weight.T).double(), -1)
    top = torch.topk(logp, 7, dim=-1)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(probs.double(), top.values.exp(), rtol=1e-6, atol=1e-9)
    exact_resid = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1).exp()
    assert exact_resid.min() < 1e-10
    torch.testing.assert_close(resid.double(), exact_resid, rtol=1e-5, atol=1e-38)  # fp32 subnormals below


def test_cache_equals_direct_forward(built, tiny_model_dir):
    cfg, cache_dir = built
    cache = C.TeacherCache(cache_dir)
    assert cache.verify() == []
    model = load_model(tiny_model_dir, cfg.model).eval()
    seqs = cache.load("train")
    assert seqs.has_teacher.all()
    for i in range(len(seqs)):
        r = seqs.row(i)
        logp = _direct(model, r[C.INPUT_IDS].tolist())
        top = torch.topk(logp, cfg.teacher.top_k, dim=-1)
        ids, probs = _ascending(top)
        assert np.array_equal(r[C.TOPK_IDS].astype(np.int64), ids)
        assert_sqrt_grid(r[C.TOPK_PROBS], probs)
        exact_resid = 1 - top.values.exp().sum(-1).numpy()
        np.testing.assert_allclose(r[C.RESIDUAL], exact_resid, rtol=1e-3, atol=1e-7)  # log code: 5.3e-4 relative


def test_rerun_is_a_no_op_and_changes_make_a_new_cache(built, tiny_model_dir, corpora, tmp_path):
    cfg, cache_dir = built
    before = (cache_dir / "manifest.json").stat().st_mtime_ns
    again, status = run_teacher_pass(cfg)
    assert (again, status) == (cache_dir, "up-to-date")
    assert (cache_dir / "manifest.json").stat().st_mtime_ns == before
    other, status = run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "caches",
                                                                   teacher={"top_k": 4})))
    assert other != cache_dir and status == "built"


def test_deterministic_and_resumes_after_partial_run(built, tiny_model_dir, corpora, tmp_path):
    cfg, cache_dir = built
    gen = cache_units(cache_dir)[1]
    unit = json.loads((gen / "manifest.json").read_text())
    assert len(unit["shards"]) >= 3
    # simulate a run killed after two shards of the general unit: no manifests, later shards missing,
    # a temp file left over
    (cache_dir / "manifest.json").unlink()
    (gen / "manifest.json").unlink()
    for s in unit["shards"][2:]:
        (gen / s["file"]).unlink()
    (gen / (unit["shards"][2]["file"] + ".tmp999")).write_bytes(b"half a shard")
    _, status = run_teacher_pass(cfg)
    assert status == "resumed"
    resumed = json.loads((gen / "manifest.json").read_text())
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in unit["shards"]]
    assert not list(gen.glob("*.tmp*"))
    # a fresh build elsewhere gives byte-identical shards
    fresh_cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "fresh"))
    fresh_dir, _ = run_teacher_pass(fresh_cfg)
    assert [C.sha256_path(p) for p in cache_shards(fresh_dir)] == [C.sha256_path(p) for p in cache_shards(cache_dir)]


def test_a_foreign_shard_is_refused_on_resume(built):
    """A valid shard of another segment placed under a missing shard's name is not trusted."""
    cfg, cache_dir = built
    gen = cache_units(cache_dir)[1]
    unit = json.loads((gen / "manifest.json").read_text())
    (cache_dir / "manifest.json").unlink()
    (gen / "manifest.json").unlink()
    last = gen / unit["shards"][-1]["file"]
    last.unlink()
    (gen / unit["shards"][0]["file"]).rename(gen / unit["shards"][0]["file"].replace("-00000.", "-00009."))
    import shutil

    shutil.copy(gen / unit["shards"][1]["file"], gen / unit["shards"][0]["file"])
    with pytest.raises(C.CacheError, match="not a shard this pass wrote"):
        run_teacher_pass(cfg)


def test_second_writer_is_refused(built):
    _, cache_dir = built
    with cache_lock(cache_dir):
        with pytest.raises(C.CacheError, match="lock"):
            with cache_lock(cache_dir):
                pass


def test_unlabelled_domain_rows(tiny_model_dir, corpora, tmp_path):
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "c", teacher={"label_domain": False}))
    cache_dir, _ = run_teacher_pass(cfg)
    cache = C.TeacherCache(cache_dir)
    assert cache.label_domain is False
    assert not cache.load("train", corpus="domain").has_teacher.any()
    assert cache.load("train", corpus="general").has_teacher.all()


@pytest.mark.slow
def test_real_smollm2_cache_matches_forward(real_model_dir, corpora, tmp_path):
    """The real default model on a few short sequences: ids exact, probs to the sqrt grid, residual to fp16."""
    cfg = load_config(data=tiny_config(real_model_dir, corpora, tmp_path / "real",
                                       data={"max_seq_len": 24, "max_train_sequences": 2, "max_val_sequences": 1},
                                       teacher={"top_k": 31, "fidelity_sequences": 1}))
    cache_dir, _ = run_teacher_pass(cfg)
    model = load_model(real_model_dir, cfg.model).eval()
    seqs = C.TeacherCache(cache_dir).load("train")
    for i in range(len(seqs)):
        r = seqs.row(i)
        logp = _direct(model, r[C.INPUT_IDS].tolist())
        top = torch.topk(logp, 31, dim=-1)
        ids, probs = _ascending(top)
        # near-equal logits at the k-th place may swap in or out of the set
        same = (r[C.TOPK_IDS].astype(np.int64) == ids).all(1)
        assert same.mean() > 0.95
        assert_sqrt_grid(r[C.TOPK_PROBS][same], probs[same])
        np.testing.assert_allclose(r[C.RESIDUAL], 1 - top.values.exp().sum(-1).numpy(), rtol=2e-3, atol=1e-5)


def test_two_workers_equal_one(tiny_model_dir, corpora, tmp_path):
    """Sharded Stage 1: two worker processes in parallel, then finalize, give the single-worker cache.
    Small segments, so each source is split between the workers."""
    import os
    import subprocess
    import sys

    import yaml

    over = {"data": {"segment_bytes": 1024}}
    single_cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "one", **over))
    one_dir, _ = run_teacher_pass(single_cfg)
    data = tiny_config(tiny_model_dir, corpora, tmp_path / "two", **over)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stages.teacher_cache", str(config), "teacher.num_workers=2"]
    # finalize before the workers ran: refused, naming the unfinished segments and their workers
    r = subprocess.run(cmd + ["--finalize"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "segment 0: 0 part(s) written, not finished (worker 0)" in r.stderr, r.stderr
    assert "(worker 1)" in r.stderr
    workers = [subprocess.Popen(cmd + [f"teacher.worker_index={i}"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    assert all("done" in o for o in outs)
    cache_dir = tmp_path / "two" / "sets" / one_dir.name  # same fingerprint: the worker count is not part of the key
    assert not (cache_dir / C.MANIFEST).exists()
    r = subprocess.run(cmd + ["--finalize"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    one, two = C.TeacherCache(one_dir), C.TeacherCache(cache_dir)
    assert two.verify() == []
    for a, b in zip(one.units, two.units):
        assert [s["sha256"] for s in b.manifest["shards"]] == [s["sha256"] for s in a.manifest["shards"]]
        assert b.manifest["segments"] > 1 and b.manifest["run"]["workers"] == 2
        for key in ("counts", "totals", "source", "key"):
            assert b.manifest[key] == a.manifest[key], key
    assert two.manifest["fingerprint"] == one.manifest["fingerprint"]
    for key in ("counts", "totals", "key"):
        assert two.manifest[key] == one.manifest[key], key


def test_units_are_shared_between_configs(tiny_model_dir, corpora, tmp_path):
    """Config A (domain X + general G), then config B (domain Y + general G): B labels no token of
    G and says so; dropping a source from a config leaves every unit as it was."""
    from conftest import write_jsonl

    other = write_jsonl(tmp_path / "other.jsonl", [{"text": f"Dosage note {i}: take with food."} for i in range(40)])
    root = tmp_path / "shared"
    a = tiny_config(tiny_model_dir, corpora, root)
    b = tiny_config(tiny_model_dir, {"med": other, "gen": corpora["gen"]}, root)
    b["data"]["sources"][0]["subset"] = "notes"
    a_dir, status = run_teacher_pass(load_config(data=a))
    assert status == "built"
    before = {p: p.stat().st_mtime_ns for p in (root / "units").rglob("*") if p.is_file()}
    b_dir, status = run_teacher_pass(load_config(data=b))
    assert status == "built" and b_dir != a_dir
    m = C.TeacherCache(b_dir).manifest
    gen = next(u for u in m["units"] if u["corpus"] == "general")
    assert gen["this_pass"] == {"status": "reused", "labelled_tokens": 0}
    assert gen["dir"] == C.TeacherCache(a_dir).manifest["units"][1]["dir"]
    notes = next(u for u in m["units"] if u["corpus"] == "domain")
    assert notes["this_pass"]["status"] == "built" and notes["this_pass"]["labelled_tokens"] > 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "B rewrote a unit of A"
    # only the general source: a new set, no new unit, nothing rewritten
    g_only = tiny_config(tiny_model_dir, corpora, root)
    g_only["data"]["sources"] = g_only["data"]["sources"][1:]
    n_units = len(list((root / "units").iterdir()))
    g_dir, status = run_teacher_pass(load_config(data=g_only))
    assert status == "reused" and len(list((root / "units").iterdir())) == n_units
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert C.TeacherCache(g_dir).verify() == []


def test_a_copied_unit_is_used_after_its_checks_and_refused_for_another_model(built, tiny_model_dir, corpora, tmp_path):
    import shutil

    cfg, cache_dir = built
    gen = cache_units(cache_dir)[1]
    # a second machine already has the general unit (copied, e.g. downloaded from the Hub)
    root = tmp_path / "elsewhere"
    shutil.copytree(gen, root / "units" / gen.name)
    d, status = run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, root)))
    m = C.TeacherCache(d).manifest
    assert [u["this_pass"]["status"] for u in m["units"]] == ["built", "reused"]
    # the same unit edited to claim another model: refused, not used
    root2 = tmp_path / "tampered"
    shutil.copytree(gen, root2 / "units" / gen.name)
    mf = root2 / "units" / gen.name / "manifest.json"
    um = json.loads(mf.read_text())
    um["key"]["model_fingerprint"] = "0" * 64
    mf.write_text(json.dumps(um))
    with pytest.raises(C.CacheError, match="model_fingerprint 000000000000 != this run's"):
        run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, root2)))


def test_a_single_pass_and_a_sharded_worker_exclude_each_other(tiny_model_dir, corpora, tmp_path):
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "c"))
    set_dir = C.resolve_cache_key(cfg).cache_dir
    with cache_lock(set_dir, worker=1, shared=True):  # a running worker of a sharded pass
        with pytest.raises(C.CacheError, match="another teacher pass is writing this cache"):
            run_teacher_pass(cfg)
        with cache_lock(set_dir, worker=0, shared=True):  # another worker is fine
            pass
        with pytest.raises(C.CacheError, match="another process as worker 1"):
            with cache_lock(set_dir, worker=1, shared=True):
                pass
    with cache_lock(set_dir):  # a single pass (or a finalize) running: a worker is refused
        with pytest.raises(C.CacheError, match="a single \\(unsharded\\) pass or a finalize"):
            run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "c",
                                                          teacher={"num_workers": 2, "worker_index": 0})))
