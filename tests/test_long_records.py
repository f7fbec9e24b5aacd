"""Long documents (issue 34, item 7): a text file or a long text is tokenized in pieces cut at the
end of a word, with the ids of one call, in memory bounded by a piece, resumable mid-document; a
FIFO as a source is refused by name instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import GEN, tiny_config, write_jsonl
from mol import corpora as K
from mol.config import DataConfig, SourceConfig
from mol.corpora import CorpusError, Segment, SegmentPacker, document_pieces, iter_records, record_to_text
from mol.default_data import TRAIN_FILES, build_default_data, default_download_dir
from mol.model import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CAPS_NONE = {"max_records": None, "max_train_sequences": None, "max_val_sequences": None}


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return load_tokenizer(real_model_dir)


def _one_call(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _in_pieces(tok, doc, limit: int) -> list[int]:
    ids = []
    for piece, _, _ in document_pieces(doc, tok, 0, limit):
        ids += _one_call(tok, piece)
    return ids


# --------------------------------------------------------------------------- the ids of one call

TRICKY = [
    "Hello world.  Two spaces,\tand a tab;\n\nA paragraph.\r\nWindows line\u00a0no-break space",
    "don't won't it's I'm you're we've they'll he'd  'quoted'  \"double\"  x's",
    "Digits 1234567890 and 3.14159, 1,000,000 and 2026-12-07 12:30:59.",
    "\u4e2d\u6587\u6ca1\u6709\u7a7a\u683c\u3002\u8fd9\u662f\u4e00\u4e2a\u53e5\u5b50\uff0c\u5f88\u957f\u7684\u53e5\u5b50\u3002" * 4,
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 cafe\u0301 \U0001f600 emoji\U0001f389party \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "code: def f(x_1, y_2):\n    return x_1**2 + y_2  # comment\n\n\n    \n\tindent",
    "trailing spaces   \n   \n",
]


def test_pieces_cut_at_word_ends_give_the_ids_of_one_call(tok):
    """Every cut of these texts (each piece limit from 16 to 60 characters: a window always holds a
    word end) keeps the ids of one call, and a naive cut at the limit would not: the choice of the
    cut is what is tested. (Below the longest word, a window without a word end is cut hard.)"""
    naive_differs = 0
    for text in TRICKY:
        whole = _one_call(tok, text)
        for limit in range(16, 61):
            assert _in_pieces(tok, text, limit) == whole, (text, limit)
            naive = [t for i in range(0, len(text), limit) for t in _one_call(tok, text[i:i + limit])]
            naive_differs += naive != whole
    assert naive_differs > 100


def test_pieces_never_cut_a_special_token_of_a_rendered_chat(tok):
    """A QA record's rendered text (special tokens `<|im_start|>` etc. inside) tokenized in pieces
    is its one call's ids; the letter-before-punctuation rule alone would cut `<|im_start|>`."""
    text = record_to_text({"question": "What is it?" * 20, "answer": "It is.\n" * 20}, "", tok, {})
    whole = _one_call(tok, text)
    for limit in range(24, 80):  # `<|im_start|>assistant\n` is 22 characters without a word end
        assert _in_pieces(tok, text, limit) == whole, limit


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default-data")
    build_default_data(out, default_download_dir())
    return out


@pytest.mark.parametrize("rel", TRAIN_FILES)
def test_pieces_give_the_ids_of_one_call_on_the_default_data(tok, default_data, rel):
    """A sample (every 25th record) of each default training file, rendered as Stage 1 renders it
    and cut into pieces of at most 200 characters (many cuts a document): the ids are one call's,
    byte for byte. (All of every file, by hand: see docs/cache.md.)"""
    src = SourceConfig(str(default_data / rel), "domain", "x")
    n = 0
    for i, (where, rec) in enumerate(iter_records(src)):
        if i % 25:
            continue
        text = record_to_text(rec, where, tok, {})
        assert _in_pieces(tok, text, 200) == _one_call(tok, text), where
        n += 1
    assert n >= 20


# --------------------------------------------------------------------------- the packer


def _expected(tok, docs: list[str], L: int, val_fraction: float) -> list[tuple[str, list[int]]]:
    """Each document tokenized in one call, joined with EOS and cut into L-token sequences per split
    (the final short tails last, train first): what the packer gave before pieces."""
    bufs = {"train": [], "val": []}
    out = []
    for d in docs:
        split = "val" if K.is_val_document(d, val_fraction) else "train"
        bufs[split] += _one_call(tok, d) + [tok.eos_token_id]
        while len(bufs[split]) >= L:
            out.append((split, bufs[split][:L]))
            bufs[split] = bufs[split][L:]
    return out + [(s, b) for s, b in bufs.items() if len(b) >= 2]


def _pack(src, data, tok, state=None, stop_after=None, watch=None):
    packer = SegmentPacker(src, data, tok, {}, Segment(0, 0, None), CAPS_NONE, state)
    out = []
    for s in packer:
        out.append((s.split, s.input_ids.tolist()))
        if watch is not None:
            watch.append(len(packer.pending))
        if stop_after is not None and len(out) == stop_after:
            return out, json.loads(json.dumps(packer.state()))
    return out, packer.report


def _long_docs(n_words: int) -> list[str]:
    words = ["kidney", "the", "glomerulus", "filters", "blood,", "and", "urine", "flows.", "Then\n\n", "it's"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(n_words)) for i in range(3)]


def test_a_long_document_packs_in_pieces_as_one_call_and_resumes_mid_document(tmp_path, tok, monkeypatch):
    """JSONL with long texts between short ones, and a text file: with a piece of 300 characters the
    sequences are those of one call a document; no more than a piece's sequences are ever pending
    (a whole document's were); a pass stopped inside a long document resumes to the same output."""
    monkeypatch.setattr(K, "PIECE_CHARS", 300)
    docs = [GEN[0]["text"]] + _long_docs(600) + [GEN[1]["text"]]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    src = SourceConfig(str(path), "general", "g")
    data = DataConfig(sources=[src], max_seq_len=16, val_fraction=0.3)
    watch: list[int] = []
    whole, report = _pack(src, data, tok, watch=watch)
    assert sorted(whole) == sorted(_expected(tok, docs, 16, 0.3))
    assert whole == _expected(tok, docs, 16, 0.3)
    assert report.documents["train"] + report.documents["val"] == len(docs)
    assert max(watch) <= 300 // 16 + 2, max(watch)  # one piece's sequences (a token is >= 1 character)
    for cut in (5, 101, len(whole) - 3):
        head, state = _pack(src, data, tok, stop_after=cut)
        assert state["doc"] is not None or cut == len(whole) - 3
        tail, resumed = _pack(src, data, tok, state=state)
        assert head + tail == whole, cut
        assert resumed == report

    txt = tmp_path / "book.txt"
    txt.write_text(docs[1] + "\n" + docs[2], encoding="utf-8")
    tsrc = SourceConfig(str(txt), "general", "t")
    got, _ = _pack(tsrc, data, tok, watch=(watch := []))
    assert got == _expected(tok, [txt.read_text(encoding="utf-8")], 16, 0.3)
    assert max(watch) <= 300 // 16 + 2, max(watch)
    head, state = _pack(tsrc, data, tok, stop_after=40)
    assert head + _pack(tsrc, data, tok, state=state)[0] == got


def test_a_text_file_is_read_a_window_at_a_time(tmp_path, tok, monkeypatch):
    """A text file is never read whole (it was: `read_bytes`), its UTF-8 error still names the line
    before anything is packed, and a blank file is a bad record."""
    import mol.corpus_formats as F

    path = tmp_path / "book.txt"
    path.write_text("word " * 300_000, encoding="utf-8")
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(F, "open", lambda p, mode="r", *a, **k: Spy(real_open(p, mode, *a, **k)), raising=False)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    src = SourceConfig(str(path), "general", "t")
    seqs, _ = K.pack_source(src, DataConfig(sources=[src], max_seq_len=256, val_fraction=0.1), tok, {})
    assert len(seqs) > 1000 and reads and max(reads) <= K.PIECE_CHARS and -1 not in reads
    monkeypatch.undo()
    path.write_bytes(b"ok\n" * 500_000 + b"caf\xe9\n")
    with pytest.raises(CorpusError, match=rf"^{path}:500001: invalid UTF-8 at byte 1500003$"):
        K.pack_source(src, DataConfig(sources=[src]), tok, {})
    path.write_bytes(b" \n\t" * 1000)
    with pytest.raises(CorpusError, match=rf"^{path}:1: field 'text' is empty$"):
        K.pack_source(src, DataConfig(sources=[src]), tok, {})


# --------------------------------------------------------------------------- memory


# Packs one source with the real tokenizer in a fresh process (under an address-space cap when
# given); prints its peak RSS and virtual size, and how many sequences it packed.
CHILD = """
import json, resource, sys
if len(sys.argv) > 3:
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]),) * 2)
from mol.config import DataConfig, SourceConfig
from mol.corpora import Segment, SegmentPacker
from mol.model import load_tokenizer
tok = load_tokenizer(sys.argv[2])
src = SourceConfig(sys.argv[1], "general", "g")
caps = {"max_records": None, "max_train_sequences": None, "max_val_sequences": None}
n = sum(1 for _ in SegmentPacker(src, DataConfig(sources=[src], max_seq_len=256, val_fraction=0.1), tok, {},
                                 Segment(0, 0, None), caps))
# VmHWM, not ru_maxrss: that one keeps the parent's peak across fork + exec
st = dict(ln.split(":", 1) for ln in open("/proc/self/status"))
print(json.dumps({"maxrss_kb": int(st["VmHWM"].split()[0]), "vmpeak_kb": int(st["VmPeak"].split()[0]), "sequences": n}))
"""


def write_book(path: Path, chars: int, jsonl: bool = False) -> Path:
    """One document of `chars` characters of English-like text in paragraphs (a .txt, or a .jsonl
    of one line), written a block at a time: the test process itself never holds it."""
    words = ("the kidney filters blood and the loop of Henle concentrates urine by countercurrent "
             "multiplication while metformin lowers hepatic glucose production in type 2 diabetes").split()
    rng = np.random.default_rng(0)
    block = "\n\n".join(" ".join(rng.choice(words, size=60)).capitalize() + "." for _ in range(200)) + "\n\n"
    enc = (lambda t: json.dumps(t)[1:-1]) if jsonl else (lambda t: t)
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"text": "' if jsonl else "")
        for _ in range(chars // len(block)):
            f.write(enc(block))
        f.write(enc(block[:chars % len(block)]) + ('"}\n' if jsonl else ""))
    return path


def pack_peak(path: Path, model_dir: Path, cap_bytes: int | None = None, timeout: int = 900) -> dict:
    """Peak RSS and VmPeak (kB) of packing `path` in a fresh process, optionally under RLIMIT_AS."""
    cap = [str(cap_bytes)] if cap_bytes else []
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(model_dir), *cap], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_of_a_one_document_text_file_does_not_grow_with_it(tmp_path, real_model_dir):
    """Peak RSS packing a 2 MB and a 20 MB one-document .txt, each in a fresh process. One call over
    the whole text (what the packer did) cost 4.2 GB more at 40 MB than at 4 MB (5.0 vs 0.85 GB);
    pieces cost the same at both sizes (483 vs 505 MB at 4 and 40 MB; the margin is 10% of the
    small run's peak)."""
    small = pack_peak(write_book(tmp_path / "small.txt", 2_000_000), real_model_dir)
    big = pack_peak(write_book(tmp_path / "big.txt", 20_000_000), real_model_dir)
    assert big["sequences"] > 9 * small["sequences"]
    growth = big["maxrss_kb"] - small["maxrss_kb"]
    assert growth <= 0.10 * small["maxrss_kb"], (growth / 1024, small, big)


# --------------------------------------------------------------------------- a FIFO


FIFO_CHILD = """
import sys
from pathlib import Path
from mol.config import SourceConfig
from mol.corpora import CorpusError, iter_records, source_fingerprint
for call in (lambda: source_fingerprint(Path(sys.argv[1])), lambda: next(iter_records(SourceConfig(sys.argv[1], "general", "g")))):
    try:
        call()
    except CorpusError as e:
        print(e)
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung on a FIFO source: {args[:2]}")


def test_a_fifo_as_a_source_is_refused_by_name(tmp_path, tiny_model_dir):
    """A FIFO as a corpus path: Stage 1 exits 2 naming it (it waited for a writer forever, with no
    message), and so do the readers themselves (hash, records) where no config check ran first. In
    child processes with a timeout, so a hang fails the test."""
    fifo = tmp_path / "corpus.jsonl"
    os.mkfifo(fifo)
    r = _run(["-c", FIFO_CHILD, str(fifo)])
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"{fifo}: is a FIFO, not a regular file; a source must be a file or a datasets folder"] * 2, r.stderr[-3000:]
    d = tiny_config(tiny_model_dir, {"med": fifo, "gen": write_jsonl(tmp_path / "gen.jsonl", GEN)}, tmp_path / "caches")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(d, sort_keys=False))
    r = _run(["-m", "stages.teacher_cache", str(cfg)])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{fifo}" in r.stderr and "FIFO" in r.stderr and r.stderr.startswith("error:"), r.stderr[-3000:]
