"""The paper's claims at small scale: one teacher cache, six runs, one results page.

    python -m stages.experiment data/experiment.yaml [--out runs/experiment] [--page docs/experiment]
                                [--jobs N] [--mcq-items N] [key=value ...]

Builds (or reuses) the cache, trains and evaluates base / MoL 1:1 / CE-only 1:1 / MoL α = 0.5 /
MoL 1:0.5 / MoL 1:2 with the same steps, seed and schedule, then writes PAGE/README.md (table,
verdict per claim, commands, run time, machine), PAGE/results.json and the comparison plots.
Finished runs are reused, so a killed experiment resumes. key=value overrides apply to every run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mol.config import ConfigError, check_path, load_config
from mol.experiment import Plan, run_experiment
from stages._cli import entry_point, token_bar


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value, applied to every run (e.g. train.lr=3e-4)")
    ap.add_argument("--out", type=Path, default=Path("runs/experiment"), help="run folders")
    ap.add_argument("--page", type=Path, default=Path("docs/experiment"), help="results page folder")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    ap.add_argument("--mcq-items", type=int, default=None, help="items per MCQ set (default: eval.mcq_items)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    load_config(args.config, args.overrides)  # every config problem before any work
    if args.jobs < 1:
        raise ConfigError([f"--jobs must be >= 1, got {args.jobs}"])
    if args.mcq_items is not None and args.mcq_items < 0:
        raise ConfigError([f"--mcq-items must be >= 0 (0 runs no task), got {args.mcq_items}"])
    check_path(args.out, "--out")
    check_path(args.page, "--page")
    page = run_experiment(Plan(args.config, list(args.overrides), args.out, args.jobs, args.mcq_items,
                               page=args.page), make_bar=token_bar)
    print(f"\nresults page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
