"""Base vs trained model: held-out perplexity and KL-to-base per subset (ours, from the teacher
cache), and benchmarks through lm-evaluation-harness (mol/harness.py), in one table.

Both models are measured with the same code on the same data, so every difference in the table is
the training's doing:

    ppl/<subset>         exp(mean next-token CE) on the cache's validation sequences
    kl_to_base/<subset>  truncated reverse KL to the cached base-model labels (0 for the base itself,
                         up to the cache's quantisation): how far training moved the model
    <metric>/<task>      lm-eval's metric on the task's first `eval.mcq_items` documents: for the
                         multiple-choice tasks acc (the choice with the highest log-likelihood is
                         right) and acc_norm (the same, log-likelihood divided by the choice's length
                         in characters); change = trained - base with its paired standard error
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import cache as C
from . import harness as H
from . import run_folder as RF
from .batching import subset_losses
from .config import CORPORA, ConfigError, MolConfig, check_path, load_config
from .errors import MissingInput, MolError
from .files import write_atomic
from .lm_eval_tasks import default_eval_dir
from .model import (load_model, load_tokenizer, model_fingerprint, pick_device, resolve_model_path,
                    tokenizer_fingerprint)

log = logging.getLogger(__name__)


class EvalError(MolError, ValueError):
    """A setting or a run's file that an evaluation cannot use."""


Progress = Callable[[int], None]
MakeBar = Callable[[int, str], Progress]

# the run folder's evaluation files (lm-eval's per-sample logs: <run>/eval-samples/<model>/<task>.jsonl)
EVAL_JSON, EVAL_MD, EVAL_SAMPLES = RF.EVAL_JSON, RF.EVAL_MD, RF.EVAL_SAMPLES


def _no_bar(total: int, desc: str) -> Progress:
    return lambda n: None


# --------------------------------------------------------------------------- the run folder


def read_run(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[MolConfig, dict]:
    """The run's resolved config (with `eval.key=value` overrides applied) and summary;
    MissingInput naming whatever is missing, ConfigError for an override outside eval.*."""
    run_dir = check_path(run_dir, "run folder", must_exist=True)
    for name in (RF.CONFIG, RF.SUMMARY):
        if not (run_dir / name).is_file():
            raise MissingInput(f"{run_dir} has no {name}: not a finished training run")
    # anything else would describe another model than the one the run trained; the chat template's
    # arguments only render lm-eval's prompts (e.g. Qwen3's thinking mode on or off)
    bad = [o for o in overrides if not o.strip().startswith(("eval.", "model.chat_template_kwargs"))]
    if bad:
        raise ConfigError([f"override {o!r}: evaluation takes only eval.* settings and model.chat_template_kwargs"
                           for o in bad])
    cfg = load_config(run_dir / RF.CONFIG, list(overrides)) if overrides else RF.read_config(run_dir)
    try:
        summary = RF.read_summary(run_dir)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise EvalError(f"{run_dir / RF.SUMMARY}: not a readable JSON file ({e}); remove it and resume "
                        f"the run (train.resume=true train.run_name={run_dir.name}) to write it again") from None
    if not isinstance(summary, dict):
        raise EvalError(f"{run_dir / RF.SUMMARY}: a JSON object expected, got {type(summary).__name__}")
    return cfg, summary


def trained_weights(run_dir: Path, summary: dict) -> tuple[str, Path]:
    """("lora", adapter folder) or ("full", model folder), whichever the run saved."""
    run_dir = Path(run_dir)
    found = {kind: RF.RunFolder(run_dir).weights_dir(kind) for kind in ("lora", "full")}
    want = summary.get("finetune")
    order = [want] if want in found else ["lora", "full"]
    for kind in order:
        if found[kind].is_dir():
            return kind, _safetensors_only(found[kind], kind)
    names = " or ".join(f"{found[k].name}/" for k in order)
    raise MissingInput(f"{run_dir} has no {names} (finetune={want!r}): training did not save a model")


def _safetensors_only(folder: Path, kind: str) -> Path:
    """`folder` when its weights are safetensors; a pickled adapter_model.bin / pytorch_model.bin is
    refused, never loaded: unpickling runs whatever code the file holds."""
    want = "adapter_model.safetensors" if kind == "lora" else "*.safetensors"
    if any(folder.glob(want)):
        return folder
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickled:
        raise EvalError(f"{folder} holds {', '.join(pickled)}, pickled weights, and no {want}: MoL never unpickles "
                        f"a file (it could run any code); save the weights as safetensors "
                        f"(save_pretrained(..., safe_serialization=True)) and evaluate again")
    raise MissingInput(f"{folder} has no {want}: training did not finish saving its weights")


def _read_base_json(path: Path | None) -> dict | None:
    """A saved base-model evaluation (runs sharing a cache), or None when there is none yet."""
    if path is None or not Path(path).is_file():
        return None
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"base figures {path}: not a readable JSON file ({e}); remove it (it is rewritten) "
                        f"or name another file") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("base"), dict):
        raise EvalError(f"base figures {path}: a JSON file without base figures (no \"base\" object); remove it "
                        f"(it is rewritten) or name another file")
    return saved


# --------------------------------------------------------------------------- perplexity


def _selected_tokens(seqs: C.Sequences, max_per_subset: int | None) -> int:
    """Tokens `subset_losses` will run through, so a progress bar has a true total."""
    seen: dict[str, int] = {}
    total = 0
    for i in range(len(seqs)):
        n = seen.get(seqs.subset[i], 0)
        if not max_per_subset or n < max_per_subset:
            total += int(seqs.tok_off[i + 1] - seqs.tok_off[i])
        seen[seqs.subset[i]] = n + 1
    return total


@contextmanager
def _count_tokens(model, progress: Progress):
    """Report tokens through the decoder: subset_losses takes no callback, so watch its forwards."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        progress(int(mask.sum()) if mask is not None else int(ids.numel()))

    handle = base.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def heldout_metrics(model, seqs: C.Sequences, k: int, cfg: MolConfig, device: torch.device,
                    progress: Progress | None = None) -> dict:
    """subset_losses plus ppl/<key> = exp(ce/<key>) for every subset and corpus."""
    with _count_tokens(model, progress or (lambda n: None)):
        out = subset_losses(model, seqs, k, device, batch_size=cfg.eval.batch_size,
                            max_per_subset=cfg.eval.max_val_sequences)
    for key in [key for key in out if key.startswith("ce/")]:
        out["ppl/" + key[3:]] = math.exp(out[key])
    return out


# --------------------------------------------------------------------------- the whole evaluation


def _evaluate_model(model, tokenizer, label: str, val: C.Sequences | None, k: int, tasks: H.TaskSet | None,
                    cfg: MolConfig, device: torch.device, make_bar: MakeBar, folder: RF.RunFolder) -> dict:
    """One model's figures: ppl/ce/kl_to_base per subset and corpus, then every task through lm-eval
    (`<metric>/<task>` values, per-item values under "items", task facts under "tasks")."""
    model.eval()
    res: dict = {}
    if val is not None:
        res.update(heldout_metrics(model, val, k, cfg, device,
                                   make_bar(_selected_tokens(val, cfg.eval.max_val_sequences), f"val {label}")))
    if tasks is not None:
        log.info("%s: lm-eval on %s (%s documents each, chat template %s)", label, ", ".join(tasks.names),
                 "all" if tasks.limit is None else tasks.limit, "on" if cfg.eval.chat_template else "off")
        scores, samples = H.run_tasks(model, tokenizer, tasks, chat_template=cfg.eval.chat_template,
                                      template_kwargs=cfg.model.chat_template_kwargs,
                                      batch_size=cfg.eval.batch_size, gen_kwargs=cfg.eval.gen_kwargs)
        res.update(scores["metrics"])
        res["metric_keys"] = list(scores["metrics"])
        res["items"] = scores["items"]
        res["tasks"] = scores["tasks"]
        res["lm_eval"] = scores["lm_eval"]
        for name, data in H.sample_files(samples).items():
            folder.write_file(f"{EVAL_SAMPLES}/{label}/{name}", data)
    shown = [f"ppl/{c}" for c in CORPORA] + res.get("metric_keys", [])
    log.info("%s: %s", label, "  ".join(f"{key}={res[key]:.4g}" for key in shown if key in res))
    return res


def _subset_corpora(val: C.Sequences | None) -> dict[str, str]:
    """{subset: corpus}, domain subsets first, each corpus in cache (= config source) order."""
    if val is None:
        return {}
    first: dict[str, tuple[str, int]] = {}
    for i in range(len(val)):
        first.setdefault(val.subset[i], (val.corpus[i], i))
    rank = {c: j for j, c in enumerate(CORPORA)}
    order = sorted(first, key=lambda s: (rank.get(first[s][0], len(rank)), first[s][1]))
    return {s: first[s][0] for s in order}


def evaluate_run(run_dir: Path, *, mcq_items: int | None = None, eval_dir: Path | None = None,
                 make_bar: Optional[MakeBar] = None, base_json: Path | None = None,
                 overrides: Sequence[str] = (), heldout: bool = True) -> dict:
    """Evaluate base and trained model of a run; write run_dir/eval.json, eval.md and eval-samples/;
    return the result.

    mcq_items: documents per lm-eval task (first N; default cfg.eval.mcq_items, 0 runs no task).
    eval_dir: folder holding <set>.jsonl for every name in cfg.eval.mcq_sets (default: the default
    data's eval/ folder). make_bar(total_tokens, description) -> update(n) reports the perplexity
    pass (lm-eval shows its own bar). base_json: runs sharing a cache share the base model's
    figures: read them from this file when it holds an evaluation of the same cache, tasks, files,
    document count and prompt format; else compute and write it. overrides: `eval.key=value`
    applied to the run's config (e.g. eval.tasks=[hellaswag]). heldout=False skips the held-out
    perplexity and KL-to-base (the lm-eval tasks only).
    """
    run_dir = Path(run_dir)
    make_bar = make_bar or _no_bar
    cfg, summary = read_run(run_dir, overrides)
    device = pick_device(cfg.model.device)
    kind, weights = trained_weights(run_dir, summary)
    saved = _read_base_json(base_json)
    n_items = cfg.eval.mcq_items if mcq_items is None else mcq_items
    if n_items is not None and n_items < 0:
        raise EvalError(f"mcq_items must be >= 0, got {n_items}")
    eval_dir = Path(eval_dir) if eval_dir is not None else default_eval_dir()
    if "cache_dir" not in summary:
        raise MissingInput(f"{run_dir / RF.SUMMARY} does not name the teacher cache (cache_dir)")
    # every task is resolved and its data read before any model loads: a missing file or an
    # unknown task fails in seconds, not after the base model's evaluation
    run_any = n_items != 0 and bool(cfg.eval.mcq_sets or cfg.eval.tasks)
    tasks = H.resolve_tasks(cfg.eval.mcq_sets, cfg.eval.tasks, eval_dir, n_items) if run_any else None
    try:
        with C.ReadLocks() as held:  # the cache's set and units, until the evaluation ends: a gc skips them
            return _evaluate(run_dir, cfg, summary, kind, weights, n_items, eval_dir, tasks, make_bar, base_json,
                             saved, device, heldout, held)
    finally:
        if tasks is not None:
            tasks.close()


def _evaluate(run_dir: Path, cfg: MolConfig, summary: dict, kind: str, weights: Path, n_items: int | None,
              eval_dir: Path, tasks: H.TaskSet | None, make_bar: MakeBar, base_json: Path | None,
              saved: dict | None, device: torch.device, heldout: bool = True,
              held: C.ReadLocks | None = None) -> dict:
    cache = C.open_held(Path(summary["cache_dir"]), held) if held is not None else C.TeacherCache(summary["cache_dir"])
    model_path = Path(summary["model_path"]) if "model_path" in summary else resolve_model_path(cfg.model.name)
    # KL-to-base is only meaningful against labels from this very base model
    cache.check_compatible(model_fp=model_fingerprint(model_path), tokenizer_fp=tokenizer_fingerprint(model_path),
                           k=cfg.teacher.top_k)
    val = cache.load("val") if heldout and cache.sequences_in("val") else None
    if val is None and heldout:
        log.warning("cache %s has no validation sequences: no perplexity, only the lm-eval tasks", cache.path)

    tokenizer = load_tokenizer(model_path)
    folder = RF.RunFolder(run_dir)
    samples_dir = folder.path / EVAL_SAMPLES
    model = load_model(model_path, cfg.model, device=device)
    base_key = {"cache_dir": str(cache.path), "max_val_sequences": cfg.eval.max_val_sequences,
                "tasks": tasks.names if tasks else [], "limit": n_items,
                "files": {t: str(p) for t, p in (tasks.files.items() if tasks else [])},
                "chat_template": cfg.eval.chat_template, "chat_template_kwargs": cfg.model.chat_template_kwargs,
                "gen_kwargs": cfg.eval.gen_kwargs,
                "lm_eval": H.lm_eval_version() if tasks else None,
                # only when skipped: base files written before the option keep their key
                **({} if heldout else {"heldout": False})}
    base, base_from = None, None
    if saved is not None:
        if saved.get("key") == base_key:
            base, base_from = saved["base"], str(base_json)
            log.info("base model figures from %s", base_json)
        else:
            log.warning("%s was computed for another cache, tasks or prompt format: evaluating the base again",
                        base_json)
    if base is None:
        base = _evaluate_model(model, tokenizer, "base", val, cache.k, tasks, cfg, device, make_bar, folder)
        if base_json is not None:
            # two runs' evaluations may finish the base together: each writes whole, under its own temp name
            write_atomic(Path(base_json), (json.dumps({"key": base_key, "base": base,
                                                       "samples": str(samples_dir / "base")}, indent=2) + "\n").encode())
    if kind == "lora":
        from peft import PeftModel

        # wraps the same weights in place: one copy of the base in memory, not two
        model = PeftModel.from_pretrained(model, weights).to(device)
    else:
        del model
        model = load_model(weights, cfg.model, device=device)
    trained = _evaluate_model(model, tokenizer, "trained", val, cache.k, tasks, cfg, device, make_bar, folder)

    metric_keys = trained.get("metric_keys", [])
    scalar = [key for key in base if key.startswith(("ce/", "ppl/", "kl_to_base/"))] + metric_keys
    delta = {key: trained[key] - base[key] for key in scalar if key in base and key in trained}
    files = tasks.files if tasks else {}
    result = {
        "run_dir": str(run_dir),
        "model_path": str(model_path),
        "cache_dir": str(cache.path),
        "finetune": kind,
        "trained_weights": str(weights),
        "final_step": summary.get("final_step"),
        "device": str(device),
        "mcq_items": n_items,
        "chat_template": cfg.eval.chat_template,
        "lm_eval_version": H.lm_eval_version() if tasks else None,
        "subsets": _subset_corpora(val),
        "tasks": {t: {**m, "file": str(files[t]) if t in files else None}
                  for t, m in trained.get("tasks", {}).items()},
        "metrics": metric_keys,
        "base": base,
        "trained": trained,
        "delta": delta,
        "paired": H.compare(base, trained),
        "base_from": base_from,
        "samples": str(samples_dir),
    }
    folder.write_file(EVAL_JSON, (json.dumps(result, indent=2) + "\n").encode())
    folder.write_file(EVAL_MD, format_markdown(result).encode())
    return result


# --------------------------------------------------------------------------- tables


def _is_rate(result: dict, key: str) -> bool:
    """A metric whose per-item values are all 0..1 (acc, acc_norm, exact_match): shown in %."""
    metric, task = key.split("/", 1)
    values = result["base"].get("items", {}).get(task, {}).get(metric)
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(metric, base, trained, change) strings; a row appears only when both models have it.

    Task metrics: base and trained as lm-eval reports them, change = trained - base ± the paired
    standard error over the same documents (mol.harness.paired_delta)."""
    base, trained = result["base"], result["trained"]
    keys = [f"ppl/{s}" for s in result.get("subsets", {})]
    keys += [f"ppl/{c}" for c in CORPORA] + [f"kl_to_base/{c}" for c in CORPORA]
    rows = []
    for key in dict.fromkeys(keys):
        if key not in base or key not in trained:
            continue
        b, t = base[key], trained[key]
        if key.startswith("ppl/"):
            digits = 3 if max(b, t) < 1000 else 1
            rows.append((key, f"{b:.{digits}f}", f"{t:.{digits}f}", f"{100 * (t - b) / b:+.2f}%"))
        else:
            # the base's own KL is ~0, so a relative change would be meaningless
            rows.append((key, _small(b), _small(t), _small(t - b, "+")))
    for key in result.get("metrics", []):
        if key not in base or key not in trained:
            continue
        b, t = base[key], trained[key]
        task = key.split("/", 1)[1]
        meta = result.get("tasks", {}).get(task, {})
        facts = [f"n={meta['n']}"] if meta.get("n") else []
        if meta.get("chance"):
            facts.append(f"chance {100 * meta['chance']:.1f}%")
        label = f"{key} ({', '.join(facts)})" if facts else key
        p = result.get("paired", {}).get(key)
        if _is_rate(result, key):
            change = (f"{100 * p['delta']:+.1f} ± {100 * p['se']:.1f} pt" if p else f"{100 * (t - b):+.1f} pt")
            rows.append((label, f"{100 * b:.1f}%", f"{100 * t:.1f}%", change))
        else:
            change = f"{p['delta']:+.4g} ± {p['se']:.2g}" if p else f"{t - b:+.4g}"
            rows.append((label, f"{b:.4g}", f"{t:.4g}", change))
    return rows


def _small(v: float, sign: str = "") -> str:
    """Fixed point, or scientific below 1e-3 where fixed point would print a misleading 0.0000."""
    return f"{v:{sign}.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:{sign}.2e}"


_HEADER = ("metric", "base", "trained", "change")


def format_table(result: dict) -> str:
    """Plain-text table for the terminal: ppl per subset and corpus, KL-to-base, every task metric."""
    rows = [_HEADER] + table_rows(result)
    w = [max(len(r[j]) for r in rows) for j in range(4)]
    lines = ["  ".join([r[0].ljust(w[0])] + [r[j].rjust(w[j]) for j in range(1, 4)]) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * x for x in w)] + lines[1:])


def format_markdown(result: dict) -> str:
    rows = table_rows(result)
    out = [f"# Evaluation of {Path(result['run_dir']).name}", "",
           f"| {' | '.join(_HEADER)} |", "|:---|---:|---:|---:|"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    out += ["", f"Base model `{result['model_path']}`; trained = {result['finetune']} weights "
                f"`{result['trained_weights']}` (step {result.get('final_step')}).",
            "ppl = exp(mean next-token cross-entropy) on the teacher cache's validation sequences; "
            "kl_to_base = truncated reverse KL to the cached base-model labels."]
    if result.get("metrics"):
        n = result["mcq_items"]
        out.append(f"`<metric>/<task>`: lm-evaluation-harness {result['lm_eval_version']} on "
                   f"{'every document' if n is None else f'the first {n} documents'} of each task, prompts "
                   f"{'through the chat template' if result['chat_template'] else 'as plain text'}; acc = the "
                   "choice with the highest log-likelihood, acc_norm = the highest log-likelihood per character; "
                   "change = trained − base ± its paired standard error over the same documents. Per-sample "
                   f"logs: `{result['samples']}`" + (f" (base: {result['base_from']})" if result.get("base_from")
                                                     else "") + ".")
    return "\n".join(out) + "\n"
