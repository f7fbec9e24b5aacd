"""Held-out text never reaches a training split: a held-out document that is also a training document
(by normalised text, in any file) is refused before Stage 1 labels anything; one that shares a
sentence with training text is warned about, or refused under data.heldout_overlap: error."""

from __future__ import annotations

import logging

import pytest

from conftest import GEN, tiny_config, write_jsonl
from mol.config import load_config
from mol.corpora import is_val_document
from mol.heldout import HeldoutLeak, check_heldout_disjoint
from mol.model import load_tokenizer
from mol.teacher import run_teacher_pass

STORIES = [{"text": f"Story {i}. A lighthouse keeper named Ada counts {i} ships passing in the fog before dawn, "
                    f"and writes each one into a blue ledger that nobody else reads."} for i in range(12)]


def _cfg(tiny_model_dir, tmp_path, train_records, **data):
    corpora = {"med": write_jsonl(tmp_path / "med.jsonl", [{"text": "Metformin lowers hepatic glucose output."}] * 4),
               "gen": write_jsonl(tmp_path / "gen.jsonl", train_records)}
    d = tiny_config(tiny_model_dir, corpora, tmp_path / "caches", data=data)
    d["data"]["sources"].append({"path": str(write_jsonl(tmp_path / "unseen" / "stories.jsonl", STORIES)),
                                 "corpus": "general", "subset": "unseen", "heldout": True})
    return load_config(data=d)


def test_a_heldout_document_in_another_training_file_is_refused_before_labelling(tiny_model_dir, tmp_path):
    # the same story in another file, its case and spacing changed: still the same document
    copy = {"text": "  " + STORIES[4]["text"].upper().replace(" ", "   ") + "\n"}
    assert not is_val_document(copy["text"], 0.2)  # it feeds the training split
    cfg = _cfg(tiny_model_dir, tmp_path, GEN[:10] + [copy])
    with pytest.raises(HeldoutLeak) as e:
        check_heldout_disjoint(cfg, load_tokenizer(tiny_model_dir))
    msg = str(e.value)
    assert msg.startswith("1 held-out document(s) are also training documents") and "stories.jsonl:5 is data.sources[1]" \
        in msg and "gen.jsonl:11" in msg, msg
    # the teacher pass refuses it before anything is written
    with pytest.raises(HeldoutLeak):
        run_teacher_pass(cfg)
    assert not list((tmp_path / "caches").glob("units/*/shard-*.parquet"))


def test_a_shared_sentence_warns_with_counts_or_is_refused_under_the_setting(tiny_model_dir, tmp_path, caplog):
    quoting = {"text": "An essay on solitude. " + STORIES[5]["text"].split(". ", 1)[1] + " More follows."}
    assert not is_val_document(quoting["text"], 0.2)  # training text
    tok = load_tokenizer(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="mol.heldout"):
        res = check_heldout_disjoint(_cfg(tiny_model_dir, tmp_path, GEN[:10] + [quoting] * 3), tok)
    assert res.duplicates == 0 and len(res.overlapping) == 1 and res.heldout_documents == len(STORIES)
    assert "1 of 12 held-out documents share a sentence (>= 30 characters) with training text" in caplog.text
    assert "(data.heldout_overlap: warn)" in caplog.text
    with pytest.raises(HeldoutLeak, match=r"1 of 12 held-out documents share a sentence .*\(data.heldout_overlap: error"):
        check_heldout_disjoint(_cfg(tiny_model_dir, tmp_path, GEN[:10] + [quoting], heldout_overlap="error"), tok)


def test_disjoint_text_passes_and_a_config_without_heldout_source_is_not_read(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, GEN)
    res = check_heldout_disjoint(cfg, load_tokenizer(tiny_model_dir))
    assert res.duplicates == 0 and not res.overlapping and res.heldout_documents == 12
    assert res.training_documents == sum(not is_val_document(r["text"], 0.2) for r in GEN) + 4 - sum(
        is_val_document("Metformin lowers hepatic glucose output.", 0.2) for _ in range(4))
    cfg.data.sources = [s for s in cfg.data.sources if not s.heldout]
    assert check_heldout_disjoint(cfg, None) is None


def test_text_files_are_compared_too_a_large_one_by_its_pieces(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    story = STORIES[0]["text"]
    (tmp_path / "same.txt").write_text(story.replace(" ", "\n", 3))  # the held-out document, re-wrapped
    cfg = _cfg(tiny_model_dir, tmp_path, GEN[:10])
    cfg.data.sources.append(type(cfg.data.sources[0])(path=str(tmp_path / "same.txt"), corpus="general", subset="txt"))
    assert not is_val_document((tmp_path / "same.txt").read_text(), 0.2)
    with pytest.raises(HeldoutLeak, match=r"1 held-out document\(s\) are also training documents.*same.txt"):
        check_heldout_disjoint(cfg, tok)
    # a book-sized text file quoting a held-out sentence deep inside: read in pieces, found by the sentence
    filler = "The quiet river bends past the mill. " * 4000
    (tmp_path / "same.txt").write_text(filler + STORIES[7]["text"].split(". ", 1)[1] + " " + filler)
    res = check_heldout_disjoint(cfg, tok)
    assert res.duplicates == 0 and res.overlapping == {f"data.sources[2] {tmp_path}/unseen/stories.jsonl:8"}, res
