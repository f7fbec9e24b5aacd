"""The README is part of the product: its "your own data" quick start runs as written, and every
relative link in README.md and docs/ points at a file that exists.

The quick start is the YAML config and the commands between `<!-- quickstart:start -->` and
`<!-- quickstart:end -->`. The test writes the corpus files the config names (tiny JSONL text and QA
files at the config's own relative paths, in a temporary folder it runs from) and swaps the model
for the tiny random Llama with `model.name=...`, the override a user would type; nothing else in
the config or the commands is changed."""

from __future__ import annotations

import importlib
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import metrics_records, write_jsonl
from mol.config import DataConfig
from mol.corpora import is_val_document

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- quickstart:start -->", "<!-- quickstart:end -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def quickstart() -> tuple[str, str, list[list[str]]]:
    """(config file name, its YAML text, the commands as argv lists) from the README."""
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, "README.md: one quickstart block expected"
    block = text[text.index(START) + len(START): text.index(END)]
    fences = FENCE.findall(block)
    yamls = [body for lang, body in fences if lang == "yaml"]
    shells = [body for lang, body in fences if lang in ("bash", "sh", "")]
    assert len(yamls) == 1 and len(shells) == 1, [lang for lang, _ in fences]
    first = yamls[0].splitlines()[0]
    assert first.startswith("# ") and first.endswith(".yaml"), f"the YAML block names its file first: {first!r}"
    commands = []
    for line in shells[0].splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return first[2:].strip(), yamls[0], commands


def _records(path: str, n: int, val_fraction: float) -> list[dict]:
    """A user's corpus file: QA pairs when its name says so, otherwise text documents (at least one
    of them in the held-out split, so every run validates). Small: every packed sequence is short."""
    if "qa" in Path(path).stem:
        return [{"question": f"Case {i}: a patient on warfarin starts antibiotic {i % 7}. What should be monitored?",
                 "answer": f"The INR, within {3 + i % 4} days."} for i in range(n)]
    out, i = [], 0
    while len(out) < n or not any(is_val_document(r["text"], val_fraction) for r in out):
        out.append({"text": f"Document {i} of {Path(path).stem}: the committee reviewed item {i * 7 % 13} "
                            f"and agreed to publish it."})
        i += 1
    return out


def test_the_quickstart_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    name, text, commands = quickstart()
    cfg = yaml.safe_load(text)
    sources = cfg["data"]["sources"]
    val_fraction = cfg["data"].get("val_fraction", DataConfig.val_fraction)
    assert {s["corpus"] for s in sources} == {"domain", "general"}
    assert any("qa" in Path(s["path"]).stem for s in sources), "the quick start shows a QA file"
    assert all(not Path(s["path"]).is_absolute() for s in sources), "a user's paths are relative"
    for s in sources:
        write_jsonl(tmp_path / s["path"], _records(s["path"], 4, val_fraction))
    (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOL_HOME", str(tmp_path / "mol-home"))  # the cache goes here, not the user's

    stages = []
    for argv in commands:
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("stages."), f"not a stage command: {argv}"
        assert name in argv[3:], f"{argv}: the command should name {name}"
        stages.append(argv[2])
        module = importlib.import_module(argv[2])
        rc = module.main([*argv[3:], f"model.name={tiny_model_dir}"])
        assert rc == 0, f"{shlex.join(argv)} exited {rc}"
    assert stages[0] == "stages.teacher_cache" and stages[-1] == "stages.train", stages

    summaries = list((tmp_path / cfg.get("train", {}).get("out_dir", "runs")).glob("*/summary.json"))
    assert len(summaries) == 1, summaries
    summary = json.loads(summaries[0].read_text())
    assert summary["final_step"] >= 1
    assert math.isfinite(summary["last_train"]["loss"])
    train_lines = [r for r in metrics_records(summaries[0].parent) if r["type"] == "train"]
    assert train_lines and all(math.isfinite(r["loss"]) for r in train_lines)
    assert (summaries[0].parent / "adapter" / "adapter_config.json").is_file()


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    # fenced blocks hold no headings, but a heading's inline code is part of its anchor
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    heads = re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M)
    return {_slug(h) for h in heads}


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
