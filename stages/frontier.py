"""Which α and which ratio: the trade-off frontier and a forgetting curve from ONE teacher cache.

    python -m stages.frontier data/frontier.yaml [--out runs/frontier] [--page docs/frontier] [--jobs N]
                              [--alphas 0.01,0.1,0.5] [--ratios 0.5,1,2] [--forgetting "k=v k=v ..."]
                              [--mcq-items N] [key=value ...]

Builds (or reuses) the cache, then trains and evaluates the forgetting pair (CE-only and MoL, longer,
validated every few steps) and the grid (CE-only, and MoL at every α × general ratio), and writes
PAGE/README.md (front, verdicts for the paper's claims 1 and 5, curves, commands), PAGE/results.json
and the PNGs. Finished runs are skipped and a killed one resumes, so the command can be re-run at any
time. key=value overrides apply to every run (e.g. train.max_steps=200 for a longer grid).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mol.config import ConfigError, check_path, load_config
from mol.frontier import ALPHAS, FORGETTING, RATIOS, FrontierPlan, run_frontier
from stages._cli import entry_point, token_bar


def _floats(text: str, name: str, problems: list[str]) -> tuple:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        problems.append(f"{name} must be comma-separated numbers, got {text!r}")
        return ()
    if not values:
        problems.append(f"{name} is empty")
    return values


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value, applied to every run (e.g. train.max_steps=20)")
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"), help="run folders")
    ap.add_argument("--page", type=Path, default=Path("docs/frontier"), help="results page folder")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    ap.add_argument("--alphas", default=",".join(map(str, ALPHAS)), help="MoL α values of the grid")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="general:domain ratios of the grid")
    ap.add_argument("--forgetting", default=" ".join(FORGETTING),
                    help="key=value overrides of the forgetting pair (quoted, space-separated)")
    ap.add_argument("--mcq-items", type=int, default=None, help="items per MCQ set (default: eval.mcq_items)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    problems: list[str] = []
    alphas = _floats(args.alphas, "--alphas", problems)
    ratios = _floats(args.ratios, "--ratios", problems)
    problems += [f"--alphas: α must be in (0, 1), got {a:g}" for a in alphas if not 0 < a < 1]
    problems += [f"--ratios: a ratio must be > 0, got {r:g}" for r in ratios if not r > 0]
    forgetting = tuple(shlex.split(args.forgetting))
    problems += [f"--forgetting: {o!r} is not key=value" for o in forgetting if "=" not in o]
    if args.jobs < 1:
        problems.append(f"--jobs must be >= 1, got {args.jobs}")
    if args.mcq_items is not None and args.mcq_items < 0:
        problems.append(f"--mcq-items must be >= 0 (0 runs no task), got {args.mcq_items}")
    if problems:
        raise ConfigError(problems)
    load_config(args.config, args.overrides)  # every config problem before any work
    load_config(args.config, [*args.overrides, *forgetting])  # and the forgetting pair's
    check_path(args.out, "--out")
    check_path(args.page, "--page")
    plan = FrontierPlan(args.config, list(args.overrides), args.out, args.jobs, args.mcq_items, alphas=alphas,
                        ratios=ratios, forgetting=forgetting, page=args.page)
    page = run_frontier(plan, make_bar=token_bar)
    print(f"\nresults page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
