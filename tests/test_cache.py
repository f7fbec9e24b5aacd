"""The cache contract (mol/cache/): the label and residual codes, the schema and the plain readers
of a built cache, verify naming a bad shard, a cache of another model or k refused."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import assert_sqrt_grid, cache_shards, cache_units
from faults_kit import rewrite_shard, vouch_for
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


def _last_gap_to(d: C.ShardData, p: int, top: int) -> None:
    """Position p's largest teacher id becomes `top` (through its stored gap)."""
    d.topk_ids[p, -1] = top - int(d.topk_ids[p, :-1].astype(np.int64).sum())


# (id, what is done to the domain unit's first shard, text every check must name)
TAMPERED = [
    ("input-id-past-vocab", lambda d: d.input_ids.__setitem__(50, 60000), "row 1: input id 60000 at token 2"),
    ("teacher-id-past-vocab", lambda d: _last_gap_to(d, 3, 49160), "row 0 position 3: teacher id 49160 is >= the vocabulary size 49152"),
    ("teacher-ids-wrap", lambda d: d.topk_ids.__setitem__((4, 1), 65535), "row 0 position 4: teacher ids"),
    ("zero-prob-codes", lambda d: d.topk_probs.__setitem__(slice(None), 0), "row 0 position 0: probability codes [0, 0, 0, 0, 0] outside [1, 1023]"),
    ("mass-off", lambda d: d.residual.__setitem__(slice(None), 0), "sum to"),
    ("duplicated-row", lambda d: d.seq_id.__setitem__(1, d.seq_id[0]), "row 1: seq_id 0, where its place in the unit gives 1"),
]


@pytest.mark.parametrize("edit,text", [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_values_a_valid_checksum_vouches_for_are_checked(built, edit, text):
    """A shard rewritten with out-of-contract values and its manifest fixed up to its sha256: verify
    names the shard and the row; the in-memory reader refuses it the same way (was: verify ok, then
    an IndexError mid-training, or a KL of 26.9 trained on)."""
    _, cache_dir = built
    shard = cache_units(cache_dir)[0] / C.shard_name(0, 0)
    rewrite_shard(shard, edit)
    vouch_for(shard)
    cache = C.TeacherCache(cache_dir)
    problems = cache.verify()
    assert any(p.startswith(f"units/{shard.parent.name}/{shard.name}: ") and text in p for p in problems), problems
    with pytest.raises(C.CacheError, match=f"{shard.name}: "):
        for sp in ("train", "val"):
            cache.load(sp, "domain")


def test_a_deeply_nested_manifest_is_a_cache_error(built):
    """Valid JSON nested past the parser's stack (was: a RecursionError traceback)."""
    _, cache_dir = built
    (cache_dir / C.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(C.CacheError, match="unreadable manifest"):
        C.TeacherCache(cache_dir)
    (cache_dir / C.MANIFEST).write_text('{"units": ' + "[" * 100_000)
    with pytest.raises(C.CacheError, match="unreadable manifest"):
        C.TeacherCache(cache_dir)


@pytest.mark.parametrize("field,value,text", [
    ("val_rows", [7], "val_rows is not an ascending list of row indices below"),
    ("val_rows", ["0"], "val_rows is not an ascending list"),
    ("rows_per_group", 0, "rows_per_group 0 is not a positive integer"),
    ("rows", -1, "negative rows"),
])
def test_a_manifest_the_reader_could_not_index_with_is_refused(built, field, value, text):
    """Shard entries the reader builds its index from, out of range (was: an IndexError or a
    ValueError traceback from StreamingSequences' index; a negative count accepted)."""
    _, cache_dir = built
    unit = cache_units(cache_dir)[0]
    m = json.loads((unit / C.MANIFEST).read_text())
    m["shards"][0][field] = value
    (unit / C.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(C.CacheError, match=f"malformed manifest: shards\\[0\\]: {text}"):
        C.TeacherCache(cache_dir)


def test_mismatched_cache_is_refused(built):
    _, cache_dir = built
    cache = C.TeacherCache(cache_dir)
    key = cache.manifest["key"]
    cache.check_compatible(model_fp=key["model_fingerprint"], tokenizer_fp=key["tokenizer_fingerprint"], k=key["top_k"])
    with pytest.raises(C.CacheError, match="k = 5"):
        cache.check_compatible(model_fp=key["model_fingerprint"], tokenizer_fp=key["tokenizer_fingerprint"], k=31)
    with pytest.raises(C.CacheError, match="model fingerprint"):
        cache.check_compatible(model_fp="0" * 64, tokenizer_fp=key["tokenizer_fingerprint"], k=key["top_k"])


def _unit(corpus: str, subset: str, counts: dict, shard_bytes: list[int], resid_sum: float, positions: int,
          fidelity: dict | None = None) -> dict:
    """A unit manifest assembled by the cache module from made-up facts (no teacher pass)."""
    key = {"model_fingerprint": "m" * 64, "tokenizer_fingerprint": "t" * 64, "top_k": 4, "labelled": True,
           "rows_per_shard": 2, "source": {"corpus": corpus, "subset": subset}}
    per_shard = (counts["train"]["tokens"] + counts["val"]["tokens"]) // len(shard_bytes)
    shards = [C.shard_entry(file=C.shard_name(0, p), segment=0, part=p, rows=2, tokens=per_shard, bytes=b,
                            sha256="0" * 64, rows_per_group=2, val_rows=[]) for p, b in enumerate(shard_bytes)]
    return C.unit_manifest(
        fingerprint=f"{corpus}-{subset}".ljust(64, "0"), key=key, model_name="tiny", vocab_size=100,
        eos_token_id=0, pad_token_id=0, source={}, segments=1, counts=counts, shards=shards,
        residual={"sum": resid_sum, "n": positions, "below_floor": 1, "fp16_zero": 2, "fp16_subnormal": 3},
        residual_sample=[resid_sum / positions] * 3, device="cpu", dtype="torch.float32", host="h",
        torch_version="x", worker_stats=[{"forward_tokens": 10, "forward_seconds": 2.0, "seconds": 3.0}],
        fidelity=fidelity)


def test_set_manifest_aggregates_unit_manifests():
    fid = lambda n, kl: {"probe": "p", "sequences": 1, "positions": n, "kl_quantisation_max_abs": kl,  # noqa: E731
                         "topk_ids_exact_match": 1.0, "kl_quantisation_mean_abs": kl, "kl_truncation_mean_abs": kl,
                         "kl_dense_mean": kl}
    a = _unit("domain", "med", {"train": {"sequences": 4, "tokens": 100}, "val": {"sequences": 1, "tokens": 20}},
              [500, 700], resid_sum=1.0, positions=10, fidelity=fid(10, 0.1))
    b = _unit("general", "web", {"train": {"sequences": 6, "tokens": 250}, "val": {"sequences": 2, "tokens": 30}},
              [1300], resid_sum=6.0, positions=30, fidelity=fid(30, 0.3))
    assert C.unit_manifest_problems(a) == [] and C.unit_manifest_problems(b) == []
    assert a["totals"] == {"sequences": 4, "tokens": 120, "bytes": 1200, "bytes_per_token": 10.0}
    assert a["residual"]["mean"] == pytest.approx(0.1) and a["residual"]["positions"] == 10
    this_pass = [{"status": "built", "labelled_tokens": 120}, {"status": "reused", "labelled_tokens": 0}]
    m = C.set_manifest(fingerprint="s" * 64, key={"model_fingerprint": "m" * 64, "tokenizer_fingerprint": "t" * 64,
                                                  "top_k": 4, "label_domain": True},
                       model_name="tiny", model_path="/models/tiny", units=[a, b], unit_names=["ua", "ub"],
                       this_pass=this_pass, device="cpu", this_pass_seconds=1.5)
    assert C.set_manifest_problems(m) == []
    assert m["kind"] == "set" and m["schema_version"] == C.SCHEMA_VERSION
    assert m["counts"] == {"domain/med/train": {"sequences": 4, "tokens": 100}, "domain/med/val": {"sequences": 1, "tokens": 20},
                           "general/web/train": {"sequences": 6, "tokens": 250}, "general/web/val": {"sequences": 2, "tokens": 30}}
    assert m["totals"] == {"sequences": 6, "tokens": 400, "bytes": 2500, "bytes_per_token": 6.25}
    assert [u["dir"] for u in m["units"]] == ["units/ua", "units/ub"]
    assert [(u["corpus"], u["subset"], u["this_pass"]["status"]) for u in m["units"]] == [
        ("domain", "med", "built"), ("general", "web", "reused")]
    # means weighted by positions: (0.1 * 10 + 0.2 * 30) / 40, not the units' plain mean 0.15
    assert m["residual"]["mean"] == pytest.approx(0.175)
    assert m["residual"]["positions"] == 40 and m["residual"]["fp16_would_be_zero"] == 4
    assert m["fidelity"]["kl_dense_mean"] == pytest.approx(0.25) and m["fidelity"]["positions"] == 40
    assert m["fidelity"]["kl_quantisation_max_abs"] == 0.3
    assert m["run"]["forward_tokens"] == 20 and m["run"]["teacher_tokens_per_s"] == pytest.approx(5.0)
    with pytest.raises(ValueError):
        C.set_manifest(fingerprint="s" * 64, key=m["key"], model_name="tiny", model_path="/m", units=[a, b],
                       unit_names=["ua"], this_pass=this_pass, device="cpu", this_pass_seconds=0.0)
