"""Plot training curves of one or more runs into RUN_DIR/plots/.

    python -m stages.plots RUN_DIR [RUN_DIR ...] [--compare OUT.png [--key ce/domain]]
With --compare, also overlays one validation metric of all the runs in OUT.png (for sweeps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mol.config import check_path
from mol.plots import plot_compare, plot_run
from stages._cli import entry_point


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    ap.add_argument("--compare", type=Path, default=None, help="also write this PNG comparing the runs")
    ap.add_argument("--key", default="ce/domain", help="validation metric for --compare (default ce/domain)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:  # checked before the runs' plots are drawn, not after
        check_path(args.compare, "--compare", kind="file")
    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(path)
    if args.compare:
        print(plot_compare(args.run_dirs, args.compare, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
