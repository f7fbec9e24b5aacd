"""The cache contract (mol/cache.py): the label and residual codes, the schema and the plain readers
of a built cache, verify naming a bad shard, a cache of another model or k refused."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import assert_sqrt_grid, cache_shards, cache_units
from mol import cache as C


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 40)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1)[:, :8]
    probs = np.take_along_axis(p, ids, 1)
    resid = 1 - probs.sum(1)
    gaps, codes, sres = C.encode_labels(ids, probs, resid, vocab_size=40)
    assert gaps.dtype == np.uint16 and codes.dtype == np.uint16 and sres.dtype == np.uint16
    sid = C.decode_ids(gaps)
    assert np.array_equal(np.sort(ids, 1), sid)  # the same set, ascending
    assert (np.diff(sid.astype(np.int64), axis=1) > 0).all() and codes.min() >= 1 and codes.max() <= C.PROB_LEVELS
    back = np.take_along_axis(p, sid.astype(np.int64), 1)  # the same ids' exact probabilities
    assert_sqrt_grid(C.decode_probs(codes), back)
    big = C.encode_labels(ids + 70000, probs, resid, vocab_size=80000)[0]
    assert big.dtype == np.uint32 and np.array_equal(C.decode_ids(big), np.sort(ids, 1) + 70000)


def test_residual_code_never_underflows():
    """Schema 3: relative error <= 1e-3 for every r in [1e-30, 1]; nothing above 1e-30 decodes to 0."""
    r = np.concatenate([np.logspace(-30, 0, 200_001), [1e-30, 1.0, 0.5, 1 - 1e-7]])
    back = C.decode_residual(C.encode_residual(r)).astype(np.float64)
    assert np.abs(back / r - 1).max() <= 1e-3
    assert back.min() > 0
    assert C.decode_residual(C.encode_residual(np.array([0.0, 1e-45, 1e-31])))[0] == np.float32(1e-30)


def test_schema_and_plain_readers(built):
    _, cache_dir = built
    shard = cache_shards(cache_dir)[0]
    t = pq.read_table(shard)
    assert t.schema.field(C.INPUT_IDS).type.value_type == "uint16"  # 49152-token vocab fits 16 bits
    assert str(t.schema.field(C.TOPK_PROBS).type.value_type.value_type) == "uint16"
    assert str(t.schema.field(C.RESIDUAL).type.value_type) == "uint16"
    assert pq.ParquetFile(shard).metadata.row_group(0).column(0).compression == "ZSTD"
    from datasets import load_dataset

    m = json.loads((cache_dir / "manifest.json").read_text())
    rows = 0
    for unit in cache_units(cache_dir):
        ds = load_dataset(str(unit), split="train")  # the unit folder is a Hugging Face dataset (card + shards)
        row = ds[0]
        assert len(row[C.TOPK_IDS]) == len(row[C.INPUT_IDS]) - 1 and len(row[C.TOPK_IDS][0]) == 5
        assert ds.features[C.RESIDUAL].feature.dtype == "uint16"
        assert "model fingerprint" in (unit / "README.md").read_text()
        rows += ds.num_rows
    assert m["totals"]["sequences"] == rows
    assert m["fidelity"]["kl_quantisation_mean_abs"] < 1e-3
    assert (cache_dir / "config.yaml").is_file()


def test_verify_names_the_bad_shard(built):
    _, cache_dir = built
    shards = cache_shards(cache_dir)
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    shards[2].unlink()
    problems = C.TeacherCache(cache_dir).verify()
    assert any(shards[1].name in p and "sha256" in p for p in problems)
    assert any(shards[2].name in p and "missing" in p for p in problems)


def test_mismatched_cache_is_refused(built):
    _, cache_dir = built
    cache = C.TeacherCache(cache_dir)
    key = cache.manifest["key"]
    cache.check_compatible(model_fp=key["model_fingerprint"], tokenizer_fp=key["tokenizer_fingerprint"], k=key["top_k"])
    with pytest.raises(C.CacheError, match="k = 5"):
        cache.check_compatible(model_fp=key["model_fingerprint"], tokenizer_fp=key["tokenizer_fingerprint"], k=31)
    with pytest.raises(C.CacheError, match="model fingerprint"):
        cache.check_compatible(model_fp="0" * 64, tokenizer_fp=key["tokenizer_fingerprint"], k=key["top_k"])
