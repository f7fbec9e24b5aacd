"""Evaluate a training run: held-out perplexity, KL-to-base and MCQ accuracy, base vs trained.

    python -m stages.eval RUN_DIR [--mcq-items N] [--eval-dir DIR] [--base-json FILE]
Writes RUN_DIR/eval.json and RUN_DIR/eval.md. Exit status 2 when the run, its cache or an
evaluation file is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mol.evaluate import EVAL_JSON, EVAL_MD, evaluate_run, format_table, read_run, trained_weights
from stages._cli import entry_point, token_bar


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run folder written by stages.train")
    ap.add_argument("--mcq-items", type=int, default=None, help="items per MCQ set (default: eval.mcq_items)")
    ap.add_argument("--eval-dir", type=Path, default=None,
                    help="folder with <set>.jsonl MCQ files (default: the default data's eval/)")
    ap.add_argument("--base-json", type=Path, default=None,
                    help="reuse the base model's figures from this file (runs sharing a cache), or write them there")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    # checked here too so a wrong path fails before any model or cache is touched
    _, summary = read_run(args.run_dir)
    trained_weights(args.run_dir, summary)
    result = evaluate_run(args.run_dir, mcq_items=args.mcq_items, eval_dir=args.eval_dir, make_bar=token_bar,
                          base_json=args.base_json)
    print()
    print(format_table(result))
    print(f"\nwrote {args.run_dir / EVAL_JSON}\n      {args.run_dir / EVAL_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
