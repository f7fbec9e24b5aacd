"""The benchmark runs end to end at tiny sizes and reports every figure (never a timed assertion)."""

import json
import math
import sys

import numpy as np
import pytest

from mol import bench as B


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
    assert [v["name"] for v in variants[1:]] == [v.name for v in B.STORAGE_VARIANTS[1:]]
    assert variants[0]["name"].startswith("current mol.cache schema")
    # the variants are written as changes to what mol.cache writes: unchanged, the same bytes
    assert res["storage"]["builder_check_bytes"] == pytest.approx(variants[0]["bytes"], rel=0.01)
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
    meta = res["meta"]
    assert meta["machine"]["cpu"] and meta["machine"]["torch"] and meta["date"] and "stages.bench" in meta["command"]
    md = (out / "bench.md").read_text()
    assert "| figure | measured | goal | met? |" in md
    assert all(f["figure"] in md for f in res["figures"])


def test_naive_loss_is_extrapolated_from_the_two_largest_points():
    sz = B.BenchSizes(loss_tokens=8192, loss_seq_len=1024, loss_vocab=1000)
    gib = 2**30
    mem = {(8, 1024, 1000, "chunked"): {"peak_bytes": 3 * gib, "seconds": 1.0, "peak_reset": True},
           (1, 1024, 1000, "naive"): {"peak_bytes": 3 * gib},
           (2, 1024, 1000, "naive"): {"peak_bytes": 5 * gib}}
    h = B.loss_path_headline(sz, 1024, mem)
    assert h["tokens"] == 8192
    assert h["naive_peak_bytes"] == pytest.approx(17 * gib)  # 3 + 2 GiB per 1024 tokens, 7 steps on
    assert h["ratio"] == pytest.approx(3 / 17)
    assert "extrapolated" in h["naive_how"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak reset via /proc/self/clear_refs")
def test_measure_peak_sees_only_the_work():
    ballast = np.ones(300 << 20, dtype=np.uint8)  # resident before the work: must not count
    res = B.measure_peak(lambda: np.ones(200 << 20, dtype=np.uint8).sum())
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
    for v in B.STORAGE_VARIANTS:
        enc = B.encode_labels(v, ids, probs, resid, np.uint16)
        d_ids, d_p, d_r = B.decode_labels(v, enc[B._IDS], enc[B._PROBS], enc.get(B._RES))
        order = np.argsort(d_ids, 1)
        ref_order = np.argsort(ids, 1)
        assert np.array_equal(np.take_along_axis(d_ids, order, 1), np.take_along_axis(ids, ref_order, 1)), v.name
        tol = 0.05 if v.probs.startswith("u8") else 2e-3
        np.testing.assert_allclose(np.take_along_axis(d_p, order, 1),
                                   np.take_along_axis(probs, ref_order, 1), rtol=tol, atol=2e-3, err_msg=v.name)
