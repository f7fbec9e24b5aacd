"""Benchmarks through lm-evaluation-harness, and the paired comparison of two models on them.

MoL's own multiple-choice sets run as the lm-eval tasks `mol_<set>` (mol/lm_eval_tasks/: local
JSONL, no download); `eval.tasks` adds any task lm-eval knows. Each model is scored by
`lm_eval.simple_evaluate` on an `HFLM` wrapping the already-loaded model, with per-sample logs, and
two models are compared item by item:

    per item i of a task, x_i = the metric of model A and y_i of model B (acc: 1 if right, else 0)
    d_i = y_i - x_i;  change = mean(d);  SE = sd(d) / sqrt(n)  (sd with n - 1)

the standard error of a paired difference: the items both models answer alike cancel out.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import lm_eval_tasks as T
from .errors import MolError

log = logging.getLogger(__name__)

# the slice of lm-eval's results that eval.json keeps per model (the rest is configs and env)
_KEPT = ("results", "versions", "n-shot", "higher_is_better", "n-samples", "lm_eval_version")


class HarnessError(MolError, ValueError):
    """A task lm-eval does not know or cannot load, or results that cannot be paired."""


def paired_delta(base: list[float], other: list[float]) -> tuple[float, float]:
    """(mean of other_i - base_i, its standard error) over the same items, in the same order."""
    n = len(base)
    if n == 0 or n != len(other):
        raise HarnessError(f"paired comparison needs the same non-empty items, got {n} and {len(other)}")
    d = [r - b for b, r in zip(base, other)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


class _QuietCustomDatasetHint(logging.Filter):
    """Drops lm-eval's warning, repeated per task and per load, that a custom_dataset takes kwargs
    from --metadata: ours does (mol_eval_dir, mol_limit), so the hint is noise in every log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet_lm_eval() -> None:
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _QuietCustomDatasetHint) for f in task_log.filters):
        task_log.addFilter(_QuietCustomDatasetHint())


# --------------------------------------------------------------------------- which tasks


@dataclass
class TaskSet:
    """The tasks one evaluation runs, resolved once and shared by both models.

    specs: lm-eval task names in run order (a set without its own YAML in mol/lm_eval_tasks gets
    one generated from the template into a temporary folder, removed by close()).
    files: {task: JSONL file} for MoL's sets.
    """

    names: list[str]
    files: dict[str, Path]
    eval_dir: Path
    limit: Optional[int]
    include: list[Path]
    hub: bool
    _tmp: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)
    _manager: Any = field(default=None, repr=False)

    def manager(self):
        """lm-eval's TaskManager: our folder(s) always; lm-eval's own ~15k task files only when a
        task outside them was asked for (indexing those takes tens of seconds)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            _quiet_lm_eval()

            meta = {T.EVAL_DIR_KEY: str(self.eval_dir)}
            if self.limit is not None:
                meta[T.LIMIT_KEY] = self.limit
            self._manager = TaskManager(include_path=[str(p) for p in self.include], include_defaults=self.hub,
                                        metadata=meta)
        return self._manager

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "TaskSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_tasks(mcq_sets: list[str], tasks: list[str], eval_dir: Path, limit: Optional[int]) -> TaskSet:
    """Every task checked and loaded once before any model is: a missing JSONL file, a bad record
    or an unknown task name fails here, in seconds. Raises MissingInput / McqFileError / HarnessError."""
    eval_dir = Path(eval_dir)
    files: dict[str, Path] = {}
    for s in mcq_sets:
        files[T.task_name(s)] = eval_dir / f"{s}.jsonl"
        T.load_mcq_set(files[T.task_name(s)], limit)  # the checks, with file and line in the message
    shipped = set(T.shipped_sets())
    custom = [s for s in mcq_sets if s not in shipped]
    include, tmp = [T.TASKS_DIR], None
    if custom:
        tmp = tempfile.TemporaryDirectory(prefix="mol-lm-eval-tasks-")
        for s in custom:
            # what a user would write to add a set: the template, a task name and the file's stem
            (Path(tmp.name) / f"{T.task_name(s)}.yaml").write_text(
                f"include: {T.TEMPLATE}\ntask: {T.task_name(s)}\ndataset_kwargs:\n  mcq_set: {json.dumps(s)}\n")
        include.append(Path(tmp.name))
    ours = set(files) | {T.task_name(s) for s in shipped}
    names = list(dict.fromkeys([*files, *tasks]))
    hub = any(t not in ours for t in tasks)
    ts = TaskSet(names, files, eval_dir, limit, include, hub, tmp)
    try:
        if hub:
            # a name lm-eval indexes, or the path of a task YAML file (lm-eval takes both)
            unknown = [t for t in tasks if t not in ts.manager().all_tasks and not Path(t).is_file()]
            if unknown:
                import difflib

                hints = {t: difflib.get_close_matches(t, ts.manager().all_tasks, n=3) for t in unknown}
                raise HarnessError("lm-eval knows no task " + "; ".join(
                    f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items()))
        _load(ts)
    except BaseException:
        ts.close()
        raise
    return ts


def _load(ts: TaskSet) -> dict:
    """lm-eval Task objects, fresh (simple_evaluate changes their settings while it runs)."""
    try:
        return ts.manager().load(ts.names)
    except MolError:
        raise  # our own loader's message (file and line) says it best
    except Exception as e:  # datasets' errors offline are many types; the name of the task is what helps
        raise HarnessError(f"lm-eval could not load {', '.join(ts.names)}: {type(e).__name__}: {e}"
                           + (" (tasks other than mol_* read their data from the Hugging Face hub)"
                              if ts.hub else "")) from e


# --------------------------------------------------------------------------- running them


def run_tasks(model, tokenizer, ts: TaskSet, *, chat_template: bool, template_kwargs: dict | None = None,
              batch_size: int = 4, gen_kwargs: dict | None = None) -> tuple[dict, dict]:
    """Score one model on every task of `ts` with lm_eval.simple_evaluate (gen_kwargs: sampling
    settings for generation tasks, over each task's own).

    Returns (scores, samples): scores = {"metrics": {"<metric>/<task>": value as lm-eval reports it},
    "items": {task: {"doc_ids": [...], "<metric>": [per-document value, in doc_id order]}},
    "tasks": {task: {"n", "output_type", "chance"}}, "lm_eval": the results' summary};
    samples = lm-eval's per-sample logs {task: [record, ...]}.
    A metric under a filter other than "none" is named "<metric>,<filter>", as lm-eval prints it.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              chat_template_args=dict(template_kwargs or {}))
    out = simple_evaluate(lm, tasks=ts.names, task_manager=ts.manager(), limit=ts.limit,
                          apply_chat_template=chat_template, log_samples=True,
                          gen_kwargs=dict(gen_kwargs or {}) or None,
                          # lm-eval's stderr of a mean is closed-form; the bootstrap is for other aggregates
                          bootstrap_iters=1000)
    return summarize(out), out.get("samples", {})


def _metric_name(key: str) -> Optional[str]:
    """'acc,none' -> 'acc'; 'exact_match,strict-match' -> 'exact_match,strict-match'; stderr -> None."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    if metric.endswith("_stderr"):
        return None
    return metric if filt == "none" else key


def summarize(out: dict) -> dict:
    """simple_evaluate's output -> our scores (see run_tasks); per-item values only where a sample's
    metric is a number (acc, acc_norm, exact_match...; not f1's or bleu's (gold, pred) pairs)."""
    metrics, items, tasks = {}, {}, {}
    for task, res in out["results"].items():
        for key, value in res.items():
            name = _metric_name(key)
            if name is not None and isinstance(value, (int, float)):
                metrics[f"{name}/{task}"] = float(value)
    configs = out.get("configs", {})
    for task, recs in out.get("samples", {}).items():
        per: dict[str, dict[int, float]] = {}
        for r in recs:
            filt = r.get("filter", "none")
            for m in r.get("metrics", []):
                v = r.get(m)
                if isinstance(v, (bool, int, float)):
                    per.setdefault(m if filt == "none" else f"{m},{filt}", {})[r["doc_id"]] = float(v)
        doc_ids = sorted({r["doc_id"] for r in recs})
        items[task] = {"doc_ids": doc_ids, **{m: [v[i] for i in doc_ids] for m, v in per.items()
                                              if len(v) == len(doc_ids)}}
        otype = configs.get(task, {}).get("output_type")
        chance = None
        if otype == "multiple_choice" and recs:
            seen = {}
            for r in recs:
                n_choices = len(r["filtered_resps"]) // (2 if "acc_mutual_info" in r.get("metrics", []) else 1)
                seen[r["doc_id"]] = 1 / max(n_choices, 1)
            chance = sum(seen.values()) / len(seen)
        tasks[task] = {"n": len(doc_ids), "output_type": otype, "chance": chance}
    summary = {k: out[k] for k in _KEPT if k in out}
    summary["lm_eval_version"] = lm_eval_version()
    return {"metrics": metrics, "items": items, "tasks": tasks, "lm_eval": json.loads(json.dumps(summary, default=str))}


def lm_eval_version() -> str:
    """The installed lm-eval's version (recorded with every result)."""
    from importlib.metadata import version

    return version("lm-eval")


def compare(base: dict, trained: dict) -> dict:
    """{"<metric>/<task>": {"delta", "se", "n"}} for every per-item metric both models have; the
    items must be the same documents (same doc_ids), else HarnessError."""
    out = {}
    for task, b in base.get("items", {}).items():
        t = trained.get("items", {}).get(task)
        if t is None:
            continue
        if b["doc_ids"] != t["doc_ids"]:
            raise HarnessError(f"{task}: base and trained were scored on different documents; cannot pair them")
        for m in b:
            if m != "doc_ids" and m in t:
                d, se = paired_delta(b[m], t[m])
                out[f"{m}/{task}"] = {"delta": d, "se": se, "n": len(b[m])}
    return out


def sample_files(samples: dict) -> dict[str, bytes]:
    """lm-eval's per-sample logs as {"<task>.jsonl": its lines} (what `lm_eval --log_samples` writes
    per task); the caller writes them (a run folder's through mol.run_folder)."""
    from lm_eval.utils import handle_non_serializable

    return {f"{re.sub(r'[^A-Za-z0-9_.,=+-]', '_', task)}.jsonl":
            "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in recs).encode()
            for task, recs in samples.items()}
