"""Base vs trained model: held-out perplexity and KL-to-base per subset, and multiple-choice accuracy.

Both models are measured with the same code on the same data, so every difference in the table is
the training's doing:

    ppl/<subset>         exp(mean next-token CE) on the cache's validation sequences
    kl_to_base/<subset>  truncated reverse KL to the cached base-model labels (0 for the base itself,
                         up to the cache's quantisation): how far training moved the model
    acc/<set>            multiple-choice accuracy by length-normalised log-likelihood: each choice is
                         rendered as the assistant's answer to the question through the chat template,
                         scored by the mean log-prob of its tokens, and the best-scoring choice is the
                         prediction
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import cache as C
from . import run_folder as RF
from .batching import model_hidden, output_weight, subset_losses
from .config import CORPORA, MolConfig
from .errors import MissingInput, MolError
from .model import load_model, load_tokenizer, model_fingerprint, pick_device, tokenizer_fingerprint

log = logging.getLogger(__name__)


class EvalError(MolError, ValueError):
    """An evaluation input (an MCQ file, a run's summary) that cannot be scored."""


Progress = Callable[[int], None]
MakeBar = Callable[[int, str], Progress]

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


def _no_bar(total: int, desc: str) -> Progress:
    return lambda n: None


def default_eval_dir() -> Path:
    from .default_data import default_data_dir

    return default_data_dir() / "eval"


# --------------------------------------------------------------------------- the run folder


def read_run(run_dir: Path) -> tuple[MolConfig, dict]:
    """The run's resolved config and summary; FileNotFoundError naming whatever is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingInput(f"run folder {run_dir} does not exist")
    for name in (RF.CONFIG, RF.SUMMARY):
        if not (run_dir / name).is_file():
            raise MissingInput(f"{run_dir} has no {name}: not a finished training run")
    return RF.read_config(run_dir), RF.read_summary(run_dir)


def trained_weights(run_dir: Path, summary: dict) -> tuple[str, Path]:
    """("lora", adapter folder) or ("full", model folder), whichever the run saved."""
    run_dir = Path(run_dir)
    found = {kind: RF.RunFolder(run_dir).weights_dir(kind) for kind in ("lora", "full")}
    want = summary.get("finetune")
    order = [want] if want in found else ["lora", "full"]
    for kind in order:
        if found[kind].is_dir():
            return kind, found[kind]
    names = " or ".join(f"{found[k].name}/" for k in order)
    raise MissingInput(f"{run_dir} has no {names} (finetune={want!r}): training did not save a model")


# --------------------------------------------------------------------------- multiple choice


@dataclass
class McqItem:
    id: str
    question: str
    choices: list[str]
    answer_index: int


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
                raise EvalError(f"{where}: invalid JSON ({e.msg})") from None
            q, ch, ans = rec.get("question"), rec.get("choices"), rec.get("answer_index")
            if not isinstance(q, str) or not q.strip():
                raise EvalError(f"{where}: 'question' must be a non-empty string")
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c.strip() for c in ch):
                raise EvalError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
                raise EvalError(f"{where}: 'answer_index' must be an integer in 0..{len(ch) - 1}, got {ans!r}")
            items.append(McqItem(str(rec.get("id", f"{path.stem}-{lineno}")), q, ch, ans))
    if not items:
        raise EvalError(f"{path}: no MCQ records")
    return items


def encode_choice(tokenizer, question: str, choice: str, template_kwargs: dict) -> tuple[list[int], int]:
    """Token ids of the chat up to the end of the choice text, and the index of its first choice token.

    The assistant's text is located after the prompt that `add_generation_prompt=True` renders, so
    whatever the template puts between the two (e.g. an empty think block) counts as prompt, and the
    closing tokens after the answer are left out: they would score the template, not the choice.
    """
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **template_kwargs)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": choice}], tokenize=False,
                                         **template_kwargs)
    text = choice.strip()  # templates commonly trim message content
    start = full.rfind(text, len(prompt) if full.startswith(prompt) else 0)
    if start < 0:
        raise EvalError(f"the chat template changed the answer text {choice[:60]!r}; cannot locate it to score")
    ids = tokenizer(full[:start + len(text)], add_special_tokens=False)["input_ids"]
    prefix = tokenizer(full[:start], add_special_tokens=False)["input_ids"]
    # a token merging across the prompt/answer boundary belongs to the answer
    first = 0
    while first < min(len(ids), len(prefix)) and ids[first] == prefix[first]:
        first += 1
    first = max(first, 1)  # position 0 has no prediction
    return ids, first


def _padded(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and bool mask [B, L]."""
    L = max(len(s) for s in seqs)
    x = torch.zeros((len(seqs), L), dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = True
    return x.to(device), attn.to(device)


def _shared_prefix_hidden(model, encoded: list[tuple[list[int], int]], device: torch.device):
    """Per choice, hidden states [n_i, H] at the positions predicting its tokens, with the common
    prompt run once and its KV cache repeated for every choice; None when the model or the
    tokenisation does not allow it (the caller then runs the full padded batch).

    For long questions with short answers (MedQA) this does ~C times less work than one padded
    batch of C full sequences.
    """
    P = min(first for _, first in encoded)
    prefix = encoded[0][0][:P]
    if any(ids[:P] != prefix for ids, _ in encoded):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    pre = decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    cache = getattr(pre, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(len(encoded))
    x, attn = _padded([ids[P:] for ids, _ in encoded], device)
    attn = torch.cat([torch.ones((len(encoded), P), dtype=torch.bool, device=device), attn], dim=1)
    h = decoder(input_ids=x, attention_mask=attn.long(), past_key_values=cache, use_cache=True).last_hidden_state
    last = pre.last_hidden_state[0, -1:]
    # row j of cat([last, h[i]]) is absolute position P-1+j
    return [torch.cat([last, h[i, :len(ids) - P - 1]])[first - P:] for i, (ids, first) in enumerate(encoded)]


@torch.no_grad()
def choice_scores(model, encoded: list[tuple[list[int], int]], device: torch.device,
                  share_prefix: bool = True) -> list[float]:
    """Mean log-prob of each choice's tokens (ids[first:]), all choices of one item in one batch.

    Logits are formed only at the choice positions, so the output layer costs a few [V] rows.
    share_prefix runs the common prompt once (see _shared_prefix_hidden); False runs one padded
    batch of the full sequences. Both give the same scores up to float rounding.
    """
    rows = _shared_prefix_hidden(model, encoded, device) if share_prefix else None
    if rows is None:
        x, attn = _padded([ids for ids, _ in encoded], device)
        h = model_hidden(model, {C.INPUT_IDS: x, "attention_mask": attn})
        rows = [h[i, first - 1:len(ids) - 1] for i, (ids, first) in enumerate(encoded)]
    targets = [t for ids, first in encoded for t in ids[first:]]
    owner = [i for i, (ids, first) in enumerate(encoded) for _ in ids[first:]]
    w = output_weight(model)
    dt = torch.promote_types(w.dtype, torch.float32)
    logp = torch.log_softmax(torch.cat(rows).to(dt) @ w.to(dt).T, dim=-1)
    tok_lp = logp.gather(-1, torch.tensor(targets, device=logp.device)[:, None])[:, 0]
    owner_t = torch.tensor(owner, device=logp.device)
    sums = torch.zeros(len(encoded), dtype=dt, device=logp.device).index_add_(0, owner_t, tok_lp)
    counts = torch.bincount(owner_t, minlength=len(encoded)).to(dt)
    return (sums / counts).tolist()


@dataclass
class EncodedSet:
    name: str
    path: Path
    items: list[McqItem]
    encoded: list[list[tuple[list[int], int]]]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for item in self.encoded for ids, _ in item)

    @property
    def chance(self) -> float:
        return sum(1 / len(it.choices) for it in self.items) / len(self.items)


def encode_set(name: str, path: Path, items: list[McqItem], tokenizer, template_kwargs: dict) -> EncodedSet:
    enc = [[encode_choice(tokenizer, it.question, c, template_kwargs) for c in it.choices] for it in items]
    return EncodedSet(name, path, items, enc)


def score_set(model, s: EncodedSet, device: torch.device, progress: Progress | None = None) -> dict:
    """{"accuracy", "correct", "n", "predictions"} for one MCQ set."""
    model.eval()
    preds = []
    for enc in s.encoded:
        scores = choice_scores(model, enc, device)
        preds.append(max(range(len(scores)), key=scores.__getitem__))
        if progress:
            progress(sum(len(ids) for ids, _ in enc))
    hits = [int(p == it.answer_index) for p, it in zip(preds, s.items)]
    return {"accuracy": sum(hits) / len(s.items), "correct": sum(hits), "n": len(s.items), "predictions": preds,
            "hits": hits}


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


def _evaluate_model(model, label: str, val: C.Sequences | None, k: int, sets: list[EncodedSet],
                    cfg: MolConfig, device: torch.device, make_bar: MakeBar) -> dict:
    model.eval()
    res: dict = {}
    if val is not None:
        res.update(heldout_metrics(model, val, k, cfg, device,
                                   make_bar(_selected_tokens(val, cfg.eval.max_val_sequences), f"val {label}")))
    preds = {}
    for s in sets:
        r = score_set(model, s, device, make_bar(s.tokens, f"{s.name} {label}"))
        res[f"acc/{s.name}"] = r["accuracy"]
        res[f"correct/{s.name}"] = r["correct"]
        res[f"hits/{s.name}"] = r["hits"]  # per item, for paired comparisons between models
        preds[s.name] = r["predictions"]
    shown = [f"ppl/{c}" for c in CORPORA] + [f"acc/{s.name}" for s in sets]
    log.info("%s: %s", label, "  ".join(f"{key}={res[key]:.4g}" for key in shown if key in res))
    res["predictions"] = preds
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
                 make_bar: Optional[MakeBar] = None, base_json: Path | None = None) -> dict:
    """Evaluate base and trained model of a run; write run_dir/eval.json and eval.md; return the result.

    mcq_items: items per MCQ set (first N of each file; default cfg.eval.mcq_items, 0 skips MCQ).
    eval_dir: folder holding <set>.jsonl for every name in cfg.eval.mcq_sets (default: the default
    data's eval/ folder). make_bar(total_tokens, description) -> update(n) reports progress.
    base_json: runs sharing a cache share the base model's figures: read them from this file when
    it holds an evaluation of the same cache, MCQ files and item count; else compute and write it.
    """
    run_dir = Path(run_dir)
    make_bar = make_bar or _no_bar
    cfg, summary = read_run(run_dir)
    kind, weights = trained_weights(run_dir, summary)
    n_items = cfg.eval.mcq_items if mcq_items is None else mcq_items
    if n_items < 0:
        raise EvalError(f"mcq_items must be >= 0, got {n_items}")
    eval_dir = Path(eval_dir) if eval_dir is not None else default_eval_dir()
    # every file is read before any model loads, so a missing set fails in a second, not after the base eval
    raw_sets = [(name, eval_dir / f"{name}.jsonl") for name in (cfg.eval.mcq_sets if n_items else [])]
    loaded = [(name, path, load_mcq_set(path, n_items)) for name, path in raw_sets]

    if "cache_dir" not in summary:
        raise MissingInput(f"{run_dir / RF.SUMMARY} does not name the teacher cache (cache_dir)")
    cache = C.TeacherCache(summary["cache_dir"])
    if "model_path" in summary:
        model_path = Path(summary["model_path"])
    else:
        from .model import resolve_model_path

        model_path = resolve_model_path(cfg.model.name)
    # KL-to-base is only meaningful against labels from this very base model
    cache.check_compatible(model_fp=model_fingerprint(model_path), tokenizer_fp=tokenizer_fingerprint(model_path),
                           k=cache.k)
    has_val = any(key.endswith("/val") and v["sequences"] for key, v in cache.manifest.get("counts", {}).items())
    val = cache.load("val") if has_val else None
    if val is None:
        log.warning("cache %s has no validation sequences: no perplexity, only MCQ accuracy", cache.path)

    tokenizer = load_tokenizer(model_path)
    sets = [encode_set(name, path, items, tokenizer, cfg.model.chat_template_kwargs) for name, path, items in loaded]
    device = pick_device(cfg.model.device)

    model = load_model(model_path, cfg.model, device=device)
    base_key = {"cache_dir": str(cache.path), "mcq_items": n_items, "max_val_sequences": cfg.eval.max_val_sequences,
                "mcq": {s.name: str(s.path) for s in sets}}
    base = None
    if base_json is not None and Path(base_json).is_file():
        saved = json.loads(Path(base_json).read_text())
        if saved.get("key") == base_key:
            base = saved["base"]
            log.info("base model figures from %s", base_json)
        else:
            log.warning("%s was computed for another cache or eval sets: evaluating the base again", base_json)
    if base is None:
        base = _evaluate_model(model, "base", val, cache.k, sets, cfg, device, make_bar)
        if base_json is not None:
            tmp = Path(base_json).with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": base_key, "base": base}, indent=2) + "\n")
            os.replace(tmp, base_json)
    if kind == "lora":
        from peft import PeftModel

        # wraps the same weights in place: one copy of the base in memory, not two
        model = PeftModel.from_pretrained(model, weights).to(device)
    else:
        del model
        model = load_model(weights, cfg.model, device=device)
    trained = _evaluate_model(model, "trained", val, cache.k, sets, cfg, device, make_bar)

    metric_prefixes = ("ce/", "ppl/", "kl_to_base/", "acc/")
    delta = {key: trained[key] - base[key] for key in base
             if key.startswith(metric_prefixes) and key in trained}
    result = {
        "run_dir": str(run_dir),
        "model_path": str(model_path),
        "cache_dir": str(cache.path),
        "finetune": kind,
        "trained_weights": str(weights),
        "final_step": summary.get("final_step"),
        "device": str(device),
        "mcq_items": n_items,
        "subsets": _subset_corpora(val),
        "mcq": {s.name: {"file": str(s.path), "n": len(s.items), "chance": s.chance} for s in sets},
        "base": base,
        "trained": trained,
        "delta": delta,
    }
    (run_dir / EVAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / EVAL_MD).write_text(format_markdown(result))
    return result


# --------------------------------------------------------------------------- tables


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(metric, base, trained, change) strings; a row appears only when both models have it."""
    base, trained = result["base"], result["trained"]
    keys = [f"ppl/{s}" for s in result.get("subsets", {})]
    keys += [f"ppl/{c}" for c in CORPORA] + [f"kl_to_base/{c}" for c in CORPORA]
    keys += [f"acc/{s}" for s in result.get("mcq", {})]
    rows = []
    for key in dict.fromkeys(keys):
        if key not in base or key not in trained:
            continue
        b, t = base[key], trained[key]
        if key.startswith("ppl/"):
            digits = 3 if max(b, t) < 1000 else 1
            rows.append((key, f"{b:.{digits}f}", f"{t:.{digits}f}", f"{100 * (t - b) / b:+.2f}%"))
        elif key.startswith("kl_to_base/"):
            # the base's own KL is ~0, so a relative change would be meaningless
            rows.append((key, _small(b), _small(t), _small(t - b, "+")))
        else:
            m = result["mcq"][key.split("/", 1)[1]]
            label = f"{key} (n={m['n']}, chance {100 * m['chance']:.1f}%)"
            rows.append((label, f"{100 * b:.1f}%", f"{100 * t:.1f}%", f"{100 * (t - b):+.1f} pt"))
    return rows


def _small(v: float, sign: str = "") -> str:
    """Fixed point, or scientific below 1e-3 where fixed point would print a misleading 0.0000."""
    return f"{v:{sign}.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:{sign}.2e}"


_HEADER = ("metric", "base", "trained", "change")


def format_table(result: dict) -> str:
    """Plain-text table for the terminal: rows ppl per subset and corpus, KL-to-base, MCQ accuracy."""
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
            "kl_to_base = truncated reverse KL to the cached base-model labels; "
            f"acc = length-normalised log-likelihood accuracy on the first {result['mcq_items']} items per set."]
    return "\n".join(out) + "\n"
