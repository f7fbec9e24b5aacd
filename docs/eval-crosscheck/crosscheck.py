"""Cross-check of lm-evaluation-harness against the multiple-choice scorer MoL had before it
(mol/evaluate.py at commit 73678f7, read from git history), on the same items and models.

    python docs/eval-crosscheck/crosscheck.py RUN_DIR [--items 100] [--out docs/eval-crosscheck]

For the run's base and trained model and every default set, on the first N items:
  ours      the old scorer: the choice with the highest mean log-prob per token, each choice
            rendered as the assistant's answer through the chat template
  lm-eval   the mol_<set> tasks with apply_chat_template (MoL's default) and without it:
            acc (highest total log-likelihood) and acc_norm (highest log-likelihood per character)
  per item  agreement of the predicted choice, ours vs each lm-eval metric; and lm-eval's
            per-choice log-likelihood (chat) against ours (mean x tokens), and ours recomputed from
            lm-eval's log-likelihoods (divided by our token counts)
Writes OUT/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OLD_COMMIT = "73678f7"
SETS = ("medqa", "mmlu_clinical", "piqa", "openbookqa")


def old_scorer():
    """mol/evaluate.py as of OLD_COMMIT, imported as a module of the mol package (its relative
    imports resolve against today's mol/)."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:mol/evaluate.py"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    path = Path(f"/tmp/mol_evaluate_{OLD_COMMIT}.py")
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"mol._evaluate_{OLD_COMMIT}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def lm_eval_preds(recs: list[dict]) -> dict:
    """{doc_id: (argmax ll, argmax ll/len(choice chars), [ll per choice])} from lm-eval's samples."""
    out = {}
    for r in recs:
        lls = [float(x[0]) for x in r["filtered_resps"]]
        ch = r["doc"]["choices"]
        out[r["doc_id"]] = (max(range(len(lls)), key=lls.__getitem__),
                            max(range(len(lls)), key=lambda j: lls[j] / len(ch[j])), lls)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()

    from mol import harness as H
    from mol.evaluate import read_run, trained_weights
    from mol.lm_eval_tasks import default_eval_dir
    from mol.model import load_model, load_tokenizer, pick_device

    old = old_scorer()
    cfg, summary = read_run(args.run_dir)
    kind, weights = trained_weights(args.run_dir, summary)
    assert kind == "lora", "the cross-check wraps the base in the adapter"
    model_path = Path(summary["model_path"])
    tok = load_tokenizer(model_path)
    device = pick_device(cfg.model.device)
    eval_dir = default_eval_dir()
    tkw = cfg.model.chat_template_kwargs
    sets = {s: old.encode_set(s, eval_dir / f"{s}.jsonl", old.load_mcq_set(eval_dir / f"{s}.jsonl", args.items),
                              tok, tkw) for s in SETS}

    model = load_model(model_path, cfg.model, device=device).eval()
    rows, detail = [], {}
    for label in ("base", "trained"):
        if label == "trained":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, weights).to(device).eval()
        t0 = time.time()
        ours = {}
        with torch.no_grad():
            for s, enc in sets.items():
                per_item = []
                for it, e in zip(enc.items, enc.encoded):
                    means = old.choice_scores(model, e, device)
                    per_item.append((means, [len(ids) - first for ids, first in e], it.answer_index))
                ours[s] = per_item
        t_ours = time.time() - t0
        runs, times = {}, {}
        for chat in (True, False):
            t0 = time.time()
            with H.resolve_tasks(list(SETS), [], eval_dir, args.items) as ts:
                _, samples = H.run_tasks(model, tok, ts, chat_template=chat, template_kwargs=tkw,
                                         batch_size=cfg.eval.batch_size)
            runs[chat] = {s: lm_eval_preds(samples[f"mol_{s}"]) for s in SETS}
            times[chat] = time.time() - t0
        for s in SETS:
            o = ours[s]
            n = len(o)
            pred_ours = [max(range(len(m)), key=m.__getitem__) for m, _, _ in o]
            gold = [g for _, _, g in o]
            row = {"model": label, "set": s, "n": n,
                   "ours": sum(p == g for p, g in zip(pred_ours, gold)) / n}
            for chat, tag in ((True, "chat"), (False, "plain")):
                lp = runs[chat][s]
                acc_p = [lp[i][0] for i in range(n)]
                norm_p = [lp[i][1] for i in range(n)]
                row[f"{tag}_acc"] = sum(p == g for p, g in zip(acc_p, gold)) / n
                row[f"{tag}_acc_norm"] = sum(p == g for p, g in zip(norm_p, gold)) / n
                row[f"{tag}_agree_acc"] = sum(a == b for a, b in zip(pred_ours, acc_p)) / n
                row[f"{tag}_agree_acc_norm"] = sum(a == b for a, b in zip(pred_ours, norm_p)) / n
            # the same log-likelihoods? lm-eval (chat) sums over "\n" + choice: the newline that ends
            # the generation prompt moves into the continuation (lm-eval keeps a context's trailing
            # whitespace with the continuation); it is the same for every choice of an item
            lp = runs[True][s]
            diffs = [lp[i][2][j] - o[i][0][j] * o[i][1][j] for i in range(n) for j in range(len(o[i][0]))]
            spread = [max(lp[i][2][j] - o[i][0][j] * o[i][1][j] for j in range(len(o[i][0])))
                      - min(lp[i][2][j] - o[i][0][j] * o[i][1][j] for j in range(len(o[i][0]))) for i in range(n)]
            token_mean = [max(range(len(o[i][0])), key=lambda j: lp[i][2][j] / o[i][1][j]) for i in range(n)]
            row["ll_diff_median"] = statistics.median(diffs)
            row["ll_diff_min"], row["ll_diff_max"] = min(diffs), max(diffs)
            row["ll_diff_spread_max"] = max(spread)
            row["agree_token_mean_from_lm_eval"] = sum(a == b for a, b in zip(pred_ours, token_mean)) / n
            rows.append(row)
        detail[label] = {"seconds_ours": t_ours, "seconds_lm_eval_chat": times[True],
                         "seconds_lm_eval_plain": times[False]}
        print(f"{label}: ours {t_ours:.0f} s, lm-eval chat {times[True]:.0f} s, plain {times[False]:.0f} s",
              file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({
        "run_dir": str(args.run_dir), "items": args.items, "old_scorer": f"mol/evaluate.py @ {OLD_COMMIT}",
        "lm_eval": H.lm_eval_version(), "rows": rows, "timing": detail}, indent=2) + "\n")
    pct = lambda x: f"{100 * x:.0f}"  # noqa: E731
    print("| model | set | n | ours | lm-eval acc | acc_norm | agree acc | agree acc_norm | plain acc | plain "
          "acc_norm | token-mean from lm-eval's ll, agree | lm-eval ll − ours, nats (median; spread in an item, max) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['set']} | {r['n']} | {pct(r['ours'])} | {pct(r['chat_acc'])} | "
              f"{pct(r['chat_acc_norm'])} | {pct(r['chat_agree_acc'])} | {pct(r['chat_agree_acc_norm'])} | "
              f"{pct(r['plain_acc'])} | {pct(r['plain_acc_norm'])} | {pct(r['agree_token_mean_from_lm_eval'])} | "
              f"{r['ll_diff_median']:.2e}; {r['ll_diff_spread_max']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
