
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import GEN, MED, write_jsonl
from mol.config import DataConfig, SourceConfig
from mol.corpora import CorpusError, iter_records, pack_corpora, pack_source, record_to_text
from mol.model import load_tokenizer


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return load_tokenizer(real_model_dir)


def _texts(src, tok):
    return [record_to_text(r, w, tok, {}) for w, r in iter_records(src)]


def test_every_format_reads_the_same_documents(tmp_path, tok):
    recs = MED[:4]
    jl = write_jsonl(tmp_path / "a.jsonl", recs)
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(jl.read_bytes()))
    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": record_to_text(r, "", tok, {})} for r in recs]), pqf)
    from datasets import Dataset

    ds_dir = tmp_path / "ds"
    Dataset.from_list([{"text": record_to_text(r, "", tok, {})} for r in recs]).save_to_disk(str(ds_dir))
    base = _texts(SourceConfig(str(jl), "domain", "x"), tok)
    assert len(base) == 4
    assert "<|im_start|>user" in base[0] and "<|im_start|>assistant" in base[0]  # QA went through the template
    for p in (zst, pqf, ds_dir):
        assert _texts(SourceConfig(str(p), "domain", "x"), tok) == base, p
    txt = tmp_path / "doc.txt"
    txt.write_text("plain text document")
    assert _texts(SourceConfig(str(txt), "general", "t"), tok) == ["plain text document"]


@pytest.mark.parametrize("content, needle", [
    (b'{"text": "ok"}\n{"text": "broken"\n', ":2: invalid JSON"),
    (b'{"text": "ok"}\n{"title": "no text"}\n', ":2: no 'text'"),
    (b'{"text": "   "}\n', ":1: field 'text' is empty"),
    (b'{"text": 42}\n', ":1: field 'text' must be a string"),
    (b'{"question": "q?", "answer": ["a"]}\n', ":1: field 'answer' must be a string"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: invalid UTF-8"),
    (b'[1, 2]\n', ":1: a record must be a JSON object"),
    (b'{"messages": [{"role": "user"}]}\n', ":1: messages[0]"),
])
def test_bad_input_names_file_and_line(tmp_path, tok, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    data = DataConfig(sources=[SourceConfig(str(f), "domain", "bad")])
    with pytest.raises(CorpusError) as e:
        pack_corpora(data, tok, {})
    assert str(f) in str(e.value) and needle in str(e.value), str(e.value)


def test_missing_file_and_empty_corpus(tmp_path, tok):
    with pytest.raises(CorpusError, match="does not exist"):
        pack_corpora(DataConfig(sources=[SourceConfig(str(tmp_path / "nope.jsonl"), "domain", "x")]), tok, {})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match="no usable records"):
        pack_corpora(DataConfig(sources=[SourceConfig(str(tmp_path / "empty.jsonl"), "domain", "x")]), tok, {})


def test_skip_mode_counts_and_reports(tmp_path, tok):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b'{"text": "good one"}\n{"text": ""}\n{"text": "good two"}\nnot json\n')
    data = DataConfig(sources=[SourceConfig(str(f), "general", "m")], on_bad_record="skip", val_fraction=0.0)
    seqs, reports = pack_corpora(data, tok, {})
    assert reports[0].records == 2 and reports[0].skipped == 2
    assert ":2:" in reports[0].skipped_examples[0]


def test_packing_is_deterministic_and_separates_documents_with_eos(tmp_path, tok):
    f = write_jsonl(tmp_path / "g.jsonl", GEN)
    data = DataConfig(sources=[SourceConfig(str(f), "general", "g")], max_seq_len=32, val_fraction=0.2)
    a, _ = pack_corpora(data, tok, {})
    b, _ = pack_corpora(data, tok, {})
    assert [s.input_ids.tolist() for s in a] == [s.input_ids.tolist() for s in b]
    assert all(2 <= len(s.input_ids) <= 32 for s in a)
    for split in ("train", "val"):  # only each split's final tail may be short
        assert all(len(s.input_ids) == 32 for s in [s for s in a if s.split == split][:-1])
    flat = [t for s in a if s.split == "train" for t in s.input_ids]
    n_train_docs = sum(1 for s in a if s.split == "train")
    assert flat.count(tok.eos_token_id) >= 1 and n_train_docs >= 1
    assert {s.split for s in a} == {"train", "val"}  # 20% of 30 documents held out


def test_caps_limit_sequences_and_are_reported(tmp_path, tok):
    f = write_jsonl(tmp_path / "g.jsonl", GEN)
    src = SourceConfig(str(f), "general", "g", max_train_sequences=2, max_val_sequences=1)
    seqs, rep = pack_source(src, DataConfig(sources=[src], max_seq_len=16, val_fraction=0.3), tok, {})
    assert rep.sequences == {"train": 2, "val": 1}
    assert sum(1 for s in seqs if s.split == "train") == 2


# --------------------------------------------------------------------------- streaming and segments

from mol.corpora import Segment, SegmentPacker, plan_segments  # noqa: E402

CAPS_NONE = {"max_records": None, "max_train_sequences": None, "max_val_sequences": None}


def _many(n: int) -> list[dict]:
    return [{"text": f"Record {i}: " + "word " * (i % 13 + 1)} for i in range(n)]


def _stream(src, data, tok, seg, state=None, stop_after=None):
    """Pack a segment; with stop_after, return (sequences so far, state) as a killed pass would save it."""
    packer = SegmentPacker(src, data, tok, {}, seg, CAPS_NONE, state)
    out = []
    for s in packer:
        out.append((s.split, s.input_ids.tolist()))
        if stop_after is not None and len(out) == stop_after:
            return out, json.loads(json.dumps(packer.state()))  # the state survives JSON (the shard's metadata)
    return out, packer.report


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet"])
def test_a_resumed_packer_yields_what_the_uninterrupted_one_would(tmp_path, tok, fmt):
    recs = _many(300)
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    if fmt == "jsonl.zst":
        path = tmp_path / "a.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    elif fmt == "parquet":
        path = tmp_path / "a.parquet"
        pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=50)
    src = SourceConfig(str(path), "general", "g")
    data = DataConfig(sources=[src], max_seq_len=16, val_fraction=0.2)
    whole, report = _stream(src, data, tok, Segment(0, 0, None))
    assert len(whole) > 100
    for cut in (1, 37, len(whole) - 1):
        head, state = _stream(src, data, tok, Segment(0, 0, None), stop_after=cut)
        tail, resumed_report = _stream(src, data, tok, Segment(0, 0, None), state=state)
        assert head + tail == whole, cut
        assert resumed_report == report


def test_segments_cover_every_record_once(tmp_path, tok):
    """Byte-range segments of a JSONL file (and row ranges of Parquet) own disjoint records whose
    union is the file, wherever the cuts fall inside lines."""
    recs = _many(500)
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    src = SourceConfig(str(path), "general", "g")
    segs = plan_segments(src, segment_bytes=1500, capped=False)
    assert len(segs) > 5 and segs[0].start == 0 and segs[-1].end is None
    data = DataConfig(sources=[src], max_seq_len=10_000, val_fraction=0.0)  # one sequence holds a whole segment
    eos = tok.eos_token_id
    docs = []
    for seg in segs:
        out, _ = _stream(src, data, tok, seg)
        ids = [t for _, s in out for t in s]
        doc, cur = [], []
        for t in ids:
            if t == eos:
                doc.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        docs += doc
    assert docs == [r["text"] for r in recs]
    assert plan_segments(src, segment_bytes=1500, capped=True) == [Segment(0, 0, None)]
    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(recs), pqf, row_group_size=64)
    psegs = plan_segments(SourceConfig(str(pqf), "general", "g"), segment_bytes=1024, capped=False)
    assert len(psegs) > 1 and psegs[1].start == psegs[0].end


def test_error_in_a_later_segment_names_its_line(tmp_path, tok):
    recs = _many(200)
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    lines = path.read_text().splitlines()
    lines[150] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    src = SourceConfig(str(path), "general", "g")
    segs = plan_segments(src, segment_bytes=1024, capped=False)
    data = DataConfig(sources=[src], max_seq_len=16, val_fraction=0.0)
    with pytest.raises(CorpusError, match=r"a.jsonl:151: invalid JSON"):
        for seg in segs:
            _stream(src, data, tok, seg)
