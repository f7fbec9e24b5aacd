"""The benchmark runs end to end at tiny sizes and reports every figure (never a timed assertion)."""

import json
import math
import sys

import numpy as np
import pytest

from mol import bench as B
from mol import cache as C
from mol.bench import loss_path, sizes, stage1, storage, timing


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_bench_reports_every_figure(tiny_model_dir, tmp_path):
    from stages.bench import main

    out = tmp_path / "out"
    rc = main(["--quick", "--threads", "1", "--out", str(out), "--model", str(tiny_model_dir)])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    figs = {f["id"]: f for f in res["figures"]}
    assert set(figs) == set(B.FIGURE_IDS)
    for f in figs.values():
        assert _finite(f["measured"]) and f["measured"] >= 0, f
        assert isinstance(f["met"], bool) and f["goal_text"] and f["measured_text"]
    variants = res["storage"]["variants"]
    assert [v["name"] for v in variants[1:]] == [v.name for v in storage.STORAGE_VARIANTS[1:]]
    assert variants[0]["name"].startswith("current mol.cache schema")
    # the variants are written as changes to what mol.cache writes: unchanged, the same bytes
    assert res["storage"]["builder_check_bytes"] == pytest.approx(variants[0]["bytes"], rel=0.01)
    assert res["storage"]["builder_check_identical"]
    for v in variants:
        assert _finite(v["bytes_per_token"]) and _finite(v["kl_abs_mean"]) and _finite(v["kl_abs_max"]), v
    # the stored labels lose almost nothing (the fidelity column says how much)
    assert variants[0]["kl_abs_mean"] < 1e-3
    loss_rows = res["scaling"]["loss_path"]
    assert {r["sweep"] for r in loss_rows} == {"seq_len", "vocab"}
    for r in loss_rows:
        assert all(_finite(r[k]) for k in ("chunked_s", "naive_s", "chunked_peak_bytes", "naive_peak_bytes",
                                           "memory_ratio", "time_ratio", "mol_over_ce_time")), r
    assert all(_finite(r["ratio"]) for r in res["scaling"]["step_ratio"])
    # Stage 1 at scale: the whole pass with a stub teacher, its time split, its peak RSS at N and 10N tokens
    assert {"stage1_pipeline_tokens_per_s", "stage1_rss_10x"} <= set(figs)
    at = res["stage1_at_scale"]
    pipe = at["pipeline"]
    assert pipe["status"] == "built" and pipe["tokens"] > 0 and pipe["shards"] >= 1 and pipe["max_seq_len"] == 2048
    assert figs["stage1_pipeline_tokens_per_s"]["measured"] == pytest.approx(pipe["tokens"] / pipe["wall_s"])
    assert {"tokenize", "encode_labels", "writer: write_shard (Parquet encode + zstd + write + fsync)"} <= set(pipe["split"])
    assert pipe["cpu"]["process_cpu_s"] > 0 and "MainThread" in pipe["cpu"]["threads_cpu_s"]
    rss = at["rss"]
    assert 5 < rss["tokens_ratio"] < 20, rss["tokens_ratio"]
    assert figs["stage1_rss_10x"]["measured"] == pytest.approx(rss["10x"]["high_water_bytes"] / rss["1x"]["high_water_bytes"])
    # the zstd table: every level, the default marked, and at the default level the cache's own bytes
    z = res["zstd_levels"]
    assert [r["level"] for r in z["levels"]] == sorted(set(sizes.QUICK.zstd_levels) | {6})
    assert [r["level"] for r in z["levels"] if r["default"]] == [6]
    assert z["reencode_exact"] and z["reproduces_cache_bytes"]
    for r in z["levels"]:
        assert _finite(r["bytes_per_token"]) and _finite(r["writer_tokens_per_s"]) and r["writer_tokens_per_s"] > 0, r
    # the integrity checks' cost: the same cache verified and streamed with and without them
    for fid in ("reader_checks_throughput", "verify_checks_time"):
        c = figs[fid]["detail"]
        assert c["reader_tokens"] > 0 and all(len(v) == sizes.QUICK.reps for v in c["times"].values()), c
    assert figs["verify_checks_time"]["measured"] == pytest.approx(
        np.median(figs["verify_checks_time"]["detail"]["times"]["verify_full"])
        / np.median(figs["verify_checks_time"]["detail"]["times"]["decode_every_shard"]))
    meta = res["meta"]
    assert meta["machine"]["cpu"] and meta["machine"]["torch"] and meta["date"] and "stages.bench" in meta["command"]
    md = (out / "bench.md").read_text()
    assert "| figure | measured | goal | met? |" in md
    assert all(f["figure"] in md for f in res["figures"])
    assert "## zstd level" in md and "**6 (default)**" in md and "## Stage 1 at scale" in md


def test_naive_loss_is_extrapolated_from_the_two_largest_points():
    sz = sizes.BenchSizes(loss_tokens=8192, loss_seq_len=1024, loss_vocab=1000)
    gib = 2**30
    mem = {(8, 1024, 1000, "chunked"): {"peak_bytes": 3 * gib, "seconds": 1.0, "peak_reset": True},
           (1, 1024, 1000, "naive"): {"peak_bytes": 3 * gib},
           (2, 1024, 1000, "naive"): {"peak_bytes": 5 * gib}}
    h = loss_path.loss_path_headline(sz, 1024, mem)
    assert h["tokens"] == 8192
    assert h["naive_peak_bytes"] == pytest.approx(17 * gib)  # 3 + 2 GiB per 1024 tokens, 7 steps on
    assert h["ratio"] == pytest.approx(3 / 17)
    assert "extrapolated" in h["naive_how"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak reset via /proc/self/clear_refs")
def test_measure_peak_sees_only_the_work():
    ballast = np.ones(300 << 20, dtype=np.uint8)  # resident before the work: must not count
    res = timing.measure_peak(lambda: np.ones(200 << 20, dtype=np.uint8).sum())
    del ballast
    assert res["peak_reset"]
    assert 150 << 20 < res["peak_bytes"] < 280 << 20


def test_storage_variants_round_trip():
    rng = np.random.default_rng(0)
    k, n = 31, 50
    logits = rng.normal(size=(n, 4000)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1)[:, :k]
    probs = np.take_along_axis(p, ids, 1).astype(np.float32)
    resid = (1 - probs.sum(1)).astype(np.float32)
    for v in storage.STORAGE_VARIANTS:
        enc = storage.encode_variant(v, ids, probs, resid, np.uint16)
        d_ids, d_p, d_r = storage.decode_variant(v, enc[C.TOPK_IDS], enc[C.TOPK_PROBS], enc.get(C.RESIDUAL))
        order = np.argsort(d_ids, 1)
        ref_order = np.argsort(ids, 1)
        assert np.array_equal(np.take_along_axis(d_ids, order, 1), np.take_along_axis(ids, ref_order, 1)), v.name
        tol = 0.05 if v.probs.startswith("u8") else 2e-3
        np.testing.assert_allclose(np.take_along_axis(d_p, order, 1),
                                   np.take_along_axis(probs, ref_order, 1), rtol=tol, atol=2e-3, err_msg=v.name)


def test_stub_teacher_gives_valid_windows_of_the_pool():
    rng = np.random.default_rng(0)
    n, k = 7, 3
    pool = {"ids": rng.integers(0, 100, (n, k)), "probs": rng.random((n, k)).astype(np.float32),
            "resid": rng.random(n).astype(np.float32)}
    label = stage1.make_stub_teacher(pool, max_len=20)
    out = label([np.zeros(5, np.int32), np.zeros(20, np.int32), np.zeros(2, np.int32)])
    assert [len(r) for _, _, r in out] == [4, 19, 1]
    at = 0
    for ids, probs, resid in out:
        m = len(resid)
        want = (at + np.arange(m)) % n
        assert ids.shape == (m, k) and probs.shape == (m, k)
        assert np.array_equal(ids, pool["ids"][want]) and np.array_equal(resid, pool["resid"][want])
        at = (at + m) % n
