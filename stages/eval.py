"""Evaluate a training run, base vs trained: held-out perplexity and KL-to-base from the teacher
cache, and benchmarks through lm-evaluation-harness (MoL's MCQ sets offline, any lm-eval task).

    python -m stages.eval RUN_DIR [--tasks T1,T2] [--mcq-items N] [--eval-dir DIR] [--base-json FILE]
                          [eval.key=value ...]

--tasks sets eval.tasks (any task, group or tag lm-eval knows; their data come from the Hugging
Face hub), e.g. `--tasks hellaswag,arc_easy`; `eval.mcq_sets=[]` leaves out MoL's own sets and
`eval.chat_template=false` scores plain text. Writes RUN_DIR/eval.json, eval.md and
eval-samples/ (lm-eval's per-sample logs). Exit status 2 when the run, its cache, an evaluation
file or a task is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mol.config import check_path
from mol.evaluate import EVAL_JSON, EVAL_MD, evaluate_run, format_table
from stages._cli import entry_point, token_bar


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run folder written by stages.train")
    ap.add_argument("overrides", nargs="*", help="eval.key=value, applied to the run's config")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated lm-eval task names to run besides eval.mcq_sets (sets eval.tasks)")
    ap.add_argument("--mcq-items", type=int, default=None,
                    help="documents per task, the first N (default: eval.mcq_items)")
    ap.add_argument("--eval-dir", type=Path, default=None,
                    help="folder with <set>.jsonl MCQ files (default: the default data's eval/)")
    ap.add_argument("--base-json", type=Path, default=None,
                    help="reuse the base model's figures from this file (runs sharing a cache), or write them there")
    ap.add_argument("--tasks-only", action="store_true",
                    help="run the lm-eval tasks only, no held-out perplexity / KL-to-base (make frontier reads "
                         "those from the trainer's own validation)")
    # intermixed: key=value may come before or after the options
    args = ap.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.base_json is not None:
        check_path(args.base_json, "--base-json", kind="file")
    if args.eval_dir is not None:
        check_path(args.eval_dir, "--eval-dir", must_exist=True)
    overrides = list(args.overrides)
    if args.tasks is not None:
        overrides.append("eval.tasks=" + json.dumps([t.strip() for t in args.tasks.split(",") if t.strip()]))
    result = evaluate_run(args.run_dir, mcq_items=args.mcq_items, eval_dir=args.eval_dir, make_bar=token_bar,
                          base_json=args.base_json, overrides=overrides, heldout=not args.tasks_only)
    print()
    print(format_table(result))
    print(f"\nwrote {args.run_dir / EVAL_JSON}\n      {args.run_dir / EVAL_MD}\n      {result['samples']}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
