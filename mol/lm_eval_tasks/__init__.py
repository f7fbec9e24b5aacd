"""MoL's multiple-choice sets and their lm-evaluation-harness task definitions: each set is a local
JSONL file, run as the lm-eval task `mol_<set>` (the YAML files here), so `make eval` runs offline.

An MCQ file holds one record per line, {"id", "question", "choices": [>= 2 strings],
"answer_index"}; the default data's eval/ folder has medqa, mmlu_clinical, mmlu, piqa and
openbookqa (`make data`). The same task files serve lm-eval's own command line:

    lm_eval --model hf --model_args pretrained=MODEL --include_path mol/lm_eval_tasks \\
        --tasks mol_medqa,mol_piqa --apply_chat_template [--metadata '{"mol_eval_dir": "DIR"}']
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mol.default_data import default_data_dir
from mol.errors import MissingInput, MolError

TASKS_DIR = Path(__file__).resolve().parent
TEMPLATE = TASKS_DIR / "_mol_mcq.yaml"
PREFIX = "mol_"
# lm-eval metadata keys read by utils.load_mcq (metadata reaches every task: hence the prefix)
EVAL_DIR_KEY, LIMIT_KEY = "mol_eval_dir", "mol_limit"


class McqFileError(MolError, ValueError):
    """An MCQ file with a record that cannot be scored; the message names file and line."""


@dataclass
class McqItem:
    """One record of an MCQ file (`<set>.jsonl`), a document of the lm-eval task mol_<set>."""

    id: str
    question: str
    choices: list[str]
    answer_index: int


def default_eval_dir() -> Path:
    """The default data's eval/ folder (written by `make data`)."""
    return default_data_dir() / "eval"


def task_name(mcq_set: str) -> str:
    """The lm-eval task that runs <eval_dir>/<mcq_set>.jsonl."""
    return PREFIX + mcq_set


def shipped_sets() -> list[str]:
    """The sets with a task file here (mol_<set>.yaml); any other set runs from the template inline."""
    return sorted(p.stem[len(PREFIX):] for p in TASKS_DIR.glob(f"{PREFIX}*.yaml"))


def load_mcq_set(path: Path, limit: int | None = None) -> list[McqItem]:
    """The first `limit` records of an MCQ JSONL file, each checked; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"MCQ evaluation file {path} does not exist "
                           f"(set eval.mcq_sets, or run `make data` for the default sets)")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise McqFileError(f"{where}: invalid JSON ({e.msg})") from None
            q, ch, ans = rec.get("question"), rec.get("choices"), rec.get("answer_index")
            if not isinstance(q, str) or not q.strip():
                raise McqFileError(f"{where}: 'question' must be a non-empty string")
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c.strip() for c in ch):
                raise McqFileError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
                raise McqFileError(f"{where}: 'answer_index' must be an integer in 0..{len(ch) - 1}, got {ans!r}")
            items.append(McqItem(str(rec.get("id", f"{path.stem}-{lineno}")), q, ch, ans))
    if not items:
        raise McqFileError(f"{path}: no MCQ records")
    return items


def mcq_dataset(mcq_set: str, eval_dir: str | Path | None = None, limit: int | None = None):
    """datasets.DatasetDict {"test": records} of <eval_dir>/<mcq_set>.jsonl (load_mcq_set's checks);
    only the first `limit` are read."""
    import datasets

    path = Path(eval_dir) if eval_dir else default_eval_dir()
    items = load_mcq_set(path / f"{mcq_set}.jsonl", limit)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([asdict(it) for it in items])})
