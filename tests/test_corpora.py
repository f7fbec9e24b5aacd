
import json
from pathlib import Path

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
    """Every document's text (a text file's document is a TextFile, read here whole)."""
    docs = [record_to_text(r, w, tok, {}) for w, r in iter_records(src)]
    return [d if isinstance(d, str) else d.read() for d in docs]


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


# --------------------------------------------------------------------------- truncated and undecodable input

def _zst(records: list[dict], frame_lines: int | None) -> tuple[bytes, set[int]]:
    """The records as .jsonl.zst: one frame, or one frame per `frame_lines` lines (as a streaming
    compressor or a `cat a.zst b.zst` writes them); with the offsets where frames end."""
    lines = [json.dumps(r).encode() + b"\n" for r in records]
    step = frame_lines or len(lines)
    frames = [zstandard.ZstdCompressor(write_checksum=True).compress(b"".join(lines[i:i + step]))
              for i in range(0, len(lines), step)]
    ends = {sum(map(len, frames[:i + 1])) for i in range(len(frames))}
    return b"".join(frames), ends


@pytest.mark.parametrize("frame_lines", [None, 30])
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_truncated_zst_is_an_error_in_both_modes(tmp_path, tok, frame_lines, mode):
    recs = _many(200)
    blob, frame_ends = _zst(recs, frame_lines)
    path = tmp_path / "a.jsonl.zst"
    src = SourceConfig(str(path), "general", "g")
    data = DataConfig(sources=[src], max_seq_len=64, val_fraction=0.0, on_bad_record=mode)
    path.write_bytes(blob)
    _, rep = pack_source(src, data, tok, {})
    assert (rep.records, rep.skipped) == (200, 0)
    # a cut exactly where a frame ends leaves a valid shorter file: nothing can tell it from a whole one
    cuts = [c for c in (3, 20, len(blob) // 3, len(blob) // 2, len(blob) - 5, len(blob) - 1) if c not in frame_ends]
    for cut in cuts:
        path.write_bytes(blob[:cut])
        with pytest.raises(CorpusError) as e:
            pack_source(src, data, tok, {})
        assert str(e.value).startswith(f"{path}: the zstd stream ends in the middle of a frame (truncated file?)"), \
            (cut, str(e.value))


def test_a_resumed_packer_reads_every_frame_of_a_zst(tmp_path, tok):
    blob, _ = _zst(_many(300), 40)
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(blob)
    src = SourceConfig(str(path), "general", "g")
    data = DataConfig(sources=[src], max_seq_len=16, val_fraction=0.2)
    whole, report = _stream(src, data, tok, Segment(0, 0, None))
    assert report.records == 300
    for cut in (1, 37, len(whole) // 2, len(whole) - 1):
        head, state = _stream(src, data, tok, Segment(0, 0, None), stop_after=cut)
        tail, resumed_report = _stream(src, data, tok, Segment(0, 0, None), state=state)
        assert head + tail == whole, cut
        assert resumed_report == report


# a JSON \u escape of a lone UTF-16 surrogate is valid JSON but no text: UTF-8 cannot encode it
SURROGATE_CASES = [
    (b'{"text": "abc \\ud800 def"}', "invalid Unicode"),
    (b'{"question": "broken emoji \\ud83d?", "answer": "A"}', "invalid Unicode"),
    (b'{"question": "Why?", "answer": "\\udc00"}', "invalid Unicode"),
    (b'{"messages": [{"role": "user", "content": "hi \\udfff"}, {"role": "assistant", "content": "x"}]}',
     "invalid Unicode"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst"])
@pytest.mark.parametrize("line, needle", SURROGATE_CASES)
def test_a_lone_surrogate_is_a_bad_record(tmp_path, tok, fmt, line, needle):
    good = json.dumps({"text": "A good first record."}).encode()
    content = good + b"\n" + line + b"\n" + good + b"\n"
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(zstandard.ZstdCompressor().compress(content) if fmt == "jsonl.zst" else content)
    src = SourceConfig(str(path), "domain", "bad")
    with pytest.raises(CorpusError) as e:
        pack_source(src, DataConfig(sources=[src]), tok, {})
    assert str(e.value).startswith(f"{path}:2: {needle}"), str(e.value)
    _, rep = pack_source(src, DataConfig(sources=[src], on_bad_record="skip"), tok, {})
    assert (rep.records, rep.skipped) == (2, 1)
    assert rep.skipped_examples[0].startswith(f"{path}:2: {needle}")


def _invalid_utf8_table():
    """A string column whose second value is not UTF-8 (a foreign Parquet writer; pyarrow's own
    builders refuse it, so the buffers are laid down by hand)."""
    import numpy as np

    data = b"A good first record." + b"caf\xe9 au lait" + b"A good third record."
    offsets = np.array([0, 20, 33, len(data)], dtype=np.int32)
    col = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    return pa.table({"text": col})


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_invalid_utf8_in_a_table_names_its_row(tmp_path, tok, fmt):
    if fmt == "parquet":
        path = tmp_path / "bad.parquet"
        pq.write_table(_invalid_utf8_table(), path)
    else:
        from datasets import Dataset

        path = tmp_path / "ds"
        Dataset(_invalid_utf8_table()).save_to_disk(str(path))
    src = SourceConfig(str(path), "domain", "bad")
    with pytest.raises(CorpusError) as e:
        pack_source(src, DataConfig(sources=[src]), tok, {})
    assert str(e.value) == f"{path}:row 2: invalid UTF-8 in column 'text' (byte 3 of a string)", str(e.value)
    _, rep = pack_source(src, DataConfig(sources=[src], on_bad_record="skip"), tok, {})
    assert (rep.records, rep.skipped) == (2, 1)


def test_invalid_utf8_in_a_text_file_names_its_line(tmp_path, tok):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"first line\nsecond line\ncaf\xe9\n")
    src = SourceConfig(str(path), "general", "t")
    with pytest.raises(CorpusError, match=rf"^{path}:3: invalid UTF-8 at byte 26$"):
        pack_source(src, DataConfig(sources=[src]), tok, {})


# --------------------------------------------------------------------------- the Stage 1 CLI on bad input


def _stage1(tmp_path, capsys, tiny_model_dir, name: str, content: bytes) -> tuple[int, str, Path]:
    """Stage 1 on the tiny model with one bad source: (exit code, stderr, the bad file)."""
    import yaml

    from conftest import tiny_config
    from stages import teacher_cache

    bad = tmp_path / name
    bad.write_bytes(content)
    d = tiny_config(tiny_model_dir, {"med": bad, "gen": write_jsonl(tmp_path / "gen.jsonl", GEN)}, tmp_path / "caches")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(d, sort_keys=False))
    capsys.readouterr()
    rc = teacher_cache.main([str(cfg)])
    return rc, capsys.readouterr().err, bad


def test_stage1_stops_on_a_truncated_zst_and_a_lone_surrogate(tmp_path, capsys, tiny_model_dir):
    good = "".join(json.dumps(r) + "\n" for r in MED).encode()
    blob, _ = _zst(MED, 5)
    rc, err, bad = _stage1(tmp_path, capsys, tiny_model_dir, "med.jsonl.zst", blob[:-7])
    assert rc == 2 and f"error: {bad}: the zstd stream ends in the middle of a frame (truncated file?)" in err, err
    rc, err, bad = _stage1(tmp_path, capsys, tiny_model_dir, "med.jsonl", good + b'{"text": "x \\ud800 y"}\n')
    assert rc == 2 and f"error: {bad}:25: invalid Unicode" in err, err
